import { mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmAvailability } from '../testing/kvm-gate.js';
import { WorkerExitedError } from '../errors.js';
import { sharedBackendSettled } from '../backend/kvm.js';
import { MachineWorker } from './machine-worker.js';
import { MachinePool } from './pool.js';
import type KvmGuest from './fixtures/kvm-guest.js';
import type { KvmInit } from './fixtures/kvm-guest.js';

const kvm = kvmAvailability();
/** Scheduling policy and nice of one of this process's threads (fields 41 and 19 of its stat). */
const sched = (tid: number) => {
  const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { policy: Number(f[38]), nice: Number(f[16]) };
};
const tids = () => readdirSync('/proc/self/task').map(Number);
/** What this process holds of the kernel's that a machine worker makes: fds, mappings, POSIX timers, KVM's per-VM kernel threads. */
const holdings = () => {
  const links = readdirSync('/proc/self/fd').map((f) => { try { return readlinkSync(`/proc/self/fd/${f}`); } catch { return ''; } });
  const maps = readFileSync('/proc/self/maps', 'utf8').split('\n');
  const comms = tids().map((t) => { try { return readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim(); } catch { return ''; } });
  return {
    kvmFds: links.filter((l) => l === '/dev/kvm' || l.startsWith('anon_inode:kvm')).length,
    memfds: links.filter((l) => l.startsWith('/memfd:tsvm')).length,
    mappings: maps.filter((l) => l.includes('/memfd:tsvm') || l.includes('anon_inode:kvm')).length,
    timers: readFileSync('/proc/self/timers', 'utf8').split('\n').filter((l) => l.startsWith('ID:')).length,
    vmThreads: comms.filter((c) => c.startsWith('kvm-nx-lpage')).length,
  };
};
const module = new URL('./fixtures/kvm-guest.ts', import.meta.url);
const start = (program: KvmInit['program'], extra: Partial<Parameters<typeof MachineWorker.start>[0]> = {}) =>
  MachineWorker.start<typeof KvmGuest>({ module, init: { program }, ...extra });
const text = (w: { events: MachineWorker['events'] }) => {
  const out = { s: '' };
  w.events.on('console', (d) => { out.s += Buffer.from(d).toString('latin1'); });
  return out;
};

describe.skipIf(!kvm.available)(`machines in workers on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  let dir: string;
  beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'tsvm-threads-')); });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('runs a real guest in a worker: its console output arrives before its stop', async () => {
    await using w = await start('hello');
    const out = text(w);
    expect(await w.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
    expect(out.s).toBe('hello from a worker\n');
    expect((await w.stats()).total).toBeGreaterThanOrEqual(21);
  });

  it("isolation 'process': a real guest in a child process; SIGSEGV inside its KVM_RUN ends that process only, typed", async () => {
    await using w = await start('hello', { isolation: 'process' });
    const out = text(w);
    expect(await w.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
    expect(out.s).toBe('hello from a worker\n');
    expect(w.threadId).not.toBe(process.pid);
    await using s = await start('spin', { isolation: 'process' });
    const run = s.run({ timeout: 20_000, sliceMs: 500 }).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 300));
    // The child's only thread is inside KVM_RUN: a fault there is delivered as this signal.
    process.kill(s.threadId, 'SIGSEGV');
    expect(await run).toMatchObject({ how: 'signal', signal: 'SIGSEGV' });
    expect(await run).toBeInstanceOf(WorkerExitedError);
    // The other child (and this process) live on.
    expect((await w.stats()).total).toBeGreaterThanOrEqual(21);
  });

  it('a guest spinning in a worker at the caller\'s priority with 500 ms slices leaves the caller\'s timers on time', async () => {
    await using w = await start('spin', { nice: 0 });
    const h = monitorEventLoopDelay({ resolution: 1 });
    h.enable();
    // On the calling thread a 500 ms slice would hold the event loop ~500 ms at a time (p99 ≥ 500 ms).
    const stop = await w.run({ timeout: 2000, sliceMs: 500 });
    h.disable();
    expect(stop).toMatchObject({ reason: 'timeout', halted: false });
    expect(stop.exits).toBeLessThan(50); // it really spun: a few slice-end interrupts, no I/O
    // Generous (a shared, often overloaded 2-core host): far below one 500 ms slice.
    expect(h.percentile(99) / 1e6).toBeLessThan(100);
  });

  it('idle: the worker\'s OS thread storms at SCHED_IDLE while every thread that was there before (this one, V8\'s and libuv\'s helpers) stays normal; its slices end every 1 ms', async () => {
    const before = tids();
    await using w = await start('storm', { idle: true });
    const { tid } = await w.report();
    expect(before).not.toContain(tid);
    const run = w.run({ timeout: 300 });
    await new Promise((r) => setTimeout(r, 100));
    expect(sched(tid)).toEqual({ policy: 5, nice: 0 });
    for (const t of before) if (tids().includes(t)) expect(sched(t)).toEqual({ policy: 0, nice: 0 });
    expect((await run).reason).toBe('timeout');
    // nice > 0 is deprioritised too: 1 ms slices, each ended by the slice timer (an intr exit).
    await using n = await start('spin', { nice: 1 });
    const spin = await n.run({ timeout: 300 });
    expect(spin.reason).toBe('timeout');
    const slices = (await n.stats()).byKind.intr.count;
    expect(slices).toBeGreaterThan(40); // ~300 expected; at the default 10 ms, at most ~30
    expect(sched((await n.report()).tid)).toEqual({ policy: 0, nice: 1 });
    // With no priority option a worker's thread runs SCHED_IDLE.
    await using d = await start('hello');
    expect(sched((await d.report()).tid)).toEqual({ policy: 5, nice: 0 });
  });

  it('an exit storm in a worker is stopped by stop(); the caller kept its timers', async () => {
    await using w = await start('storm');
    let ticks = 0;
    const iv = setInterval(() => { ticks++; }, 10);
    const run = w.run({ timeout: 20_000 });
    await new Promise((r) => setTimeout(r, 500));
    w.stop();
    const stop = await run;
    clearInterval(iv);
    expect(stop.reason).toBe('aborted');
    expect(stop.exits).toBeGreaterThan(1000);
    expect(ticks).toBeGreaterThan(10); // ~50 expected over 0.5 s; on the calling thread the storm's 10 ms slices would still allow some
  });

  it('snapshot to a file in one worker, fork from it in another and in a pool: the guest goes on where it paused', async () => {
    const path = join(dir, 'pause.tsvm');
    {
      await using a = await start('pause');
      const out = text(a);
      expect(await a.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 0x141 });
      expect(out.s).toBe('A');
      const info = await a.snapshot(path);
      expect(info).toMatchObject({ path, memorySize: 2 << 20 });
      expect(statSync(path).size).toBe(info.fileBytes);
    }
    await using b = await start('pause', { snapshot: path });
    const out = text(b);
    expect(await b.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect(out.s).toBe('B');
    // Forked from a snapshot: reset takes it back to the pause, and it prints B again.
    expect((await b.reset()).pagesCopied).toBeGreaterThanOrEqual(0);
    expect(await b.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect(out.s).toBe('BB');
    // A pool forks every machine from the same file: each job goes on from the pause.
    await using pool = await MachinePool.create<typeof KvmGuest>({ module, init: { program: 'pause' }, size: 1, snapshot: path });
    for (let i = 0; i < 2; i++) {
      const m = await pool.acquire();
      let s = '';
      m.events.on('console', (d) => { s += Buffer.from(d).toString('latin1'); });
      expect(await m.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
      expect(s).toBe('B');
      await m.release();
    }
  });

  it('a worker gives back all it held of the kernel\'s however it ends: closed, terminated mid-spin (one vCPU, or two on runner threads), or exiting mid-run', async () => {
    await sharedBackendSettled();
    const before = holdings();
    const ends: Array<[KvmInit['program'] | 'smp spin', (w: MachineWorker) => Promise<unknown>]> = [
      ['hello', async (w) => { await w.run({ timeout: 10_000 }); await w.close(); }],
      ['spin', async (w) => {
        const run = w.run({ timeout: 20_000 }).catch((e: unknown) => e);
        await new Promise((r) => setTimeout(r, 100));
        await w.terminate();
        expect(await run).toBeInstanceOf(WorkerExitedError);
      }],
      // Two vCPUs on runner threads (each with its own slice timer), the worker terminated mid-run.
      ['smp spin', async (w) => {
        const run = w.run({ timeout: 20_000 }).catch((e: unknown) => e);
        await new Promise((r) => setTimeout(r, 100));
        expect(holdings().timers).toBeGreaterThanOrEqual(before.timers + 2);
        await w.terminate();
        expect(await run).toBeInstanceOf(WorkerExitedError);
      }],
      ['crash', async (w) => { expect(await w.run({ timeout: 10_000 }).catch((e: unknown) => e)).toBeInstanceOf(WorkerExitedError); await w.close(); }],
    ];
    for (const [program, end] of ends) {
      const w = program === 'smp spin' ? await MachineWorker.start<typeof KvmGuest>({ module, init: { program: 'spin', smp: true } }) : await start(program);
      const held = holdings();
      // The worker's machine is there while it lives (so the counts below can fail)…
      expect(held.kvmFds, program).toBeGreaterThan(before.kvmFds);
      expect(held.mappings, program).toBeGreaterThan(before.mappings);
      await end(w);
      // …and gone once its handle has seen the end.
      expect(holdings(), program).toEqual(before);
    }
  });

  it('terminating a worker inside a spin rejects the run with WorkerExitedError; the process and other machines go on', async () => {
    const w = await start('spin');
    const run = w.run({ timeout: 20_000 });
    await new Promise((r) => setTimeout(r, 200));
    await w.terminate();
    await expect(run).rejects.toMatchObject({ name: 'WorkerExitedError', how: 'terminated' });
    await using v = await start('hello');
    expect(await v.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
  });

  it('a worker exiting mid-run (process.exit from a device) rejects with WorkerExitedError; a pool replaces it', async () => {
    await using pool = await MachinePool.create<typeof KvmGuest>({ module, init: { program: 'crash' }, size: 1 });
    const a = await pool.acquire();
    const e = await a.run({ timeout: 10_000 }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(WorkerExitedError);
    expect(e).toMatchObject({ how: 'exit', exitCode: 9 });
    await a.release();
    const t0 = performance.now();
    while (pool.metrics().idle < 1) {
      if (performance.now() - t0 > 30_000) throw new Error('no replacement');
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(pool.metrics()).toMatchObject({ replaced: 1 });
    const b = await pool.acquire();
    expect(b.threadId).not.toBe(a.threadId);
    await b.release();
  });

  it('a pool of 2 forked machines: jobs run, release resets (dirty pages only), the same output every time', async () => {
    await using pool = await MachinePool.create<typeof KvmGuest>({ module, init: { program: 'job' }, size: 2 });
    const outputs: string[] = [];
    await Promise.all(Array.from({ length: 8 }, async () => {
      const m = await pool.acquire({ timeout: 30_000 });
      let s = '';
      m.events.on('console', (d) => { s += Buffer.from(d).toString('latin1'); });
      const stop = await m.run({ timeout: 10_000 });
      outputs.push(`${stop.reason}:${s}`);
      await m.release();
    }));
    expect(outputs).toEqual(Array(8).fill('debug-exit:ok\n'));
    expect(pool.metrics()).toMatchObject({ resets: 8, idle: 2, inUse: 0, waiting: 0 });
  });
});
