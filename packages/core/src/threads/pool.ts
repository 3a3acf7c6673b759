/**
 * `MachinePool`: N machines, one per worker, each forked from one snapshot (a file, or a template
 * the builder makes once in each worker), handed out by `acquire()` and put back by `release()`,
 * which resets the machine to the snapshot (dirty pages only) before anyone else gets it.
 * Callers beyond the free machines wait in a bounded queue with a timeout (back-pressure); a
 * worker that dies is replaced, with bounded retries, and only its own lease sees the error.
 * @module
 */
import { EventEmitter } from 'eventemitter3';
import { checkObject, show } from '../check.js';
import { InvalidArgumentError, StateError, type WorkerExitedError } from '../errors.js';
import type { ExitStats } from '../stats.js';
import type { Stop } from '../stop.js';
import type { SnapshotFileInfo } from './protocol.js';
import type { BuilderAudit, BuilderInit, BuilderInput, BuilderReport, MachineBuilder } from './builder.js';
import { PoolQueueFullError, PoolTimeoutError } from './errors.js';
import { MachineWorker, type MachineWorkerEvents, type MachineWorkerOptions, type WorkerRunOptions } from './machine-worker.js';

/** Options of {@link MachinePool.create}. */
export interface MachinePoolOptions<I = unknown> extends Omit<MachineWorkerOptions<I>, 'template'> {
  /** Machines (= workers) in the pool, 1–256. */
  readonly size: number;
  /** Callers that may wait for a machine (default 64); one more gets a {@link PoolQueueFullError}. */
  readonly maxWaiting?: number;
  /** Milliseconds `acquire()` waits by default (default 30 000), then a {@link PoolTimeoutError}. */
  readonly acquireTimeout?: number;
  /** Failed starts in a row after which a dead worker's slot is given up (default 3). */
  readonly maxRestarts?: number;
}

/** Options of {@link MachinePool.acquire}. */
export interface AcquireOptions {
  /** Milliseconds to wait (default: the pool's `acquireTimeout`). */
  readonly timeout?: number;
  /** Gives up waiting (rejects with the signal's reason). */
  readonly signal?: AbortSignal;
}

/** A pool's counters. */
export interface PoolMetrics {
  /** Slots (machines the pool keeps, alive or being replaced). */
  readonly size: number;
  /** Machines free now. */
  readonly idle: number;
  /** Machines leased now. */
  readonly inUse: number;
  /** Machines being reset after a release. */
  readonly resetting: number;
  /** Workers starting (initially or as replacements). */
  readonly starting: number;
  /** Callers waiting in `acquire()`. */
  readonly waiting: number;
  /** Resets done since creation. */
  readonly resets: number;
  /** Resets per second over the last 10 s (or the pool's life, if shorter). */
  readonly resetsPerSecond: number;
  /** Workers replaced after they died or failed to reset. */
  readonly replaced: number;
  /** `acquire()` calls that timed out. */
  readonly timeouts: number;
  /** `acquire()` calls refused because the queue was full. */
  readonly rejected: number;
}

/** 100 ms buckets of the resets/s window (10 s). */
const RATE_BUCKETS = 100;

type SlotState = 'starting' | 'idle' | 'leased' | 'resetting' | 'dead';
interface Slot<I, R, A, P> { handle: MachineWorker<I, R, A, P> | undefined; state: SlotState; lease: PooledMachine<I, R, A, P> | undefined; failures: number }
interface Waiter<I, R, A, P> { resolve: (m: PooledMachine<I, R, A, P>) => void; reject: (e: unknown) => void; done: () => void }

const checkCount = (v: unknown, name: string, min: number, max: number, dflt: number): number => {
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new InvalidArgumentError(name, `must be an integer in [${min}, ${max}], got ${show(v)}`);
  return v;
};

/** A machine leased from a {@link MachinePool}; valid until {@link PooledMachine.release}. */
export class PooledMachine<I = unknown, R = unknown, A = unknown, P = unknown> {
  /** `console`, `audit` and `exit` of this lease only. */
  readonly events = new EventEmitter<MachineWorkerEvents<A>>();
  readonly #pool: MachinePool<I, R, A, P>;
  readonly #handle: MachineWorker<I, R, A, P>;
  #released = false;
  /** @internal the run in flight, awaited by release before the reset. */
  running: Promise<unknown> | undefined;

  /** @internal leases come from `acquire()`. */
  constructor(pool: MachinePool<I, R, A, P>, handle: MachineWorker<I, R, A, P>) {
    this.#pool = pool;
    this.#handle = handle;
  }

  /** The pool this machine belongs to. */
  get pool(): MachinePool<I, R, A, P> {
    return this.#pool;
  }

  /** Whether `release()` was called. */
  get released(): boolean {
    return this.#released;
  }

  /** `threadId` of the machine's worker. */
  get threadId(): number {
    return this.#handle.threadId;
  }

  #live(): MachineWorker<I, R, A, P> {
    if (this.#released) throw new StateError('the pooled machine was released');
    return this.#handle;
  }

  /** @internal marks the lease spent; returns false when it already was. */
  spend(): boolean {
    if (this.#released) return false;
    this.#released = true;
    return true;
  }

  /** Runs the guest (as {@link MachineWorker.run}; `input` goes to the builder's `input()` first). */
  async run(options: WorkerRunOptions<P> = {}): Promise<Stop> {
    const p = this.#live().run(options);
    this.running = p;
    try { return await p; } finally { if (this.running === p) this.running = undefined; }
  }

  /** Stops a running guest (as {@link MachineWorker.stop}). */
  stop(): void {
    if (!this.#released) this.#handle.stop();
  }

  /** Snapshots the machine to a file in its worker (as {@link MachineWorker.snapshot}). */
  async snapshot(path: string): Promise<SnapshotFileInfo> {
    return this.#live().snapshot(path);
  }

  /** The builder's report. */
  async report(): Promise<R> {
    return this.#live().report();
  }

  /** The machine's exit counters. */
  async stats(): Promise<ExitStats> {
    return this.#live().stats();
  }

  /** Gives the machine back: `pool.release(this)`. */
  release(): Promise<void> {
    return this.#pool.release(this);
  }
}

/**
 * N machines in N workers, forked from one snapshot. `I`, `R`, `A`, `P`: the builder's init,
 * report, audit and per-run input types (infer them: `MachinePool.create<typeof import('./guest.js').default>(...)`).
 */
export class MachinePool<I = unknown, R = unknown, A = unknown, P = unknown> {
  readonly #options: MachinePoolOptions<I>;
  readonly #slots: Slot<I, R, A, P>[] = [];
  readonly #waiters: Waiter<I, R, A, P>[] = [];
  readonly #leases = new WeakMap<PooledMachine<I, R, A, P>, Slot<I, R, A, P>>();
  readonly #maxWaiting: number;
  readonly #acquireTimeout: number;
  readonly #maxRestarts: number;
  readonly #t0 = performance.now();
  /** Resets per 100 ms, for the last 10 s (a ring indexed by the 100 ms tick). */
  readonly #buckets = Array.from({ length: RATE_BUCKETS }, () => ({ tick: -1, count: 0 }));
  #closed = false;
  #closing: Promise<void> | undefined;
  #lastError: unknown;
  #resets = 0;
  #replaced = 0;
  #timeouts = 0;
  #rejected = 0;

  private constructor(options: MachinePoolOptions<I>, maxWaiting: number, acquireTimeout: number, maxRestarts: number) {
    this.#options = options;
    this.#maxWaiting = maxWaiting;
    this.#acquireTimeout = acquireTimeout;
    this.#maxRestarts = maxRestarts;
  }

  /**
   * Starts `size` workers and builds their machines (in parallel). Rejects with the first
   * builder error (typed) or {@link WorkerExitedError} after closing the workers that did start.
   */
  static async create<B extends MachineBuilder<never, unknown, unknown, never> = MachineBuilder>(
    options: MachinePoolOptions<BuilderInit<B>>,
  ): Promise<MachinePool<BuilderInit<B>, BuilderReport<B>, BuilderAudit<B>, BuilderInput<B>>> {
    checkObject(options, 'options');
    const size = checkCount(options.size, 'size', 1, 256, 0);
    const maxWaiting = checkCount(options.maxWaiting, 'maxWaiting', 0, 1 << 20, 64);
    const acquireTimeout = checkCount(options.acquireTimeout, 'acquireTimeout', 1, 2 ** 31, 30_000);
    const maxRestarts = checkCount(options.maxRestarts, 'maxRestarts', 0, 1000, 3);
    const pool = new MachinePool<BuilderInit<B>, BuilderReport<B>, BuilderAudit<B>, BuilderInput<B>>(options, maxWaiting, acquireTimeout, maxRestarts);
    const starts: Array<Promise<unknown>> = [];
    for (let i = 0; i < size; i++) {
      const slot: Slot<BuilderInit<B>, BuilderReport<B>, BuilderAudit<B>, BuilderInput<B>> = { handle: undefined, state: 'starting', lease: undefined, failures: 0 };
      pool.#slots.push(slot);
      starts.push(pool.#spawn(slot));
    }
    const results = await Promise.allSettled(starts);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await pool.close();
      throw failed.reason;
    }
    return pool;
  }

  /** Starts the worker of `slot`; resolves when its machine is idle. */
  async #spawn(slot: Slot<I, R, A, P>): Promise<void> {
    slot.state = 'starting';
    slot.handle = undefined;
    const { size: _s, maxWaiting: _w, acquireTimeout: _a, maxRestarts: _r, ...rest } = this.#options;
    const handle = await MachineWorker.start<MachineBuilder<I, R, A, P>>({ ...rest, template: rest.snapshot === undefined }) as unknown as MachineWorker<I, R, A, P>;
    if (this.#closed) { await handle.close(); return; }
    slot.handle = handle;
    handle.events.on('console', (d, n) => slot.lease?.events.emit('console', d, n));
    handle.events.on('audit', (e, n) => slot.lease?.events.emit('audit', e as readonly A[], n));
    handle.events.on('exit', (e) => this.#onDeath(slot, handle, e));
    this.#toIdle(slot);
  }

  #onDeath(slot: Slot<I, R, A, P>, handle: MachineWorker<I, R, A, P>, error: WorkerExitedError | undefined): void {
    if (slot.handle !== handle) return;
    // A worker that dies under a lease died of its guest (the pool's job is to absorb that); one
    // that dies idle or in its reset is the pool's own failure, and counts toward maxRestarts.
    if (slot.state === 'idle' || slot.state === 'resetting') slot.failures++;
    slot.lease?.events.emit('exit', error);
    this.#lastError = error;
    slot.lease = undefined;
    slot.handle = undefined;
    this.#replace(slot);
  }

  /** Replaces a slot's worker, backing off after failures; gives the slot up after `maxRestarts`. */
  #replace(slot: Slot<I, R, A, P>): void {
    if (this.#closed || slot.failures > this.#maxRestarts) { slot.state = 'dead'; this.#failWaitersIfEmpty(); return; }
    slot.state = 'starting';
    const delay = slot.failures === 0 ? 0 : Math.min(5000, 100 * 2 ** (slot.failures - 1));
    setTimeout(() => {
      if (this.#closed) { slot.state = 'dead'; return; }
      this.#spawn(slot).then(() => { this.#replaced++; }, (e: unknown) => {
        this.#lastError = e;
        slot.failures++;
        this.#replace(slot);
      });
    }, delay).unref();
  }

  #allDead(): StateError {
    const last = this.#lastError instanceof Error ? `: ${this.#lastError.message}` : '';
    return new StateError(`every machine of the pool died and could not be replaced${last}`);
  }

  #failWaitersIfEmpty(): void {
    if (this.#slots.some((s) => s.state !== 'dead')) return;
    const e = this.#allDead();
    for (const w of this.#waiters.splice(0)) { w.done(); w.reject(e); }
  }

  #toIdle(slot: Slot<I, R, A, P>): void {
    slot.lease = undefined;
    slot.state = 'idle';
    const w = this.#waiters.shift();
    if (w) { w.done(); w.resolve(this.#lease(slot)); }
  }

  #lease(slot: Slot<I, R, A, P>): PooledMachine<I, R, A, P> {
    const lease = new PooledMachine<I, R, A, P>(this, slot.handle as MachineWorker<I, R, A, P>);
    slot.state = 'leased';
    slot.lease = lease;
    this.#leases.set(lease, slot);
    return lease;
  }

  /**
   * A free machine, at once or when one is released. Rejects with {@link PoolQueueFullError} when
   * `maxWaiting` callers already wait, {@link PoolTimeoutError} after `timeout`, `StateError` on a
   * closed pool (or one whose every machine died and could not be replaced).
   */
  acquire(options: AcquireOptions = {}): Promise<PooledMachine<I, R, A, P>> {
    try {
      checkObject(options, 'options');
      if (this.#closed) throw new StateError('the machine pool is closed');
      const timeout = checkCount(options.timeout, 'timeout', 1, 2 ** 31, this.#acquireTimeout);
      const signal = options.signal;
      if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidArgumentError('signal', `must be an AbortSignal, got ${show(signal)}`);
      signal?.throwIfAborted();
      if (this.#slots.every((s) => s.state === 'dead')) throw this.#allDead();
      const free = this.#slots.find((s) => s.state === 'idle');
      if (free) return Promise.resolve(this.#lease(free));
      if (this.#waiters.length >= this.#maxWaiting) { this.#rejected++; throw new PoolQueueFullError(this.#maxWaiting); }
      return new Promise<PooledMachine<I, R, A, P>>((resolve, reject) => {
        const onAbort = () => { remove(); reject(signal?.reason); };
        const timer = setTimeout(() => { remove(); this.#timeouts++; reject(new PoolTimeoutError(timeout)); }, timeout);
        const w: Waiter<I, R, A, P> = { resolve, reject, done: () => { clearTimeout(timer); signal?.removeEventListener('abort', onAbort); } };
        const remove = () => { w.done(); const i = this.#waiters.indexOf(w); if (i >= 0) this.#waiters.splice(i, 1); };
        signal?.addEventListener('abort', onAbort, { once: true });
        this.#waiters.push(w);
      });
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Puts a leased machine back: stops it if it runs, resets it to the snapshot and hands it to
   * the next waiter. Resolves once it is free again (or being replaced, if its worker died or the
   * reset failed). Rejects with `StateError` for a lease released before and
   * `InvalidArgumentError` for a machine of another pool.
   */
  async release(machine: PooledMachine<I, R, A, P>): Promise<void> {
    const slot = machine instanceof PooledMachine ? this.#leases.get(machine) : undefined;
    if (!slot) throw new InvalidArgumentError('machine', machine instanceof PooledMachine ? 'belongs to another pool' : `must be a PooledMachine, got ${show(machine)}`);
    if (!machine.spend()) throw new StateError('the pooled machine was already released');
    if (this.#closed || slot.lease !== machine) return; // its worker died; the slot is already being replaced
    const handle = slot.handle as MachineWorker<I, R, A, P>;
    slot.lease = undefined;
    slot.state = 'resetting';
    if (machine.running) { handle.stop(); await machine.running.catch(() => undefined); }
    if (slot.handle !== handle) return;
    try {
      await handle.reset();
    } catch (e) {
      if (slot.handle !== handle) return; // died during the reset: #onDeath replaces it
      this.#lastError = e;
      slot.handle = undefined;
      await handle.terminate();
      slot.failures++;
      this.#replace(slot);
      return;
    }
    this.#countReset();
    slot.failures = 0;
    if (this.#closed) return;
    this.#toIdle(slot);
  }

  #countReset(): void {
    this.#resets++;
    const tick = Math.floor(performance.now() / 100);
    const b = this.#buckets[tick % RATE_BUCKETS] as { tick: number; count: number };
    if (b.tick !== tick) { b.tick = tick; b.count = 0; }
    b.count++;
  }

  /** The pool's counters now. */
  metrics(): PoolMetrics {
    const count = (s: SlotState) => this.#slots.filter((x) => x.state === s).length;
    const now = performance.now();
    const tick = Math.floor(now / 100);
    let recent = 0;
    for (const b of this.#buckets) if (b.tick > tick - RATE_BUCKETS) recent += b.count;
    // The window is the last 10 s, or the pool's life when shorter (at least 100 ms).
    const windowS = Math.max(0.1, Math.min(RATE_BUCKETS / 10, (now - this.#t0) / 1000));
    return {
      size: this.#slots.filter((s) => s.state !== 'dead').length,
      idle: count('idle'), inUse: count('leased'), resetting: count('resetting'), starting: count('starting'),
      waiting: this.#waiters.length, resets: this.#resets, resetsPerSecond: recent / windowS,
      replaced: this.#replaced, timeouts: this.#timeouts, rejected: this.#rejected,
    };
  }

  /**
   * Closes every machine and worker; waiting callers reject with `StateError`, leased machines'
   * pending calls with a `WorkerExitedError`. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#closed = true;
      const e = new StateError('the machine pool is closed');
      for (const w of this.#waiters.splice(0)) { w.done(); w.reject(e); }
      await Promise.all(this.#slots.map(async (s) => {
        const h = s.handle;
        s.state = 'dead';
        s.handle = undefined;
        const leased = s.lease !== undefined;
        s.lease = undefined;
        if (h) await (leased ? h.terminate() : h.close());
      }));
    })();
    return this.#closing;
  }

  /** `close()`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
