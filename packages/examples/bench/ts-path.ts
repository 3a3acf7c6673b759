/**
 * The TypeScript part of one exit, without KVM (runs on any machine): `Machine.run` on the
 * `MockBackend` (`@tsvm/core/testing`) with and without a `Monitor` holding one allowing mediate
 * hook, plus — because the mock has neither — the decode of `kvm_run` and one koffi `ioctl` on a
 * cheap fd. Then each part alone, so the sum can be held against the whole:
 *
 * | part | what runs |
 * |---|---|
 * | `mockRun` | `MockVcpu.run()` (subtracted: KVM's side replaces it) |
 * | `ffiIoctl` | `ioctl(/dev/null, TCGETS)` through koffi (ENOTTY): the FFI call plus the syscall |
 * | `cIoctl` | the same ioctl from C (`bench/syscall.c`): the kernel's share, which the C exit loop pays too |
 * | `decode` | kvm-backend's `decodeExit` over a fabricated `kvm_run` page (`@tsvm/kvm-backend/raw`) |
 * | `counters` | the slice loop's per-exit bookkeeping (a replica of `slice` in `core/src/machine/run-loop.ts`) |
 * | `busFind` | the exit path's bus lookup (`Bus.findNumber`: numbers, no BigInt) with the bench's three devices |
 * | `deviceWrite` | `exitValue` + the device's `write` |
 * | `handleExit` | `handleExit` without hooks (bus + device + outcome) |
 * | `hooks` | `handleExit` with the monitor's hooks − without |
 * | `completion` | `completeRead` for an `in` (a replica; an `out` completes in `KVM_RUN`) |
 * | `clockRead`, `closureAlloc` | one `performance.now()`; one arrow function created and called |
 * @module
 */
import { Machine, exitValue, handleExit, type AccessSize, type ExitContext, type ExitHook, type HookStats, type VcpuExit } from '@tsvm/core';
import { MockBackend, outExit } from '@tsvm/core/testing';
import { libc } from '@tsvm/kvm-backend';
import { KVM_EXIT, KVM_RUN_OFFSETS as O, Pending, decodeExit, type PendingAnswer } from '@tsvm/kvm-backend/raw';
import { Monitor, allow } from '@tsvm/monitor';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { interleave, spread, type Spread } from './stats.js';

/** Builds `bench/syscall.c` once; undefined without a C compiler (then `cIoctl` is not measured). */
let cIoctlBin: string | undefined | null = null;
function cIoctl(): number {
  if (cIoctlBin === null) {
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-syscall-'));
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
    try {
      cIoctlBin = join(dir, 'syscall');
      execFileSync('cc', ['-O2', '-o', cIoctlBin, join(dirname(fileURLToPath(import.meta.url)), 'syscall.c')]);
    } catch {
      cIoctlBin = undefined;
    }
  }
  if (!cIoctlBin) return NaN;
  return (JSON.parse(execFileSync(cIoctlBin, [String(ITER)], { encoding: 'utf8' })) as { ns: number }).ns;
}

const PORT = 0x500;
const EXITS = Number(process.env.TSVM_BENCH_MOCK_EXITS ?? 100_000);
const ITER = Number(process.env.TSVM_BENCH_MICRO_ITER ?? 200_000);
let sinkValue = 0; // keeps results alive so the JIT cannot drop the measured work

/** Adds the bench's devices (the same three as the KVM exit bench). */
function devices(m: Machine, onWrite: (a: Parameters<NonNullable<import('@tsvm/core').Device['write']>>[3]) => void): void {
  m.io.register({ port: PORT, size: 1 }, { name: 'sink', write: (_o, v, _s, a) => { sinkValue ^= v; onWrite(a); } });
  m.mmio.register({ address: 0xd0000000n, size: 4096 }, { name: 'mmio-sink', write: () => {} });
  m.io.register({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
}

/** Attaches a Monitor with one allowing mediate hook on PORT; returns the core hooks it installed, in order. */
function monitor(m: Machine): ExitHook[] {
  const hooks: ExitHook[] = [];
  const add = m.addHook.bind(m);
  m.addHook = (h: ExitHook) => {
    hooks.push(h);
    const un = add(h);
    return () => { un(); const i = hooks.indexOf(h); if (i >= 0) hooks.splice(i, 1); };
  };
  const mon = new Monitor(m, { name: 'bench-mock' });
  mon.mediate({ event: 'pio', ports: [PORT, PORT] }, () => allow(), { name: 'allow-pio' });
  mon.seal();
  return hooks;
}

/** Whole `Machine.run` on the mock: ns per exit. */
async function mockRun(monitored: boolean): Promise<number> {
  const backend = new MockBackend();
  const vcpu = backend.script();
  vcpu.whenEmpty = outExit(PORT, 0x41);
  const m = await Machine.create({ memory: 64 * 1024, backend });
  let n = 0;
  devices(m, (a) => { if (++n === EXITS) a.requestStop({ reason: 'debug-exit', code: 0 }); });
  if (monitored) monitor(m);
  const t0 = performance.now();
  const s = await m.run({ sliceMs: 1000 });
  const dt = performance.now() - t0;
  await m.close();
  if (s.reason !== 'debug-exit' || n !== EXITS) throw new Error(`mock run stopped with ${s.reason} after ${n} exits`);
  return (dt * 1e6) / EXITS;
}

/** ns per call of `f`, over ITER calls. */
function micro(f: () => number): number {
  let acc = 0;
  const t0 = performance.now();
  for (let i = 0; i < ITER; i++) acc += f();
  const dt = performance.now() - t0;
  sinkValue ^= acc | 0;
  return (dt * 1e6) / ITER;
}

/** A fake `kvm_run` holding an `out dx, al` to PORT, decoded by kvm-backend's own decoder. */
function decoder(): { decode: () => VcpuExit; complete: (d: Uint8Array) => void } {
  const bytes = new Uint8Array(4096);
  const r = new DataView(bytes.buffer);
  r.setUint32(O.exit_reason, KVM_EXIT.IO, true);
  r.setUint8(O.io_direction, 1); r.setUint8(O.io_size, 1); r.setUint16(O.io_port, PORT, true); r.setUint32(O.io_count, 1, true);
  r.setBigUint64(O.io_data_offset, 4096n - 8n, true);
  const answer: PendingAnswer = { pending: Pending.None, ioOffset: 0, ioLength: 0 };
  const decode = (): VcpuExit => decodeExit(r.getUint32(O.exit_reason, true), r, bytes, answer);
  // What KvmVcpu.completeIoIn does after an `in` (the bench's exit is an `out`, so this prices the copy).
  const complete = (d: Uint8Array): void => { bytes.set(d.subarray(0, answer.ioLength || 1), answer.ioOffset || 4088); answer.pending = Pending.None; };
  return { decode, complete };
}

/**
 * The per-exit bookkeeping of the run loop's `slice` (`core/src/machine/run-loop.ts`): per-kind
 * and per-port counters, seq, and the sampled timing (about one exit in 16 reads the clock
 * three times, the others not at all; the sampling is documented on core's `ExitKindStats`).
 */
function countersReplica(): () => number {
  const SAMPLE = 16, LOG_Q = Math.log(1 - 1 / SAMPLE);
  const byKind = { io: { count: 0, runNs: 0, handleNs: 0 } };
  const byPort = new Uint32Array(0x10000);
  const info = { seq: 0 };
  let total = 0, w = 1, skip = 0, t0 = performance.now(), t1 = 0;
  return () => {
    if (w === 0 && skip-- === 0) { w = SAMPLE; t0 = performance.now(); }
    const k = byKind.io;
    if (w !== 0) { t1 = performance.now(); k.runNs += (t1 - t0) * 1e6 * w; }
    k.count++; total++; info.seq = total;
    byPort[PORT] = (byPort[PORT] as number) + 1;
    if (w !== 0) {
      const t2 = performance.now();
      k.handleNs += (t2 - t1) * 1e6 * w;
      if ((t2 - t0) * 1e6 >= 20_000) w = 1;
      else { skip = Math.floor(Math.log(1 - Math.random()) / LOG_Q); w = skip === 0 ? SAMPLE : 0; }
      t0 = t2;
    }
    return total;
  };
}

/** The breakdown's parts, each ns per exit. */
async function parts(): Promise<Record<string, number>> {
  const backend = new MockBackend();
  const plain = await Machine.create({ memory: 64 * 1024, backend });
  devices(plain, () => {});
  const mb = new MockBackend();
  const mm = await Machine.create({ memory: 64 * 1024, backend: mb });
  devices(mm, () => {});
  const hooks = monitor(mm);
  const exit = outExit(PORT, 0x41);
  const info = { vcpu: 0, seq: 0, rip: () => 0n, instructionRip: () => 0n };
  const ctx = (m: Machine, hs: readonly ExitHook[]): ExitContext => ({
    pio: m.io, mmio: m.mmio, mediate: hs.filter((h) => h.mode === 'mediate'), observe: hs.filter((h) => h.mode === 'observe'),
    hookStats: new Map<ExitHook, HookStats>(), info,
  });
  const c0 = ctx(plain, []), c1 = ctx(mm, hooks);
  const vcpu = backend.script();
  vcpu.whenEmpty = exit;
  const fd = libc().open('/dev/null', 0);
  const TCGETS = 0x5401;
  const dec = decoder();
  const counters = countersReplica();
  const dev = plain.io.find(BigInt(PORT), 1)?.device;
  if (!dev?.write) throw new Error('no sink');
  const write = dev.write.bind(dev);
  const access = { address: BigInt(PORT), space: 'pio' as const, vcpu: 0, requestStop: () => {} };
  const one = Uint8Array.of(0x41);
  const out: Record<string, number> = {
    mockRun: micro(() => (vcpu.run().kind === 'io' ? 1 : 0)),
    ffiIoctl: micro(() => libc().ioctlInt(fd, TCGETS, 0)),
    cIoctl: cIoctl(),
    decode: micro(() => (dec.decode() as { size: number }).size),
    counters: micro(counters),
    busFind: micro(() => (plain.io.findNumber(PORT, 1) ? 1 : 0)),
    deviceWrite: micro(() => { write(0, exitValue(exit.kind === 'io' ? exit.data : one, 0, 1), 1 as AccessSize, access); return 1; }),
    handleExit: micro(() => (handleExit(exit, c0).action === 'resume' ? 1 : 0)),
    handleExitMonitored: micro(() => (handleExit(exit, c1).action === 'resume' ? 1 : 0)),
    completion: micro(() => { dec.complete(one); return 1; }),
    // Context for the rest: one clock read, and one closure created per call — which under tsx
    // (esbuild keepNames: every named function expression goes through __name/defineProperty)
    // is what a per-exit `() => …` in the hot path costs.
    clockRead: micro(() => performance.now()),
    closureAlloc: micro(() => { const f = (): number => 1; return f(); }),
  };
  libc().close(fd);
  await plain.close();
  await mm.close();
  return out;
}

/** Result of {@link tsPathBench}: whole-path figures and the per-part breakdown, each with its spread. */
export interface TsPathResult {
  /** Whole-path and derived figures (ns per exit). */
  readonly line: Record<string, number | Spread>;
  /** Per part (ns per exit). */
  readonly parts: Record<string, Spread>;
}

/**
 * Measures the TypeScript part of one PIO exit: whole runs interleaved with the part
 * microbenchmarks, `reps` rounds (one warm-up round discarded).
 */
export async function tsPathBench(reps: number): Promise<TsPathResult> {
  const partSamples: Record<string, number[]> = {};
  const r = await interleave(reps, {
    plain: () => mockRun(false),
    monitored: () => mockRun(true),
    parts: async () => {
      const p = await parts();
      for (const [k, v] of Object.entries(p)) (partSamples[k] ??= []).push(v);
      return 0;
    },
  });
  for (const v of Object.values(partSamples)) v.shift(); // the warm-up round
  const P = Object.fromEntries(Object.entries(partSamples).map(([k, v]) => [k, spread(v)])) as Record<string, Spread>;
  const med = (k: string): number => P[k]?.median ?? NaN;
  // One real exit's TS part ≈ mock whole − the mock's run + what the mock has not: decode and
  // koffi's share of the KVM_RUN call (the FFI call minus the same syscall from C: the kernel's
  // share is in the C loop's figure too). Without a C compiler the whole FFI call is counted.
  const ffiShare = Number.isFinite(med('cIoctl')) ? med('ffiIoctl') - med('cIoctl') : med('ffiIoctl');
  const extra = med('decode') + ffiShare - med('mockRun');
  const est = (xs: number[]): Spread => spread(xs.map((x) => x + extra));
  const hooksPart = med('handleExitMonitored') - med('handleExit');
  const sum = ffiShare + med('decode') + med('counters') + med('handleExitMonitored') + med('completion');
  return {
    line: {
      mockNsPerExit: spread(r.plain), mockMonitoredNsPerExit: spread(r.monitored),
      estNsPerExit: est(r.plain), estMonitoredNsPerExit: est(r.monitored),
      hooksNs: hooksPart, ffiShareNs: ffiShare, sumOfPartsMonitoredNs: sum, targetNs: 400,
    },
    parts: P,
  };
}

export { sinkValue as _sink };
