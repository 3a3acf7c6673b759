import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, StateError, WorkerExitedError } from '../errors.js';
import { MachinePool, type MachinePoolOptions } from './pool.js';
import { PoolQueueFullError, PoolTimeoutError } from './errors.js';
import type MockGuest from './fixtures/mock-guest.js';
import type { MockInit } from './fixtures/mock-guest.js';

const module = new URL('./fixtures/mock-guest.ts', import.meta.url);
const create = (size: number, mode: MockInit['mode'] = 'hello', extra: Partial<MachinePoolOptions<MockInit>> = {}) =>
  MachinePool.create<typeof MockGuest>({ module, init: { mode }, size, ...extra });

async function until(cond: () => boolean, ms = 10_000): Promise<void> {
  const t0 = performance.now();
  while (!cond()) {
    if (performance.now() - t0 > ms) throw new Error('condition not reached');
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('MachinePool (mock backend in workers)', () => {
  it('acquire → run → release resets the machine; the next lease gets it back; metrics count', async () => {
    await using pool = await create(1);
    expect(pool.metrics()).toMatchObject({ size: 1, idle: 1, inUse: 0, waiting: 0, resets: 0 });
    const a = await pool.acquire();
    let text = '';
    a.events.on('console', (d) => { text += Buffer.from(d).toString('latin1'); });
    expect(await a.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
    expect(text).toBe('ok\n');
    expect(pool.metrics()).toMatchObject({ idle: 0, inUse: 1 });
    await a.release();
    expect(a.released).toBe(true);
    expect(pool.metrics()).toMatchObject({ idle: 1, inUse: 0, resets: 1 });
    const rate = pool.metrics().resetsPerSecond;
    expect(rate).toBeGreaterThan(0);
    expect(rate).toBeLessThanOrEqual(10); // one reset in a window of at least 100 ms
    const b = await pool.acquire();
    expect(b.threadId).toBe(a.threadId);
    expect(await b.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 7, exits: 4 });
    await b.release();
  });

  it('back-pressure: callers beyond the free machines wait in order; beyond maxWaiting they are refused; waiting times out', async () => {
    await using pool = await create(1, 'hello', { maxWaiting: 2, acquireTimeout: 5000 });
    const a = await pool.acquire();
    const order: string[] = [];
    const w1 = pool.acquire().then((m) => { order.push('w1'); return m; });
    const w2 = pool.acquire({ timeout: 150 });
    expect(pool.metrics().waiting).toBe(2);
    await expect(pool.acquire()).rejects.toBeInstanceOf(PoolQueueFullError);
    const t0 = performance.now();
    await expect(w2).rejects.toBeInstanceOf(PoolTimeoutError);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(100);
    expect(pool.metrics()).toMatchObject({ waiting: 1, timeouts: 1, rejected: 1 });
    await a.release();
    const m1 = await w1;
    expect(order).toEqual(['w1']);
    await m1.release();
    // An aborted wait rejects with the signal's reason and leaves the queue.
    const held = await pool.acquire();
    const ac = new AbortController();
    const w3 = pool.acquire({ signal: ac.signal });
    ac.abort(new Error('gave up'));
    await expect(w3).rejects.toThrow('gave up');
    expect(pool.metrics().waiting).toBe(0);
    await held.release();
  });

  it('a per-run input reaches the builder before the guest runs; release resets what it wrote; bad inputs are typed', async () => {
    await using pool = await create(1);
    const a = await pool.acquire();
    expect(await a.run({ timeout: 5000, input: { code: 42, mark: 0x5a } })).toMatchObject({ reason: 'debug-exit', code: 42 });
    expect(await a.report()).toMatchObject({ mark: 0x5a, input: { code: 42, mark: 0x5a } });
    // A throwing input() rejects that run, typed, and the guest does not run.
    await expect(a.run({ timeout: 5000, input: { refuse: true } })).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(await a.report()).toMatchObject({ runs: 1 });
    // A value structured clone cannot carry is refused at the caller, and the handle still works.
    await expect(a.run({ input: { code: 1, f: () => 1 } as never })).rejects.toBeInstanceOf(InvalidArgumentError);
    await a.release();
    const b = await pool.acquire();
    expect(b.threadId).toBe(a.threadId);
    // The reset put guest RAM back and the builder forgot the input: the next job starts clean.
    expect(await b.report()).toMatchObject({ mark: 0, input: undefined });
    expect(await b.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
    await b.release();
  });

  it("isolation 'process': a machine whose process dies of a native crash rejects its lease typed, and the pool replaces it", async () => {
    await using pool = await create(1, 'segv-on-run', { isolation: 'process' });
    const a = await pool.acquire();
    await expect(a.run({ timeout: 5000 })).rejects.toMatchObject({ how: 'signal', signal: 'SIGSEGV' });
    await a.release();
    await until(() => pool.metrics().replaced === 1 && pool.metrics().idle === 1);
    const b = await pool.acquire();
    expect(b.threadId).not.toBe(a.threadId);
    expect((await b.report() as { pid: number }).pid).toBe(b.threadId);
    await b.release();
  });

  it('misuse is typed: release twice, a machine of another pool, a closed pool, bad options', async () => {
    const p1 = await create(1);
    const p2 = await create(1);
    try {
      const m = await p1.acquire();
      await expect(p2.release(m as never)).rejects.toBeInstanceOf(InvalidArgumentError);
      await m.release();
      await expect(m.release()).rejects.toBeInstanceOf(StateError);
      await expect(m.run()).rejects.toBeInstanceOf(StateError); // a spent lease cannot run
      await expect(p1.release({} as never)).rejects.toBeInstanceOf(InvalidArgumentError);
      await expect(p1.acquire({ timeout: 0 })).rejects.toBeInstanceOf(InvalidArgumentError);
      await expect(MachinePool.create({ module, size: 0 })).rejects.toBeInstanceOf(InvalidArgumentError);
    } finally {
      await p1.close();
      await p2.close();
    }
    await expect(p1.acquire()).rejects.toBeInstanceOf(StateError);
    await p1.close(); // idempotent
  });

  it('closing the pool rejects its waiters with StateError', async () => {
    const pool = await create(1);
    const a = await pool.acquire();
    const w = expect(pool.acquire()).rejects.toBeInstanceOf(StateError);
    await pool.close();
    await w;
    await a.release(); // after close: quietly accepted
  });

  it('a worker that dies under a lease: the lease rejects with WorkerExitedError and the pool replaces the worker', async () => {
    await using pool = await create(1, 'exit-on-run');
    const a = await pool.acquire();
    const first = a.threadId;
    await expect(a.run({ timeout: 5000 })).rejects.toBeInstanceOf(WorkerExitedError);
    await a.release(); // accepted: the dead machine is already being replaced
    await until(() => pool.metrics().idle === 1);
    expect(pool.metrics()).toMatchObject({ replaced: 1, size: 1 });
    const b = await pool.acquire();
    expect(b.threadId).not.toBe(first);
    await b.release();
  });

  it('a lease released while its guest storms: release stops the run, resets, and the machine is free again', async () => {
    await using pool = await create(2, 'storm');
    const a = await pool.acquire();
    const runs = a.run({ timeout: 20_000 });
    a.stop();
    expect((await runs).reason).toBe('aborted');
    // A storming lease released mid-run: release stops it and resets; nothing leaks.
    const b = await pool.acquire();
    const r = b.run({ timeout: 20_000 }).catch((e: unknown) => e);
    await new Promise((res) => setTimeout(res, 50));
    await b.release();
    expect((await r as { reason?: string }).reason).toBe('aborted');
    await a.release();
    expect(pool.metrics()).toMatchObject({ idle: 2, resets: 2 });
  });

  it('a worker that dies and cannot be rebuilt is given up after maxRestarts; then acquire() is a StateError', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-pool-'));
    try {
      await using pool = await create(1, 'die-then-refuse', { maxRestarts: 1, init: { mode: 'die-then-refuse', marker: join(dir, 'died') } });
      const a = await pool.acquire();
      await expect(a.run({ timeout: 5000 })).rejects.toBeInstanceOf(WorkerExitedError);
      await until(() => pool.metrics().size === 0);
      expect(pool.metrics()).toMatchObject({ replaced: 0, idle: 0 });
      await expect(pool.acquire()).rejects.toThrow(/every machine of the pool died.*refused to rebuild/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a worker that keeps dying idle (not its guest\'s doing) is restarted with backoff, then given up after maxRestarts', async () => {
    await using pool = await create(1, 'exit-when-idle', { maxRestarts: 2 });
    const t0 = performance.now();
    await until(() => pool.metrics().size === 0);
    // Three deaths, backoff 100 + 200 ms between the restarts.
    expect(performance.now() - t0).toBeGreaterThanOrEqual(300);
    expect(pool.metrics().replaced).toBe(2);
    await expect(pool.acquire()).rejects.toThrow(/every machine of the pool died.*exit code 4/);
  });

  it('create() rejects with the builder error when a worker cannot build its machine', async () => {
    await expect(create(2, 'throw-on-build')).rejects.toMatchObject({ name: 'InvalidArgumentError', argument: 'init.mode' });
  });
});
