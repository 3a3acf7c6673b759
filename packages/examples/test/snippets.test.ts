/**
 * Every TypeScript snippet in README.md, the package READMEs and the guides (`docs/guides/*.md`)
 * typechecks as written (strict, like the repository). Snippets are written to `packages/examples/.snippets/` (git-ignored) so
 * `@tsvm/*` resolves through the workspace; each becomes a module of its own so top-level
 * `await` and `await using` work. A block fenced as ```ts no-check is shown but not checked; one
 * fenced as ```ts run (or ```js run) boots a guest and is also run as written (`node --import tsx`:
 * the workspace resolves `@tsvm/*` to sources), where `/dev/kvm` works: it must exit 0 with nothing on stderr.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { kvmAvailability } from '@tsvm/core/testing';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const dir = join(repo, 'packages/examples/.snippets');
const run = promisify(execFile);

/** One fenced block: where it is and its code. */
export interface Snippet { readonly file: string; readonly line: number; readonly lang: string; readonly code: string; readonly run?: true }

/** The fenced ```ts / ```js blocks of a Markdown text, with the line each starts on. */
export function extractSnippets(file: string, text: string): Snippet[] {
  const out: Snippet[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(ts|typescript|js|javascript)(\s+no-check|\s+run)?\s*$/.exec(lines[i] ?? '');
    if (!open) continue;
    const start = i + 1;
    let end = start;
    while (end < lines.length && !/^```\s*$/.test(lines[end] ?? '')) end++;
    const mode = open[2]?.trim();
    if (mode !== 'no-check') out.push({ file, line: start + 1, lang: open[1]?.startsWith('t') ? 'ts' : 'js', code: lines.slice(start, end).join('\n'), ...(mode === 'run' ? { run: true as const } : {}) });
    i = end;
  }
  return out;
}

const readmes = ['README.md', ...readdirSync(join(repo, 'packages')).map((p) => `packages/${p}/README.md`),
  ...readdirSync(join(repo, 'docs/guides')).filter((f) => f.endsWith('.md')).map((f) => `docs/guides/${f}`)]
  .filter((f) => { try { readFileSync(join(repo, f)); return true; } catch { return false; } });
const snippets = readmes.flatMap((f) => extractSnippets(f, readFileSync(join(repo, f), 'utf8')));

describe('README snippets', () => {
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('extracts fenced blocks with their starting line', () => {
    expect(extractSnippets('x.md', 'a\n```ts\nlet x = 1;\n```\n```ts no-check\nnope\n```\n```js\nf()\n```\n```ts run\ng()\n```\n'))
      .toEqual([{ file: 'x.md', line: 3, lang: 'ts', code: 'let x = 1;' }, { file: 'x.md', line: 9, lang: 'js', code: 'f()' }, { file: 'x.md', line: 12, lang: 'ts', code: 'g()', run: true }]);
  });

  it('every ts/js snippet typechecks as written', async () => {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    const names = new Map<string, Snippet>();
    for (const s of snippets) {
      const name = `${s.file.replace(/[/.]/g, '_')}_L${s.line}.${s.lang === 'ts' ? 'ts' : 'mjs'}`;
      names.set(name, s);
      // `export {}` makes each block a module (top-level await); JS is checked with checkJs.
      writeFileSync(join(dir, name), `${s.code}\nexport {};\n`);
    }
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify({
      extends: '../../../tsconfig.base.json',
      compilerOptions: { noEmit: true, allowJs: true, checkJs: true, noUnusedLocals: false, declaration: false, sourceMap: false },
      include: ['*.ts', '*.mjs'],
    }));
    let output = '';
    try {
      await run(process.execPath, [join(repo, 'node_modules/typescript/bin/tsc'), '-p', dir], { cwd: dir, timeout: 120_000 });
    } catch (e) {
      output = String((e as { stdout?: string }).stdout ?? e);
    }
    // Point each error at the README line it came from.
    const located = output.replace(/^(\S+?\.(?:ts|mjs))\((\d+),(\d+)\)/gm, (m, f: string, l: string, c: string) => {
      const s = names.get(relative(dir, join(dir, f)));
      return s ? `${s.file}:${s.line + Number(l) - 1}:${c}` : m;
    });
    expect(located).toBe('');
  }, 120_000);

  const runnable = snippets.filter((x) => x.run);
  it('there are snippets marked to run (the quickstarts)', () => {
    expect(runnable.length).toBeGreaterThanOrEqual(2);
  });

  const kvm = kvmAvailability();
  if (!kvm.available) process.stderr.write(`\n[tsvm] ***** SKIPPING THE RUNNABLE README SNIPPETS: ${kvm.reason} *****\n\n`);
  it.skipIf(!kvm.available).each(runnable.map((x) => [`${x.file}:${x.line}`, x] as const))('%s runs as written: exit 0, nothing on stderr', async (_where, x) => {
    mkdirSync(dir, { recursive: true });
    const file = join(dir, `run_${x.file.replace(/[/.]/g, '_')}_L${x.line}.${x.lang === 'ts' ? 'ts' : 'mjs'}`);
    writeFileSync(file, `${x.code}\n`);
    // JavaScript too goes through tsx: in the workspace `@tsvm/*` resolves to TypeScript sources
    // (the install test runs JS against the built packages).
    const args = ['--import', 'tsx', file];
    let status = 0, stderr = '';
    try {
      await run(process.execPath, args, { cwd: dir, timeout: 60_000 });
    } catch (e) {
      const err = e as { code?: number; stderr?: string };
      status = typeof err.code === 'number' ? err.code : -1;
      stderr = err.stderr ?? String(e);
    }
    expect(stderr).toBe('');
    expect(status).toBe(0);
  }, 60_000);
});
