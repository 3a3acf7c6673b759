/**
 * Starting a machine worker, from the built JavaScript or from this monorepo's TypeScript sources:
 * a worker thread (the default), or a child process (`isolation: 'process'`) that contains what
 * a thread cannot — a native crash (`SIGSEGV` inside `KVM_RUN` or koffi) ends that process only.
 * Both speak the same messages (structured clone: the child's IPC channel uses V8 serialization)
 * through one {@link Carrier}.
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
import { readFileSync, stat } from 'node:fs';
import { dirname, extname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { spawn } from 'node:child_process';
import { Worker, type ResourceLimits } from 'node:worker_threads';
import { createLedger, releaseLedger } from '@tsvm/kvm-backend';
import { InvalidArgumentError } from '../errors.js';
import type { WorkerBoot } from './protocol.js';

const BOOTSTRAP = `
const { workerData } = require('node:worker_threads');
(async () => {
  if (workerData.tsx) { const m = await import(workerData.tsx); (m.register ?? m.default.register)(); }
  await import(workerData.entry);
})().catch((e) => { process.nextTick(() => { throw e; }); });
`;

/** The child process's bootstrap: its boot record is the first IPC message. */
const CHILD_BOOTSTRAP = `
process.once('message', (boot) => {
  globalThis[Symbol.for('tsvm.workerBoot')] = boot;
  (async () => {
    if (boot.tsx) { const m = await import(boot.tsx); (m.register ?? m.default.register)(); }
    await import(boot.entry);
  })().catch((e) => { process.nextTick(() => { throw e; }); });
});
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
   * Nice value of the worker's thread, 0–19 (lowering priority needs no privilege). Giving one
   * runs the thread as a normal one at that value instead of the default `SCHED_IDLE` (see
   * `idle`); `nice: 0` is the caller's own priority, a fair share for guests against the
   * caller's thread and other processes. A worker with a positive value runs slices of at most
   * 1 ms and yields the CPU between them (see `idle`).
   */
  readonly nice?: number;
  /**
   * Schedule the worker's thread `SCHED_IDLE` (Linux; no privilege needed). The default unless
   * `nice` is given; `idle: false` (without `nice`) runs it at the caller's priority. Linux
   * schedules threads, not processes: with more spinning guests than cores, workers at the
   * caller's priority take their fair share of the caller's core, and its event loop waited
   * p99 5.8–9.3 ms behind 8 of them on 2 cores (`bench:threads`); behind idle workers 0.7–1.9 ms,
   * also for a single guest, where nice 19 missed 2 ms (a waking normal thread preempts an idle
   * one at once and is placed on a CPU that runs only idle ones, which a niced thread does not
   * get). The price: guests get the CPU time normal threads leave (a share of about 3/1024 against
   * each busy normal thread, against 15/1024 at nice 19), so a host that is busy otherwise all
   * but stops them; pass `nice: 0` for batch work on such a host. `nice` is moot under it.
   * Linux's fair scheduler (EEVDF) gives a normal thread no strict precedence, though: a caller
   * that wakes with a little negative lag is not eligible yet, and a guest that never blocks
   * (an exit storm) would keep the CPU until the next scheduler tick (4 ms at HZ=250). So a
   * deprioritised worker runs slices of at most 1 ms (a smaller `sliceMs` is kept) and yields
   * the CPU between them: the caller waits about a millisecond, for one `sched_yield` and one
   * slice end per millisecond of guest time.
   */
  readonly idle?: boolean;
  /**
   * Where the machine lives: `'thread'` (default; a worker thread, cheap to start, shares the
   * process) or `'process'` (a child process: a native crash, the OOM killer or `process.abort()`
   * ends only it, and its handle rejects with a `WorkerExitedError` whose `how` is `signal`).
   * A child costs a Node start (~40–80 ms) and its own memory; with `resourceLimits`, its
   * `maxOldGenerationSizeMb` becomes `--max-old-space-size`.
   */
  readonly isolation?: 'thread' | 'process';
}

/** One end of a machine worker's channel: a worker thread or a child process, as the handle sees it. */
export interface Carrier {
  /** `threadId` of the worker thread, or the child's pid. */
  readonly id: number;
  /** Posts a message (structured clone). Throws when the value cannot be cloned. */
  post(message: unknown): void;
  /** Every message from the other side. */
  onMessage(listener: (message: unknown) => void): void;
  /** An error the carrier reports before it ends (an uncaught throw, out of memory). */
  onError(listener: (error: Error) => void): void;
  /** The end: exit code, and the signal that ended a child process. */
  onExit(listener: (code: number, signal: string | undefined) => void): void;
  /** Ends it at once. */
  terminate(): Promise<void>;
}

let threadPoolStarted = false;
/**
 * libuv starts its thread pool — one for the whole process, every thread's file system, DNS and
 * crypto work — on its first use, from the thread that uses it, and a new thread inherits its
 * creator's scheduling policy and nice value: a deprioritised worker that used it first would
 * leave the process's pool at its priority. So the caller's thread starts it (one `stat`).
 */
function startThreadPool(): void {
  if (threadPoolStarted) return;
  threadPoolStarted = true;
  stat(process.execPath, () => undefined);
}

/** Starts a machine worker for `boot` (whose `tsx` and `entry` this fills in). */
export function spawnWorker(boot: Omit<WorkerBoot, 'tsx' | 'entry'>, options: SpawnOptions): Carrier {
  const needsTs = TS.has(extname(fileURLToPath(entry))) || TS.has(extname(fileURLToPath(boot.module)));
  const tsx = needsTs ? findTsx([boot.module, here]) : undefined;
  if (needsTs && tsx === undefined) {
    throw new InvalidArgumentError('module', 'TypeScript must be loaded in the worker but tsx was not found from the module or @tsvm/core; install tsx or use built JavaScript');
  }
  if (options.isolation === 'process') return spawnChild({ ...boot, tsx, entry }, options);
  if (boot.idle || boot.nice > 0) startThreadPool();
  const ledger = createLedger();
  const data: WorkerBoot = { ...boot, tsx, entry, ledger };
  const worker = new Worker(BOOTSTRAP, {
    eval: true,
    workerData: data,
    ...(options.resourceLimits ? { resourceLimits: options.resourceLimits } : {}),
    ...(options.execArgv ? { execArgv: [...options.execArgv] } : {}),
  });
  // First of the exit listeners, so a handle that learns of the end finds it released: a worker
  // that was terminated or ran out of heap closed nothing of its own (fds and mappings are the
  // process's), and one that closed its machines may still hold its /dev/kvm fd and slice timer.
  worker.once('exit', () => { releaseLedger(ledger); });
  return {
    id: worker.threadId,
    post: (m) => worker.postMessage(m),
    onMessage: (l) => { worker.on('message', l); },
    onError: (l) => { worker.on('error', l); },
    onExit: (l) => { worker.on('exit', (code) => l(code, undefined)); },
    terminate: async () => { await worker.terminate(); },
  };
}

/** A child process running the worker entry; its stdout and stderr are the parent's. */
function spawnChild(data: WorkerBoot, options: SpawnOptions): Carrier {
  const heap = options.resourceLimits?.maxOldGenerationSizeMb;
  // The parent's own flags (e.g. `--import tsx`) are not needed: the bootstrap registers tsx itself.
  const execArgv = [...(options.execArgv ?? []), ...(heap !== undefined ? [`--max-old-space-size=${heap}`] : [])];
  const child = spawn(process.execPath, [...execArgv, '-e', CHILD_BOOTSTRAP], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'advanced' });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.send(data);
  return {
    id: child.pid ?? -1,
    post: (m) => {
      if (!child.connected) return; // it is ending; its exit rejects what waits
      child.send(m as never);
    },
    onMessage: (l) => { child.on('message', l); },
    onError: (l) => { child.on('error', l); },
    onExit: (l) => { child.on('exit', (code, signal) => l(code ?? -1, signal ?? undefined)); },
    terminate: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}
