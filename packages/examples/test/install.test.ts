/**
 * The route a stranger takes: pack the public packages, install the tarballs with npm into a
 * fresh project outside the repository, and use them there from plain JavaScript (booting an
 * inline-assembled guest) and from TypeScript under `tsc --strict`. Minutes, not seconds: it
 * builds every package (`prepack`) and installs koffi, keystone-wasm, iced-x86 from the registry.
 */
import { execFile, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmAvailability } from '@tsvm/core/testing';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const tsc = join(repo, 'node_modules/typescript/bin/tsc');
// Async, not execFileSync: minutes of a blocked worker make vitest's RPC time out.
const run = promisify(execFile);
/** Runs a command to its end, never throwing: its status and output, for assertions. */
async function settle(cmd: string, args: string[], cwd: string, timeout: number): Promise<{ status: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(cmd, args, { cwd, timeout });
    return { status: 0, stdout, stderr };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { status: typeof x.code === 'number' ? x.code : -1, stdout: x.stdout ?? '', stderr: x.stderr ?? String(e) };
  }
}
const VITEST = (JSON.parse(readFileSync(join(repo, 'node_modules/vitest/package.json'), 'utf8')) as { version: string }).version;
const PUBLIC = ['@tsvm/core', '@tsvm/devices', '@tsvm/kvm-backend', '@tsvm/monitor'];

function registryReachable(): string {
  const r = spawnSync('npm', ['ping'], { encoding: 'utf8', timeout: 20_000 });
  return r.status === 0 ? '' : (r.stderr || r.error?.message || `npm ping exited ${r.status}`).trim().split('\n')[0] ?? 'unknown';
}

const offline = registryReachable();
if (offline) process.stderr.write(`\n[tsvm] ***** SKIPPING THE INSTALL TEST: the npm registry is unreachable (${offline}) *****\n\n`);

const MAIN_MJS = `
import { Machine } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Uart16550, DebugExit } from '@tsvm/devices';

const vm = await Machine.create({ memory: 2 * 1024 * 1024 });
try {
  const uart = new Uart16550();
  let out = '';
  uart.onOutput((bytes) => { out += Buffer.from(bytes).toString('latin1'); });
  vm.attachDevice(uart);
  vm.attachDevice(new DebugExit());
  vm.loadFlat(await asm('mov dx, 0x3f8 ; mov al, 0x6f ; out dx, al ; mov al, 0x6b ; out dx, al ; mov dx, 0xf4 ; mov al, 3 ; out dx, al', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  const stop = await vm.run({ timeout: 5000 }); // run() delivers device output before it returns
  console.log(JSON.stringify({ reason: stop.reason, code: stop.code, out }));
} finally {
  await vm.close();
}
`;

const GUEST_TEST = `
import { expect, it } from 'vitest';
import { Machine } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Uart16550, DebugExit } from '@tsvm/devices';

it('boots a tiny guest in a test', async () => {
  await using vm = await Machine.create({ memory: 2 * 1024 * 1024 });
  const uart = new Uart16550();
  let out = '';
  uart.onOutput((bytes) => { out += Buffer.from(bytes).toString('latin1'); });
  vm.attachDevice(uart);
  vm.attachDevice(new DebugExit());
  vm.loadFlat(await asm('mov dx, 0x3f8 ; mov al, 0x68 ; out dx, al ; mov al, 0x69 ; out dx, al ; mov dx, 0xf4 ; mov al, 1 ; out dx, al', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  const stop = await vm.run({ timeout: 5000 });
  expect(stop.reason).toBe('debug-exit');
  expect(out).toBe('hi');
});
`;

const MAIN_CJS = `
const { Machine } = require('@tsvm/core');
const { asm } = require('@tsvm/core/asm');
(async () => {
  const vm = await Machine.create({ memory: 2 * 1024 * 1024 });
  try {
    vm.loadFlat(await asm('hlt', { bits: 16 }), { at: 0x1000 });
    const stop = await vm.run({ timeout: 5000 });
    console.log(JSON.stringify({ reason: stop.reason }));
  } finally {
    await vm.close();
  }
})();
`;

const CHECK_TS = `
import { Machine, type Stop } from '@tsvm/core';
import { asm, type AsmOptions } from '@tsvm/core/asm';
import { Uart16550 } from '@tsvm/devices';
import { Monitor } from '@tsvm/monitor';

export async function boot(): Promise<Stop> {
  await using vm = await Machine.create({ memory: 2 * 1024 * 1024 });
  const uart = new Uart16550();
  vm.attachDevice(uart);
  const options: AsmOptions = { bits: 64, address: 0x1000 };
  vm.loadFlat(await asm('hlt', options), { at: 0x1000, mode: 'long' });
  const mon: Monitor = new Monitor(vm);
  void mon;
  return vm.run({ timeout: 1000 });
}
`;

describe.skipIf(offline !== '')('installing the packed tarballs into a fresh npm project', () => {
  let tmp = '';
  let project = '';

  beforeAll(async () => {
    tmp = mkdtempSync(join(tmpdir(), 'tsvm-install-'));
    const tarballs = join(tmp, 'tarballs');
    mkdirSync(tarballs);
    // prepack builds each package's dist/ first
    await run('pnpm', ['-r', 'pack', '--pack-destination', tarballs], { cwd: repo, timeout: 240_000 });
    project = join(tmp, 'project');
    mkdirSync(project);
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'stranger', private: true, type: 'module' }));
    const files = readdirSync(tarballs).map((f) => join(tarballs, f));
    // vitest at the repository's own version: the stranger's test runner of choice.
    await run('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error', ...files, '@types/node@20', `vitest@${VITEST}`], { cwd: project, timeout: 240_000 });
  }, 420_000);

  afterAll(() => {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it('packs exactly the public packages, each with dist, LICENSE and README', () => {
    const names = readdirSync(join(project, 'node_modules/@tsvm')).map((n) => `@tsvm/${n}`).sort();
    expect(names).toEqual([...PUBLIC].sort());
    for (const name of PUBLIC) {
      const dir = join(project, 'node_modules', name);
      const entries = readdirSync(dir);
      expect(entries, name).toEqual(expect.arrayContaining(['dist', 'LICENSE', 'README.md', 'package.json']));
      expect(entries, name).not.toContain('src');
    }
  });

  it('a TypeScript file using the packages passes tsc --strict (declarations checked too)', async () => {
    writeFileSync(join(project, 'check.ts'), CHECK_TS);
    const r = await settle(process.execPath, [tsc, '--strict', '--noEmit', '--exactOptionalPropertyTypes', '--noUncheckedIndexedAccess',
      '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--lib', 'es2022,esnext.disposable', '--types', 'node', 'check.ts'],
      project, 120_000);
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
  }, 120_000);

  it('a plain-JS ESM script boots an inline-assembled guest and sees its output and stop', async (ctx) => {
    const kvm = kvmAvailability();
    if (!kvm.available) {
      process.stderr.write(`\n[tsvm] ***** SKIPPING THE INSTALLED GUEST BOOT: ${kvm.reason} *****\n\n`);
      ctx.skip();
    }
    writeFileSync(join(project, 'main.mjs'), MAIN_MJS);
    const r = await settle(process.execPath, ['main.mjs'], project, 60_000);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout.trim())).toEqual({ reason: 'debug-exit', code: 7, out: 'ok' }); // isa-debug-exit reports (3 << 1) | 1
  }, 60_000);

  it('a CommonJS script require()s the packages and runs a guest', async (ctx) => {
    const kvm = kvmAvailability();
    if (!kvm.available) {
      process.stderr.write(`\n[tsvm] ***** SKIPPING THE INSTALLED CJS BOOT: ${kvm.reason} *****\n\n`);
      ctx.skip();
    }
    writeFileSync(join(project, 'main.cjs'), MAIN_CJS);
    const r = await settle(process.execPath, ['main.cjs'], project, 60_000);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout.trim())).toEqual({ reason: 'halt' });
  }, 60_000);

  it('a vitest test in the stranger\'s project boots a guest and asserts its output and stop', async (ctx) => {
    const kvm = kvmAvailability();
    if (!kvm.available) {
      process.stderr.write(`\n[tsvm] ***** SKIPPING THE INSTALLED VITEST RUN: ${kvm.reason} *****\n\n`);
      ctx.skip();
    }
    writeFileSync(join(project, 'guest.test.ts'), GUEST_TEST);
    const r = await settle(process.execPath, [join(project, 'node_modules/vitest/vitest.mjs'), 'run', '--root', project, '--reporter', 'dot'], project, 120_000);
    expect(r.stdout + r.stderr).toMatch(/1 passed/);
    expect(r.status).toBe(0);
  }, 120_000);
});
