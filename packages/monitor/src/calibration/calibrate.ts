/**
 * `calibrate()`: discovers, on this host, which mechanism works at CPL0 and CPL3 (and how it
 * fails when it does not), and prices each per event by running small guests. A price is a
 * *marginal* cost, like the overhead a hook adds to a workload: a loop of the event and a loop of
 * `nop`s of the same length run on fresh machines next to each other in time, and their
 * difference / n cancels what a run pays once (VM creation, first entry) — code paths warmed on
 * first use are warmed by a discarded run first (breakpoints, whose hooked run has a set-up cost the
 * plain one lacks, use (T(2n) − T(n)) differences instead). Each price is the median over five rounds:
 * on a shared host one disturbed run must not set it. Dispatch prices are measured on the
 * per-exit pipeline time ({@link ExitTimer}), not on run time. Results
 * are cached per host identity (see `cache.ts`). Needs `/dev/kvm`; on the mock only
 * {@link measureHookDispatch} is meaningful.
 * @module
 */
import { Machine, measureDirtyTracking, type MachineOptions, type Stop } from '@tsvm/core';
import { explainInternalError } from '../decode.js';
import { GUESTDBG } from '../debug-unit.js';
import { hostIdentity } from './host.js';
import { ExitTimer } from './exit-timer.js';
import { loadCalibration, saveCalibration } from './cache.js';
import { BODY, CAL_PORT, CODE_AT, END_PORT, MMIO_AT, SETUP, loopGuest } from './guests.js';
import { assumedTable, type CalibrationTable, type Cpl, type MechanismId, type MechanismResult } from './table.js';

/** Options of {@link calibrate}. */
export interface CalibrateOptions {
  /** Fewer iterations (the whole run stays under ~5 s). */
  readonly quick?: boolean;
  /** Creates the machines the guests run on (default `Machine.create`). */
  readonly machineFactory?: (options: MachineOptions) => Promise<Machine>;
  /** Cache file (default `~/.cache/tsvm/calibration.json`); `false` disables caching. */
  readonly cachePath?: string | false;
  /** Measure even when the cache has a table for this host. */
  readonly force?: boolean;
}

type Factory = (options: MachineOptions) => Promise<Machine>;
const MiB = 1024 * 1024;
const ok = (ns: number, samples: number, note?: string): MechanismResult => ({ works: true, ns: Math.max(0, Math.round(ns)), samples, ...(note ? { note } : {}) });
const broken = (failure: string): MechanismResult => ({ works: false, failure });

function describeStop(s: Stop): string {
  switch (s.reason) {
    case 'exception': return `exception ${s.vector} delivered to the guest at 0x${s.faultRip.toString(16)}`;
    case 'internal-error': return `KVM_EXIT_INTERNAL_ERROR: ${explainInternalError(s)}`;
    case 'timeout': return 'the event never reached the VMM (timed out)';
    case 'unhandled-exit': return `unexpected exit: ${s.message}`;
    case 'violation': return s.violation.message;
    default: return `stopped with ${s.reason}`;
  }
}

interface Trial { machine: Machine; stop: Stop }

/**
 * What a run cost, in ms: the thread's CPU time when the backend has the clock (a busy host's
 * preemptions do not inflate it; every price and every comparison uses the same clock), else
 * the wall time.
 */
export function runCostMs(stop: Stop): number {
  return stop.cpuMs ?? stop.elapsedMs;
}

async function runLoop(factory: Factory, cpl: Cpl, body: readonly number[], n: number, setup: readonly number[], prepare?: (m: Machine) => void): Promise<Trial> {
  const machine = await factory({ memory: 4 * MiB, name: 'calibration' });
  const { code } = loopGuest(body, n, setup);
  machine.io.register({ port: END_PORT, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  machine.loadFlat(code, { at: CODE_AT, mode: 'long', ring: cpl });
  prepare?.(machine);
  const stop = await machine.run({ timeout: 4000 });
  return { machine, stop };
}

/**
 * ns per iteration of `body` beyond a `nop` loop: in each round a run of the body loop and a run
 * of a `nop` loop of the same length, next to each other in time (alternating which goes
 * first), after one discarded warm-up run of the body (JIT, code paths warmed on first use).
 * What a run pays once (VM creation, first entry) is the same in both runs and cancels in
 * their difference; the median over rounds keeps one run disturbed by another process on a
 * shared host from setting the price. `prepare` is applied to every body run, so event counters
 * see n × (rounds + 1) events; the returned machine and stop are the last body run's, or the
 * first failed one's.
 */
async function timed(factory: Factory, cpl: Cpl, body: readonly number[], n: number, setup: readonly number[] = [], prepare?: (m: Machine) => void, rounds = 1): Promise<{ ns: number; stop: Stop; machine: Machine; events: number }> {
  const nopMs = async (): Promise<number> => {
    const t = await runLoop(factory, cpl, BODY.nop, n, setup);
    await t.machine.close();
    return runCostMs(t.stop);
  };
  let last = await runLoop(factory, cpl, body, n, setup, prepare);
  const diffs: number[] = [], wholes: number[] = [];
  for (let r = 0; r < rounds && last.stop.reason === 'debug-exit'; r++) {
    const before = r % 2 === 0 ? await nopMs() : undefined;
    await last.machine.close();
    last = await runLoop(factory, cpl, body, n, setup, prepare);
    if (last.stop.reason !== 'debug-exit') return { ns: NaN, stop: last.stop, machine: last.machine, events: n * (r + 2) };
    const nop = before ?? await nopMs();
    diffs.push((runCostMs(last.stop) - nop) * 1e6 / n);
    wholes.push(runCostMs(last.stop) * 1e6 / n);
  }
  if (last.stop.reason !== 'debug-exit') return { ns: NaN, stop: last.stop, machine: last.machine, events: n };
  return { ns: positiveOr(medianOf(diffs), medianOf(wholes)), stop: last.stop, machine: last.machine, events: n * (rounds + 1) };
}

/**
 * `pairs` differences `measured() − baseline()`, each pair run next to each other in time with
 * the order alternating (baseline first in the odd pairs), so a pair sees one stretch of the
 * host's load and neither side always runs warm.
 */
async function pairedDiffs(pairs: number, baseline: () => Promise<number>, measured: () => Promise<number>): Promise<number[]> {
  const diffs: number[] = [];
  for (let r = 0; r < pairs; r++) {
    const a = r % 2 ? await baseline() : undefined;
    const b = await measured();
    diffs.push(b - (a ?? await baseline()));
  }
  return diffs;
}

function medianOf(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

/**
 * The marginal estimate, unless noise (a run disturbed by the host) drove it to zero or below:
 * then the whole-run estimate at 2n, which folds fixed costs in but cannot be negative for a
 * mechanism that works.
 */
function positiveOr(marginal: number, whole: number): number {
  return marginal > 0 ? marginal : whole;
}

async function attempt(f: () => Promise<MechanismResult>): Promise<MechanismResult> {
  try {
    return await f();
  } catch (e) {
    return broken(`experiment failed: ${(e as Error).message}`);
  }
}

const sink = { name: 'sink', write: () => {}, read: () => 0 };

/** Runs one experiment at one CPL. */
async function experiment(id: MechanismId, cpl: Cpl, n: number, factory: Factory, rounds: number): Promise<MechanismResult> {
  switch (id) {
    case 'pio-exit': case 'coalesced-pio': return attempt(async () => {
      let seen = 0;
      const r = await timed(factory, cpl, BODY.outDx, n, SETUP.dx(CAL_PORT), (m) => {
        m.io.register({ port: CAL_PORT, size: 1 }, { name: 'count', write: () => { seen++; } });
        if (id === 'coalesced-pio') m.coalesce({ port: CAL_PORT, size: 1 });
      }, rounds);
      await r.machine.close();
      // "Works" means every write reached the device, not just that the guest finished.
      return r.stop.reason !== 'debug-exit' ? broken(describeStop(r.stop)) : seen !== r.events ? broken(`${seen} of ${r.events} writes reached the device`) : ok(r.ns, n);
    });
    case 'mmio-exit': case 'coalesced-mmio': return attempt(async () => {
      let seen = 0;
      const r = await timed(factory, cpl, BODY.mmioWrite, n, SETUP.rax(MMIO_AT), (m) => {
        m.mmio.register({ address: MMIO_AT, size: 0x1000 }, { name: 'count', write: () => { seen++; }, read: () => 0 });
        if (id === 'coalesced-mmio') m.coalesce({ address: MMIO_AT, size: 0x1000 });
      }, rounds);
      await r.machine.close();
      return r.stop.reason !== 'debug-exit' ? broken(describeStop(r.stop)) : seen !== r.events ? broken(`${seen} of ${r.events} writes reached the device`) : ok(r.ns, n);
    });
    // Write-watch and MSR exits only ever reach users through the monitor, so they are priced
    // as the monitor delivers them (its write-watch / MSR hook with one trivial user hook):
    // the TS work of delivery (decode, records, the write itself) is part of what a hook costs.
    case 'ro-slot-write': return attempt(async () => {
      const { Monitor } = await import('../monitor.js');
      const page = 0x20_0000n; // RAM inside the 4 MiB the loop machines have
      const r = await timed(factory, cpl, BODY.mmioWrite, n, SETUP.rax(page), (m) => {
        new Monitor(m, { calibration: assumedTable(hostIdentity('unknown')) }).mediate({ event: 'write-watch', range: [page, page + 0xfffn] }, () => undefined);
      }, rounds);
      await r.machine.close();
      return r.stop.reason === 'debug-exit' ? ok(r.ns, n, 'through the monitor: write-watch hook, one allowing user hook') : broken(describeStop(r.stop));
    });
    case 'msr-exit': return attempt(async () => {
      const { Monitor } = await import('../monitor.js');
      const r = await timed(factory, cpl, BODY.rdmsr, n, SETUP.ecx(0xc000_0103), (m) => {
        new Monitor(m, { calibration: assumedTable(hostIdentity('unknown')) }).mediate({ event: 'msr', indices: [0xc000_0103], direction: 'read' }, () => ({ verdict: 'emulate', value: 0 }));
      }, rounds);
      await r.machine.close();
      return r.stop.reason === 'debug-exit' ? ok(r.ns, n, 'through the monitor: one emulating user hook') : broken(describeStop(r.stop));
    });
    case 'single-step': return attempt(async () => {
      let steps = 0;
      const r = await timed(factory, cpl, BODY.nop, n, [], (m) => {
        m.vcpu(0).setGuestDebug(GUESTDBG.ENABLE | GUESTDBG.SINGLESTEP);
        m.addHook({ name: 'cal-step', mode: 'mediate', matches: (e) => e.kind === 'debug', handle: () => { steps++; return { verdict: 'emulate', value: 0 }; } });
      }, rounds);
      await r.machine.close();
      if (r.stop.reason !== 'debug-exit') return broken(`${steps <= 1 ? 'first step exits, then ' : ''}${describeStop(r.stop)}`);
      return steps >= 3 * r.events ? ok(r.ns / 3, steps, 'per step (3 instructions per iteration)') : broken(`only ${steps} of ${3 * r.events} steps exited`);
    });
    case 'sw-breakpoint': case 'probe-breakpoint': case 'hw-breakpoint': return attempt(() => breakpointExperiment(id, cpl, n, factory, rounds));
    case 'probe-in-place': return attempt(() => breakpointExperiment('probe-breakpoint', cpl, n, factory, rounds, true));
    case 'dirty-ring-harvest': return attempt(async () => {
      // Core's own price (it chooses log or ring for forks by it; core cannot read this table):
      // one dirtyLog of a 16 MiB slot with 4 pages written, through the ring, and beside it the bitmap.
      const m = await factory({ memory: 2 * MiB, name: 'calibration' });
      const backend = m.backend;
      await m.close();
      if (!backend.capabilities.dirtyLogRing) return broken('no KVM_CAP_DIRTY_LOG_RING_ACQ_REL on this host');
      const p = measureDirtyTracking(backend, Math.max(15, rounds * 3));
      return p.ringNs === undefined ? broken('the ring could not be measured') : ok(p.ringNs, p.rounds, `bitmap ${Math.round(p.logNs)} ns in the same measurement`);
    });
    case 'dirty-log-page': case 'dirty-log-harvest': return attempt(async () => {
      const m = await factory({ memory: [{ start: 0, size: 4 * MiB, logDirty: true }], name: 'calibration' });
      const pages = 256;
      // rep stosq over `pages` pages at 2 MiB, then the end port.
      const code = Uint8Array.from([...SETUP.rdi(0x20_0000n), ...SETUP.ecx(pages * 512), 0xf3, 0x48, 0xab, ...SETUP.dx(END_PORT), 0xee]);
      m.io.register({ port: END_PORT, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
      m.loadFlat(code, { at: CODE_AT, mode: 'long', ring: cpl });
      m.dirtyPages(0);
      const s = await m.run({ timeout: 4000 });
      const t0 = performance.now();
      const bits = m.dirtyPages(0);
      const dirtyNs = (performance.now() - t0) * 1e6;
      const t1 = performance.now();
      m.dirtyPages(0);
      const cleanNs = (performance.now() - t1) * 1e6;
      await m.close();
      if (s.reason !== 'debug-exit') return broken(describeStop(s));
      const count = bits.reduce((n, b) => n + popcount(b), 0);
      return id === 'dirty-log-harvest' ? ok(cleanNs, 1) : ok((dirtyNs - cleanNs) / Math.max(1, count), count);
    });
    case 'hook-dispatch': return attempt(() => dispatchExperiment('mediate', cpl, n, factory, rounds));
    case 'mmio-dispatch': return attempt(() => dispatchExperiment('mediate', cpl, n, factory, rounds, 'mmio'));
    case 'observe-dispatch': return attempt(() => dispatchExperiment('observe', cpl, n, factory, rounds));
    case 'runner-exit': return attempt(() => runnerExperiment(cpl, n, factory, rounds));
    case 'cpuid-table': return cpl === 0 ? ok(0, 0, 'set up front; no exit') : broken('not measured: on PVM CPL3 sees the outer hypervisor (see HOST-FACTS)');
    case 'exit': return ok(0, 0);
  }
}

function popcount(b: number): number {
  let n = 0;
  for (let x = b; x; x &= x - 1) n++;
  return n;
}

async function breakpointExperiment(id: 'sw-breakpoint' | 'hw-breakpoint' | 'probe-breakpoint', cpl: Cpl, n: number, factory: Factory, rounds: number, inPlace = false): Promise<MechanismResult> {
  const { Monitor } = await import('../monitor.js');
  // Out of line: nops (movable). In place: a store through rdi (a memory operand must not move:
  // a fault there would show the guest the copy's RIP), the two bytes the probe's trap covers.
  const guest = (iterations: number) => (inPlace
    ? loopGuest([0x89, 0x07, 0x90, 0x90], iterations, SETUP.rdi(0x20_0000n))
    : loopGuest(BODY.nop.concat([0x90, 0x90]), iterations, []));
  const table = assumedTable(hostIdentity('unknown'));
  const only = (m: MechanismId): CalibrationTable => ({
    ...table, results: {
      ...table.results,
      'sw-breakpoint': { cpl0: m === 'sw-breakpoint' ? { works: true, ns: 1 } : { works: false, failure: 'forced' }, cpl3: m === 'sw-breakpoint' ? { works: true, ns: 1 } : { works: false, failure: 'forced' } },
      'hw-breakpoint': { cpl0: m === 'hw-breakpoint' ? { works: true, ns: 1 } : { works: false, failure: 'forced' }, cpl3: m === 'hw-breakpoint' ? { works: true, ns: 1 } : { works: false, failure: 'forced' } },
      'probe-breakpoint': { cpl0: m === 'probe-breakpoint' ? { works: true, ns: 1 } : { works: false, failure: 'forced' }, cpl3: m === 'probe-breakpoint' ? { works: true, ns: 1 } : { works: false, failure: 'forced' } },
      'single-step': { cpl0: { works: true, ns: 1 }, cpl3: { works: true, ns: 1 } },
    },
  });
  const run = async (hook: boolean, iterations: number): Promise<{ stop: Stop; hits: number }> => {
    const { code, bodyOffset } = guest(iterations);
    const m = await factory({ memory: 4 * MiB, name: 'calibration' });
    m.io.register({ port: END_PORT, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    m.loadFlat(code, { at: CODE_AT, mode: 'long', ring: cpl });
    let hits = 0;
    if (hook) {
      const mon = new Monitor(m, { calibration: only(id), guard: false });
      mon.observe({ event: 'exec', address: CODE_AT + bodyOffset, cpl }, () => { hits++; });
    }
    const stop = await m.run({ timeout: 4000 });
    await m.close();
    return { stop, hits };
  };
  // Marginal cost per hit: (T(2n) − T(n)) with the hook minus the same without, median over
  // rounds, after a discarded warm-up run. Unlike timed()'s pairs, the hooked run pays a
  // per-run cost the plain one does not (monitor, probe engine and decoder set-up, patching):
  // only the 2n − n difference cancels it.
  const warm = await run(true, n);
  if (warm.stop.reason !== 'debug-exit') return broken(describeStop(warm.stop));
  if (warm.hits !== n) return broken(`${warm.hits} of ${n} hits reached the VMM`);
  const marginals: number[] = [], wholes: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const r1 = await run(true, n);
    const r2 = await run(true, 2 * n);
    if (r1.stop.reason !== 'debug-exit') return broken(describeStop(r1.stop));
    if (r2.stop.reason !== 'debug-exit') return broken(describeStop(r2.stop));
    const b1 = await run(false, n);
    const b2 = await run(false, 2 * n);
    marginals.push(((runCostMs(r2.stop) - runCostMs(r1.stop)) - (runCostMs(b2.stop) - runCostMs(b1.stop))) * 1e6 / n);
    wholes.push((runCostMs(r2.stop) - runCostMs(b2.stop)) * 1e6 / (2 * n));
  }
  const ns = positiveOr(medianOf(marginals), medianOf(wholes));
  // The body is nops: movable, so the probe runs them out of line (one exit per hit); a hooked
  // instruction that must run in place costs a second exit (see probe.ts).
  return ok(ns, n, inPlace ? 'a hooked instruction that must run in place (a store): two exits per hit' : id === 'probe-breakpoint' ? 'one exit per hit (out of line; in place: probe-in-place)' : undefined);
}

/**
 * Monitor dispatch per event on the real backend: a PIO loop to a device with and without a
 * `Monitor` holding one allowing mediate hook on its port (or one `any-exit` observer), compared on the median per-exit
 * time in core's hook pipeline ({@link ExitTimer}). The hook adds no exit, so neither the time
 * in `KVM_RUN` nor the thread's preemptions belong in the difference. It is measured here, not on the mock,
 * because code run right after a guest exit finds cold caches: on PVM it costs ~2–3× the
 * mock's hot loop. On the mock (no KVM) falls back to {@link measureHookDispatch}.
 */
async function dispatchExperiment(mode: 'mediate' | 'observe', cpl: Cpl, n: number, factory: Factory, rounds: number, kind: 'pio' | 'mmio' = 'pio'): Promise<MechanismResult> {
  const probe = await factory({ memory: 64 * 1024, name: 'calibration-probe' });
  const mock = probe.capabilities.flavour === 'mock';
  await probe.close();
  if (mock) return mode === 'mediate' && kind === 'pio' ? ok(await measureHookDispatch(n), n, 'measured on the mock backend') : broken('measured only on a real backend (hook-dispatch is used instead)');
  const { Monitor } = await import('../monitor.js');
  const pipelineNs = async (hook: boolean): Promise<number> => {
    let timer: ExitTimer | undefined;
    const body = kind === 'pio' ? BODY.outDx : BODY.mmioWrite;
    const setup = kind === 'pio' ? SETUP.dx(CAL_PORT) : SETUP.rax(MMIO_AT);
    const t = await runLoop(factory, cpl, body, n, setup, (m) => {
      timer = new ExitTimer(m, n + 16);
      if (kind === 'pio') m.io.register({ port: CAL_PORT, size: 1 }, sink);
      else m.mmio.register({ address: MMIO_AT, size: 0x1000 }, sink);
      if (hook && mode === 'mediate' && kind === 'pio') new Monitor(m).mediate({ event: 'pio', ports: [CAL_PORT, CAL_PORT] }, () => undefined);
      if (hook && mode === 'mediate' && kind === 'mmio') new Monitor(m).mediate({ event: 'mmio', range: [MMIO_AT, MMIO_AT + 0xfffn] }, () => undefined);
      if (hook && mode === 'observe') new Monitor(m).observe({ event: 'any-exit' }, () => {});
      timer.finish();
    });
    await t.machine.close();
    if (t.stop.reason !== 'debug-exit') throw new Error(describeStop(t.stop));
    return (timer as ExitTimer).median();
  };
  await pipelineNs(true); // warm up the JIT
  // A difference of ~2 µs between two medians: more rounds than the exit prices need (runs are short).
  const diffs = await pairedDiffs(2 * rounds - 1, () => pipelineNs(false), () => pipelineNs(true));
  const what = mode === 'observe' ? 'one any-exit observer' : `one allowing ${kind === 'pio' ? 'PIO' : 'MMIO'} hook`;
  return ok(Math.max(1, medianOf(diffs)), n * (2 * rounds - 1), `median per-exit pipeline time with a Monitor and ${what}, minus without`);
}

/**
 * The price of threads: what one PIO exit costs beyond the same exit with the vCPU on the calling
 * thread when the vCPU has its own runner thread (`vcpuThreads: 'parallel'`: the runner's
 * `KVM_RUN` returns, the calling thread is woken, handles the exit and wakes the runner). The
 * same loop in both modes, interleaved pairs, median of the per-exit differences on the wall
 * clock (the calling thread's CPU clock does not see a runner's time).
 */
async function runnerExperiment(cpl: Cpl, n: number, factory: Factory, rounds: number): Promise<MechanismResult> {
  const once = async (parallel: boolean): Promise<number> => {
    const f: Factory = parallel ? (o) => factory({ ...o, vcpuThreads: 'parallel' }) : factory;
    const t = await runLoop(f, cpl, BODY.outDx, n, SETUP.dx(CAL_PORT), (m) => { m.io.register({ port: CAL_PORT, size: 1 }, sink); });
    await t.machine.close();
    if (t.stop.reason !== 'debug-exit') throw new Error(describeStop(t.stop));
    return (t.stop.elapsedMs * 1e6) / Math.max(1, t.stop.exits);
  };
  try {
    await once(true); // warm up (runner threads, JIT)
  } catch (e) {
    return broken(`no runner threads here: ${e instanceof Error ? e.message : String(e)}`);
  }
  await once(false);
  const diffs = await pairedDiffs(2 * rounds + 1, () => once(false), () => once(true));
  return ok(Math.max(1, medianOf(diffs)), n * (2 * rounds + 1), 'per PIO exit with the vCPU on its runner thread, minus on the calling thread (wall clock)');
}

/**
 * Monitor dispatch overhead per event (ns), on the mock backend: the same scripted exits with
 * and without a `Monitor` (default options, as users attach it) holding one trivial mediate
 * hook; median of five interleaved pairs, after a warm-up.
 */
export async function measureHookDispatch(events = 20_000): Promise<number> {
  const { MockBackend, outExit } = await import('@tsvm/core/testing');
  const { Monitor } = await import('../monitor.js');
  const once = async (hook: boolean): Promise<number> => {
    const backend = new MockBackend();
    const exit = outExit(0x3f8, 0x41);
    backend.script(...new Array<typeof exit>(events).fill(exit));
    const m = await Machine.create({ memory: 64 * 1024, backend });
    m.io.register({ port: 0x3f8, size: 1 }, sink);
    if (hook) new Monitor(m).mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => undefined);
    const t0 = performance.now();
    await m.run({ sliceMs: 1000 });
    const dt = performance.now() - t0;
    await m.close();
    return dt;
  };
  await once(true); // warm up the JIT
  await once(false);
  const diffs = await pairedDiffs(5, () => once(false), () => once(true));
  return Math.max(0, medianOf(diffs.map((d) => d * 1e6 / events)));
}

/** Mechanisms `calibrate()` measures (everything but the bookkeeping entries). */
const MEASURED: readonly MechanismId[] = [
  'pio-exit', 'mmio-exit', 'coalesced-pio', 'coalesced-mmio', 'ro-slot-write', 'dirty-log-harvest', 'dirty-log-page', 'dirty-ring-harvest', 'msr-exit',
  'single-step', 'sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint', 'probe-in-place', 'hook-dispatch', 'mmio-dispatch', 'observe-dispatch', 'runner-exit', 'cpuid-table', 'exit',
];

/**
 * Discovers and prices every mechanism at CPL0 and CPL3 on this host (needs `/dev/kvm`), or
 * returns the cached table for this host identity. `quick` keeps it under ~5 s.
 */
export async function calibrate(options: CalibrateOptions = {}): Promise<CalibrationTable> {
  const factory: Factory = options.machineFactory ?? ((o) => Machine.create(o));
  const probe = await factory({ memory: 64 * 1024, name: 'calibration-probe' });
  const host = hostIdentity(probe.capabilities.flavour);
  await probe.close();
  const path = options.cachePath === false ? undefined : options.cachePath;
  if (!options.force && options.cachePath !== false) {
    const cached = loadCalibration(host, path ? { path } : {});
    if (cached) return cached;
  }
  const n = options.quick ? 200 : 2000;
  // Five rounds of short paired runs (median) beat one round of runs five times as long on a shared host.
  const rounds = 5;
  const results = {} as Record<MechanismId, { cpl0: MechanismResult; cpl3: MechanismResult }>;
  for (const id of MEASURED) {
    const iterations = id === 'single-step' || id.endsWith('breakpoint') ? Math.min(n, 100) : n;
    results[id] = { cpl0: await experiment(id, 0, iterations, factory, rounds), cpl3: await experiment(id, 3, iterations, factory, rounds) };
  }
  const table: CalibrationTable = { version: 1, host, source: 'measured', createdAt: new Date().toISOString(), quick: options.quick ?? false, results };
  if (options.cachePath !== false) saveCalibration(table, path ? { path } : {});
  return table;
}

/** Options of {@link remeasure}. */
export interface RemeasureOptions {
  /** Fewer iterations, as in {@link calibrate}. */
  readonly quick?: boolean;
  /** Creates the machines the guests run on (default `Machine.create`). */
  readonly machineFactory?: (options: MachineOptions) => Promise<Machine>;
  /** CPLs to re-measure (default both); the others keep `table`'s results. */
  readonly cpls?: readonly Cpl[];
}

/**
 * Re-measures `mechanisms` (both CPLs) and returns a copy of `table` with their results
 * replaced; the rest is kept and nothing is cached. On a shared host prices follow the load:
 * a benchmark that prices a workload with mechanisms measured *next to it* compares like with
 * like, where a table measured a minute earlier may be off by 2×.
 */
export async function remeasure(table: CalibrationTable, mechanisms: readonly MechanismId[], options: RemeasureOptions = {}): Promise<CalibrationTable> {
  const factory: Factory = options.machineFactory ?? ((o) => Machine.create(o));
  const n = options.quick ? 200 : 2000;
  const results = { ...table.results } as Record<MechanismId, { cpl0: MechanismResult; cpl3: MechanismResult }>;
  for (const id of new Set(mechanisms)) {
    const iterations = id === 'single-step' || id.endsWith('breakpoint') ? Math.min(n, 100) : n;
    const cpls = options.cpls ?? [0, 3];
    const old = results[id];
    results[id] = {
      cpl0: cpls.includes(0) ? await experiment(id, 0, iterations, factory, 5) : old.cpl0,
      cpl3: cpls.includes(3) ? await experiment(id, 3, iterations, factory, 5) : old.cpl3,
    };
  }
  return { ...table, source: 'measured', createdAt: new Date().toISOString(), results };
}
