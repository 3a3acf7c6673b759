// `import '@tsvm/core'` must not load koffi (a native addon): programs that only use loaders or
// the mock backend, and every unit test, should not pay for it. koffi arrives with the first
// KVM machine. Checked in a fresh process, since this one may already have loaded it.
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..', '..');
const core = pathToFileURL(join(here, 'index.ts')).href;

// koffi is CommonJS, so wherever it is loaded from it lands in the one CommonJS module cache.
const script = (create: boolean): string => `
import { createRequire } from 'node:module';
const koffi = () => Object.keys(createRequire(${JSON.stringify(root + '/')}).cache).some((k) => /[\\\\/]koffi[\\\\/]/.test(k));
const { Machine } = await import(${JSON.stringify(core)});
const out = { afterImport: koffi() };
await (await Machine.create({ memory: 1 << 20, backend: new (await import(${JSON.stringify(pathToFileURL(join(here, 'testing', 'index.ts')).href)})).MockBackend() })).close();
out.afterMockMachine = koffi();
if (${create}) {
  try { await (await Machine.create({ memory: 1 << 20 })).close(); } catch (e) { out.error = String(e); }
  out.afterKvmMachine = koffi();
}
console.log(JSON.stringify(out));
`;

function probe(create: boolean): Record<string, unknown> {
  const out = execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script(create)], { cwd: root, encoding: 'utf8' });
  return JSON.parse(out.trim().split('\n').at(-1) as string) as Record<string, unknown>;
}

describe('@tsvm/core loads koffi lazily', () => {
  it('importing @tsvm/core and running a MockBackend machine loads no koffi', () => {
    expect(probe(false)).toEqual({ afterImport: false, afterMockMachine: false });
  });
  it('the first Machine.create without a backend loads it (even where /dev/kvm is missing, KvmSystem.open needs libc)', () => {
    const r = probe(true);
    expect(r).toMatchObject({ afterImport: false, afterMockMachine: false, afterKvmMachine: true });
  });
});
