/**
 * Disposable vsock endpoints backed by forks of a snapshot: the {@link DisposableProvider} that
 * {@link VsockRouter.serveDisposable} asks for one machine per connection. Take a snapshot of a
 * guest that is set up and waiting for a connection; each `acquire` forks it (copy-on-write, so
 * the fork starts from exactly that state), starts it running and hands the router its vsock
 * device; `release` stops it and either closes it or — with `keep` — resets it to the snapshot
 * and keeps it for the next connection (a reset re-copies only the pages the last connection
 * dirtied). The snapshot is the caller's; it is never changed.
 * @module
 */
import { InvalidArgumentError, Machine, StateError, type Snapshot, type Stop } from '@tsvm/core';
import type { VirtioVsock } from '../virtio/vsock.js';
import type { DisposableLease, DisposableProvider } from './vsock-router.js';

/** Options of {@link forkEndpoint}. */
export interface ForkEndpointOptions {
  /** The template: a guest set up and waiting for its connection. */
  readonly snapshot: Snapshot;
  /**
   * Attaches the fork's devices (named as in the template, so their state comes from the
   * snapshot) and returns its vsock device. Called once per new machine (not after a reset).
   */
  readonly setup: (machine: Machine) => VirtioVsock;
  /** Machines kept after use, reset to the snapshot, for later connections. Default 0: each fork is closed. */
  readonly keep?: number;
  /** Longest a machine may run for one connection (then it stops and the connection is reset). Default 60 s. */
  readonly runTimeoutMs?: number;
  /** Told each time a machine stops (after its connection or on its own), for logs and tests. */
  readonly onStop?: (instance: string, stop: Stop) => void;
}

/** Counters of a {@link forkEndpoint}. */
export interface ForkEndpointStats {
  /** Machines forked. */
  forked: number;
  /** Machines reset into the pool after a connection. */
  reused: number;
  /** Machines closed. */
  closed: number;
  /** Machines running a connection now. */
  running: number;
}

/** A {@link DisposableProvider} that forks `snapshot`, plus `close()` for the pooled machines. */
export interface ForkEndpoint extends DisposableProvider {
  /** Counters. */
  readonly stats: ForkEndpointStats;
  /** Closes the machines kept in the pool (machines still serving close when released). Idempotent. */
  close(): Promise<void>;
}

interface Kept {
  readonly machine: Machine;
  readonly device: VirtioVsock;
}

/**
 * Serves a disposable endpoint with forks of `options.snapshot`.
 * @example
 * ```ts
 * const endpoint = forkEndpoint({ snapshot, setup: (m) => attachVsock(m, 5) });
 * router.serveDisposable(5, 'scanner', endpoint);   // each connection to CID 5: a fresh fork
 * ```
 */
export function forkEndpoint(options: ForkEndpointOptions): ForkEndpoint {
  const keep = options.keep ?? 0;
  if (!Number.isInteger(keep) || keep < 0) throw new InvalidArgumentError('keep', 'must be a non-negative integer');
  const runTimeoutMs = options.runTimeoutMs ?? 60_000;
  if (!(runTimeoutMs > 0)) throw new InvalidArgumentError('runTimeoutMs', 'must be a positive number of milliseconds');
  if (typeof options.setup !== 'function') throw new InvalidArgumentError('setup', 'must be a function returning the fork’s VirtioVsock');
  const pool: Kept[] = [];
  const stats: ForkEndpointStats = { forked: 0, reused: 0, closed: 0, running: 0 };
  let closed = false;

  const make = async (): Promise<Kept> => {
    let device: VirtioVsock | undefined;
    const machine = await Machine.fork(options.snapshot, { setup: (m) => { device = options.setup(m); } });
    if (device === undefined) {
      await machine.close();
      throw new StateError('forkEndpoint: setup returned no vsock device');
    }
    stats.forked++;
    return { machine, device };
  };

  const retire = async (k: Kept): Promise<void> => {
    if (!closed && pool.length < keep) {
      try {
        k.machine.reset();
        stats.reused++;
        pool.push(k);
        return;
      } catch { /* a machine that cannot reset is closed instead */ }
    }
    stats.closed++;
    await k.machine.close();
  };

  return {
    stats,
    async acquire(): Promise<DisposableLease> {
      if (closed) throw new StateError('forkEndpoint is closed');
      const k = pool.pop() ?? (await make());
      const stop = new AbortController();
      stats.running++;
      const run = k.machine.run({ signal: stop.signal, timeout: runTimeoutMs }).then((s) => {
        options.onStop?.(k.machine.name, s);
        return s;
      });
      let released = false;
      return {
        instance: k.machine.name,
        device: k.device,
        stopped: run.then((s) => `${s.reason}${s.reason === 'debug-exit' ? ` ${s.code}` : ''}`),
        async release(): Promise<void> {
          if (released) return;
          released = true;
          stop.abort();
          try { await run; } finally {
            stats.running--;
            await retire(k);
          }
        },
      };
    },
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      const all = pool.splice(0);
      stats.closed += all.length;
      await Promise.all(all.map((k) => k.machine.close()));
    },
  };
}
