/**
 * Starting a machine worker, from the built JavaScript or from this monorepo's TypeScript sources.
 *
 * Node 20 does not apply `--import tsx` to a worker's *entry* module (the worker fails with
 * `ERR_UNKNOWN_FILE_EXTENSION`), so every worker starts from a tiny JavaScript bootstrap (an
 * `eval` worker) that registers tsx's loader first when anything it must import is TypeScript —
 * the worker entry itself when this file runs from source (vitest, tsx), or the user's machine
 * module — and then imports the entry. tsx is looked up from the machine module's directory
 * first, then from this package; from the built `dist` with a JavaScript module, tsx is not needed.
 * @module
 */
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { dirname, extname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker, type ResourceLimits } from 'node:worker_threads';
import { InvalidArgumentError } from '../errors.js';
import type { WorkerBoot } from './protocol.js';

const BOOTSTRAP = `
const { workerData } = require('node:worker_threads');
(async () => {
  if (workerData.tsx) { const m = await import(workerData.tsx); (m.register ?? m.default.register)(); }
  await import(workerData.entry);
})().catch((e) => { process.nextTick(() => { throw e; }); });
`;

const TS = new Set(['.ts', '.mts', '.cts', '.tsx']);
const here = import.meta.url;
/** The worker entry beside this module, with this module's own extension (`.ts` from source, `.js` built). */
const entry = new URL(`./worker-main${extname(fileURLToPath(here))}`, here).href;

/** Turns a module path or URL into a `file:` URL string, checking its type. */
export function moduleUrl(module: string | URL, argument = 'module'): string {
  if (module instanceof URL) return module.href;
  if (typeof module !== 'string' || module === '') throw new InvalidArgumentError(argument, 'must be a file path or a file: URL');
  if (/^[a-z][a-z0-9+.-]*:/i.test(module) && !module.startsWith('file:')) throw new InvalidArgumentError(argument, `only file: URLs can be loaded in a worker, got ${module}`);
  return module.startsWith('file:') ? module : pathToFileURL(module).href;
}

/**
 * tsx's ESM API (`tsx/esm/api`, the `import` condition) as a file URL, found from the first base
 * that has tsx. `createRequire` resolves the `require` condition, whose `register` is the
 * CommonJS one, so the ESM file is read from tsx's own `exports` map.
 */
function findTsx(from: readonly string[]): string | undefined {
  for (const base of from) {
    try {
      const pkgPath = createRequire(base).resolve('tsx/package.json');
      const pkg = JSON.parse(readFileSync(pkgPath, 'utf8')) as { exports?: Record<string, { import?: { default?: string } | string }> };
      const api = pkg.exports?.['./esm/api']?.import;
      const rel = typeof api === 'string' ? api : api?.default;
      if (rel !== undefined) return pathToFileURL(join(dirname(pkgPath), rel)).href;
    } catch { /* try the next */ }
  }
  return undefined;
}

/** Options that shape the worker thread itself. */
export interface SpawnOptions {
  /** V8 heap limits of the worker (`maxOldGenerationSizeMb`, ...): a guest's host-side leak ends that worker, not the process. */
  readonly resourceLimits?: ResourceLimits;
  /** Node flags of the worker (default: the process's own). */
  readonly execArgv?: readonly string[];
  /**
   * Nice value of the worker's thread, 0–19 (default 0; only lowering priority needs no
   * privilege). Linux schedules threads, not processes: with more spinning guests than cores, a
   * positive value keeps the calling thread's wake-ups prompt (measured in `bench:threads`).
   */
  readonly nice?: number;
}

/** Starts a worker for `boot` (whose `tsx` and `entry` this fills in). */
export function spawnWorker(boot: Omit<WorkerBoot, 'tsx' | 'entry'>, options: SpawnOptions): Worker {
  const needsTs = TS.has(extname(fileURLToPath(entry))) || TS.has(extname(fileURLToPath(boot.module)));
  const tsx = needsTs ? findTsx([boot.module, here]) : undefined;
  if (needsTs && tsx === undefined) {
    throw new InvalidArgumentError('module', 'TypeScript must be loaded in the worker but tsx was not found from the module or @tsvm/core; install tsx or use built JavaScript');
  }
  const data: WorkerBoot = { ...boot, tsx, entry };
  return new Worker(BOOTSTRAP, {
    eval: true,
    workerData: data,
    ...(options.resourceLimits ? { resourceLimits: options.resourceLimits } : {}),
    ...(options.execArgv ? { execArgv: [...options.execArgv] } : {}),
  });
}
