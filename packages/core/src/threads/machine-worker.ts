/**
 * `MachineWorker`: one machine in its own worker thread, driven through a typed handle.
 * Every call is a message answered by one result; stops and errors come back typed (see
 * `wire.ts`). When the worker dies — terminated, out of memory, `process.exit`, an uncaught
 * throw — every pending call rejects with a {@link WorkerExitedError} and so does every later one.
 * @module
 */
import { EventEmitter } from 'eventemitter3';
import { checkObject, show } from '../check.js';
import { InvalidArgumentError, StateError, WorkerExitedError } from '../errors.js';
import type { ResetResult } from '../snapshot/restore.js';
import type { ExitStats } from '../stats.js';
import type { Stop } from '../stop.js';
import type { BuilderAudit, BuilderInit, BuilderInput, BuilderReport, MachineBuilder } from './builder.js';
import type { FromWorker, Ops, SnapshotFileInfo, ToWorker } from './protocol.js';
import { moduleUrl, spawnWorker, type Carrier, type SpawnOptions } from './spawn.js';
import { decodeError, decodeStop, type WireStop } from './wire.js';

/** Options of {@link MachineWorker.start}. */
export interface MachineWorkerOptions<I = unknown> extends SpawnOptions {
  /** The machine module: a file path or `file:` URL (`.js`, or `.ts` when tsx is installed). */
  readonly module: string | URL;
  /** Name of the builder export (default `default`). */
  readonly export?: string;
  /** Passed to the builder (structured-cloned). */
  readonly init?: I;
  /** A snapshot file (`Machine.snapshot(path)`, `handle.snapshot(path)`): `ctx.snapshot()` loads it in the worker. */
  readonly snapshot?: string;
  /**
   * Build once from scratch, snapshot that in the worker's memory and build again with
   * `ctx.snapshot()` returning it, so the machine can `reset()`. Ignored with `snapshot`.
   */
  readonly template?: boolean;
  /** Milliseconds the worker may take to build its machine (default 60 000); then it is terminated. */
  readonly startTimeout?: number;
  /**
   * Console and audit batching and their bounds: flush after `flushMs` (default 5) or at
   * `chunkBytes` (64 KiB); drop console bytes beyond `limitBytes` (1 MiB) and audit entries beyond
   * `auditEntries` (10 000) buffered between flushes, and count them.
   */
  readonly console?: { readonly flushMs?: number; readonly chunkBytes?: number; readonly limitBytes?: number; readonly auditEntries?: number };
}

/** Options of {@link MachineWorker.run}; `P`: the builder's per-run input. */
export interface WorkerRunOptions<P = unknown> {
  /** As `Machine.run`'s `timeout` (milliseconds). */
  readonly timeout?: number;
  /** As `Machine.run`'s `sliceMs`. */
  readonly sliceMs?: number;
  /** Aborts the run (the stop is `aborted`), like {@link MachineWorker.stop}. */
  readonly signal?: AbortSignal;
  /**
   * The run's input, handed (structured-cloned) to the builder's `input()` in the worker just
   * before the guest runs — a job's sample, a request. A builder without `input()` refuses it
   * (`InvalidArgumentError`); a value structured clone cannot carry is refused here.
   */
  readonly input?: P;
}

/** Events of a {@link MachineWorker}: streams from the guest, and the worker's end. */
export interface MachineWorkerEvents<A = unknown> {
  /** Guest console bytes, batched; `dropped` counts bytes lost to the bound since the last batch. */
  console: [data: Uint8Array, dropped: number];
  /** Audit entries the builder streamed with `ctx.audit`, batched; `dropped` counts entries lost to the bound or to structured clone. */
  audit: [entries: readonly A[], dropped: number];
  /** The worker ended: `error` is set when it was not closed by `close()`. */
  exit: [error: WorkerExitedError | undefined];
}

interface Pending { resolve: (v: unknown) => void; reject: (e: unknown) => void }

const positive = (v: unknown, name: string, max = 2 ** 31): number | undefined => {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0 || v > max) throw new InvalidArgumentError(name, `must be an integer in [1, ${max}], got ${show(v)}`);
  return v;
};

/**
 * A machine living in a worker thread. `I`: the builder's `init`; `R`: its report; `A`: its
 * audit entries; `P`: its per-run input (infer them: `MachineWorker.start<typeof import('./guest.js').default>(...)`).
 */
export class MachineWorker<I = unknown, R = unknown, A = unknown, P = unknown> {
  /** `console`, `audit` and `exit` (see {@link MachineWorkerEvents}). */
  readonly events = new EventEmitter<MachineWorkerEvents<A>>();
  readonly #worker: Carrier;
  /** Kept: `worker.threadId` reads -1 once the worker has ended. */
  readonly #threadId: number;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #dead: WorkerExitedError | undefined;
  #closing: Promise<void> | undefined;
  #terminating = false;
  #lastError: unknown;
  #exited: Promise<void>;
  /** Type witness for `init` (never set). */
  declare readonly __init?: I;

  private constructor(worker: Carrier) {
    this.#worker = worker;
    this.#threadId = worker.id;
    this.#exited = new Promise((resolve) => worker.onExit(() => resolve()));
    worker.onMessage((m) => this.#onMessage(m as FromWorker));
    worker.onError((e) => { this.#lastError = e; });
    worker.onExit((code, signal) => this.#onExit(code, signal));
  }

  /**
   * Starts a worker, imports `module` in it and builds the machine with its builder. Resolves
   * when the machine exists; rejects with the builder's own error (typed as it was thrown), or a
   * {@link WorkerExitedError} when the worker died or did not finish within `startTimeout`.
   */
  static async start<B extends MachineBuilder<never, unknown, unknown, never> = MachineBuilder>(
    options: MachineWorkerOptions<BuilderInit<B>>,
  ): Promise<MachineWorker<BuilderInit<B>, BuilderReport<B>, BuilderAudit<B>, BuilderInput<B>>> {
    checkObject(options, 'options');
    const module = moduleUrl(options.module);
    const exportName = options.export ?? 'default';
    if (typeof exportName !== 'string' || exportName === '') throw new InvalidArgumentError('export', 'must be a non-empty string');
    if (options.snapshot !== undefined && (typeof options.snapshot !== 'string' || options.snapshot === '')) throw new InvalidArgumentError('snapshot', 'must be a file path');
    const startTimeout = positive(options.startTimeout, 'startTimeout') ?? 60_000;
    const isolation = options.isolation ?? 'thread';
    if (isolation !== 'thread' && isolation !== 'process') throw new InvalidArgumentError('isolation', `must be 'thread' or 'process', got ${show(isolation)}`);
    // SCHED_IDLE unless the options name a nice value (see SpawnOptions.idle).
    const idle = options.idle ?? options.nice === undefined;
    if (typeof idle !== 'boolean') throw new InvalidArgumentError('idle', `must be a boolean, got ${show(idle)}`);
    const nice = options.nice ?? 0;
    if (typeof nice !== 'number' || !Number.isInteger(nice) || nice < 0 || nice > 19) throw new InvalidArgumentError('nice', `must be an integer in [0, 19], got ${show(nice)}`);
    const c = options.console ?? {};
    const consoleFlushMs = positive(c.flushMs, 'console.flushMs', 1000) ?? 5;
    const consoleChunk = positive(c.chunkBytes, 'console.chunkBytes', 16 << 20) ?? 64 << 10;
    const consoleLimit = positive(c.limitBytes, 'console.limitBytes', 256 << 20) ?? 1 << 20;
    const auditLimit = positive(c.auditEntries, 'console.auditEntries', 1 << 24) ?? 10_000;
    try { structuredClone(options.init); } catch (e) {
      throw new InvalidArgumentError('init', `must be structured-cloneable (no functions, class instances lose their class): ${(e as Error).message}`);
    }
    const worker = spawnWorker({
      module, export: exportName, init: options.init, snapshotFile: options.snapshot,
      template: options.template === true && options.snapshot === undefined, nice, idle, consoleFlushMs, consoleChunk, consoleLimit, auditLimit,
    }, { ...options, isolation });
    const handle = new MachineWorker<BuilderInit<B>, BuilderReport<B>, BuilderAudit<B>, BuilderInput<B>>(worker);
    await handle.#ready(startTimeout);
    return handle;
  }

  #ready(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#lastError = new StateError(`the machine worker did not build its machine within ${timeoutMs} ms`);
        this.#terminating = true;
        void this.#worker.terminate();
      }, timeoutMs);
      this.#pending.set(0, {
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (e) => {
          clearTimeout(timer);
          if (!this.#dead) { this.#terminating = true; void this.#worker.terminate(); }
          reject(e);
        },
      });
    });
  }

  /** `threadId` of the worker (the child's pid with `isolation: 'process'`). */
  get threadId(): number {
    return this.#threadId;
  }

  /** Whether the worker is alive and not closing. */
  get alive(): boolean {
    return this.#dead === undefined && this.#closing === undefined;
  }

  /** Why the worker died, once it has (undefined while alive or after a clean `close()`). */
  get exitError(): WorkerExitedError | undefined {
    return this.#dead;
  }

  #onMessage(m: FromWorker): void {
    switch (m.t) {
      case 'console': this.events.emit('console', m.data, m.dropped); return;
      case 'audit': this.events.emit('audit', m.entries as readonly A[], m.dropped); return;
      case 'ready': this.#settle(0, true, undefined); return;
      case 'failed': this.#settle(0, false, decodeError(m.error)); return;
      case 'result': this.#settle(m.id, m.ok, m.ok ? m.value : decodeError(m.error)); return;
    }
  }

  #settle(id: number, ok: boolean, value: unknown): void {
    const p = this.#pending.get(id);
    if (!p) return;
    this.#pending.delete(id);
    if (ok) p.resolve(value); else p.reject(value);
  }

  #onExit(code: number, signal: string | undefined): void {
    const e = this.#lastError as { code?: unknown } | undefined;
    const clean = this.#closing !== undefined && this.#pending.size === 0;
    const how = this.#terminating && !clean ? 'terminated' : signal !== undefined ? 'signal' : e?.code === 'ERR_WORKER_OUT_OF_MEMORY' ? 'out-of-memory' : e !== undefined ? 'error' : 'exit';
    const error = clean ? undefined : new WorkerExitedError(this.#threadId, code, how, { ...(e === undefined ? {} : { cause: e }), ...(signal === undefined ? {} : { signal }) });
    this.#dead = error;
    for (const p of this.#pending.values()) p.reject(error ?? new StateError('the machine worker was closed'));
    this.#pending.clear();
    this.events.emit('exit', error);
  }

  #call<K extends keyof Ops>(op: K, args: Ops[K]['args']): Promise<Ops[K]['value']> {
    if (this.#dead) return Promise.reject(this.#dead);
    if (this.#closing && op !== 'close') return Promise.reject(new StateError('the machine worker is closed'));
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      try {
        this.#worker.post({ t: 'call', id, op, args } satisfies ToWorker);
      } catch (e) {
        // Only a caller's value can fail to clone: `run({ input })`'s.
        reject(new InvalidArgumentError('input', `must be structured-cloneable (no functions, class instances lose their class): ${(e as Error).message}`));
        return;
      }
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
    });
  }

  /**
   * Runs the guest in the worker until it stops (as `Machine.run`). Rejects with the worker's
   * typed error for misuse (already running) or a {@link WorkerExitedError} if the worker dies.
   */
  async run(options: WorkerRunOptions<P> = {}): Promise<Stop> {
    checkObject(options, 'options');
    const { signal, input, ...rest } = options;
    if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidArgumentError('signal', `must be an AbortSignal, got ${show(signal)}`);
    const withInput = 'input' in options;
    const onAbort = () => this.stop();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const p = this.#call('run', withInput ? { ...rest, withInput, input } : rest);
      if (signal?.aborted) this.stop();
      return decodeStop(await p as WireStop);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Asks a running guest to stop: the pending `run()` resolves with an `aborted` stop within a slice. */
  stop(): void {
    if (!this.#dead && this.#closing === undefined) this.#worker.post({ t: 'abort' } satisfies ToWorker);
  }

  /** Snapshots the (stopped) machine to `path` in the worker; the snapshot is not kept in memory. */
  async snapshot(path: string): Promise<SnapshotFileInfo> {
    if (typeof path !== 'string' || path === '') throw new InvalidArgumentError('path', 'must be a non-empty string');
    return this.#call('snapshot', { path });
  }

  /** `Machine.reset()` in the worker (the machine must come from a snapshot or a template). */
  async reset(options: { full?: boolean } = {}): Promise<ResetResult> {
    checkObject(options, 'options');
    return this.#call('reset', options.full === undefined ? {} : { full: options.full });
  }

  /** The builder's `report()` (undefined when it has none). */
  async report(): Promise<R> {
    return await this.#call('report', {}) as R;
  }

  /** The machine's exit counters. */
  async stats(): Promise<ExitStats> {
    return this.#call('stats', {});
  }

  /**
   * Closes the machine in the worker, then the worker. Idempotent. A worker that does not end
   * within `graceMs` (default 5000) of the request is terminated. Never rejects: a dead worker
   * is already closed.
   */
  close(graceMs = 5000): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#dead) return;
      this.stop();
      const grace = setTimeout(() => { void this.#worker.terminate(); }, graceMs);
      try {
        await this.#call('close', {});
      } catch { /* it died on the way out: closed either way */ }
      await Promise.race([this.#exited, new Promise((r) => setTimeout(r, 50))]);
      clearTimeout(grace);
      await this.#worker.terminate();
      await this.#exited;
    })();
    return this.#closing;
  }

  /** Ends the worker at once (no clean close): pending calls reject with a `terminated` {@link WorkerExitedError}. */
  async terminate(): Promise<void> {
    if (this.#dead || this.#closing) { await this.#exited; return; }
    this.#terminating = true;
    await this.#worker.terminate();
    await this.#exited;
  }

  /** `close()`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
