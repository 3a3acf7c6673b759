/**
 * `calibrate()`: discovers, on this host, which mechanism works at CPL0 and CPL3 (and how it
 * fails when it does not), and prices each per event by running small guests. A price is a
 * *marginal* cost, like the overhead a hook adds to a workload: each loop runs for n and for 2n
 * iterations on fresh machines, and (T(2n) − T(n)) / n — minus the same for a loop of `nop`s —
 * cancels what a run pays once (VM creation, first entry, code paths warmed on first use),
 * which would otherwise inflate the per-event figure by a fixed cost / n. Results
 * are cached per host identity (see `cache.ts`). Needs `/dev/kvm`; on the mock only
 * {@link measureHookDispatch} is meaningful.
 * @module
 */
import { Machine, type MachineOptions, type Stop } from '@tsvm/core';
import { explainInternalError } from '../decode.js';
import { GUESTDBG } from '../debug-unit.js';
import { hostIdentity } from './host.js';
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
 * Marginal ns per iteration of `body` beyond a `nop` loop. The event loop runs n then 2n times
 * (`prepare` is applied to both machines, so event counters see 3n events); the returned
 * machine and stop are the 2n run's, or the n run's if that one already failed.
 */
async function timed(factory: Factory, cpl: Cpl, body: readonly number[], n: number, setup: readonly number[] = [], prepare?: (m: Machine) => void): Promise<{ ns: number; stop: Stop; machine: Machine; events: number }> {
  const elapsed = async (b: readonly number[], iterations: number): Promise<number> => {
    const t = await runLoop(factory, cpl, b, iterations, setup);
    await t.machine.close();
    return t.stop.elapsedMs;
  };
  const nop2 = await elapsed(BODY.nop, 2 * n);
  const base = nop2 - (await elapsed(BODY.nop, n));
  const once = await runLoop(factory, cpl, body, n, setup, prepare);
  if (once.stop.reason !== 'debug-exit') return { ns: NaN, stop: once.stop, machine: once.machine, events: n };
  await once.machine.close();
  const twice = await runLoop(factory, cpl, body, 2 * n, setup, prepare);
  const marginal = ((twice.stop.elapsedMs - once.stop.elapsedMs) - base) * 1e6 / n;
  return { ns: positiveOr(marginal, (twice.stop.elapsedMs - nop2) * 1e6 / (2 * n)), stop: twice.stop, machine: twice.machine, events: 3 * n };
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
async function experiment(id: MechanismId, cpl: Cpl, n: number, factory: Factory): Promise<MechanismResult> {
  switch (id) {
    case 'pio-exit': case 'coalesced-pio': return attempt(async () => {
      let seen = 0;
      const r = await timed(factory, cpl, BODY.outDx, n, SETUP.dx(CAL_PORT), (m) => {
        m.io.register({ port: CAL_PORT, size: 1 }, { name: 'count', write: () => { seen++; } });
        if (id === 'coalesced-pio') m.coalesce({ port: CAL_PORT, size: 1 });
      });
      await r.machine.close();
      // "Works" means every write reached the device, not just that the guest finished.
      return r.stop.reason !== 'debug-exit' ? broken(describeStop(r.stop)) : seen !== r.events ? broken(`${seen} of ${r.events} writes reached the device`) : ok(r.ns, n);
    });
    case 'mmio-exit': case 'coalesced-mmio': return attempt(async () => {
      let seen = 0;
      const r = await timed(factory, cpl, BODY.mmioWrite, n, SETUP.rax(MMIO_AT), (m) => {
        m.mmio.register({ address: MMIO_AT, size: 0x1000 }, { name: 'count', write: () => { seen++; }, read: () => 0 });
        if (id === 'coalesced-mmio') m.coalesce({ address: MMIO_AT, size: 0x1000 });
      });
      await r.machine.close();
      return r.stop.reason !== 'debug-exit' ? broken(describeStop(r.stop)) : seen !== r.events ? broken(`${seen} of ${r.events} writes reached the device`) : ok(r.ns, n);
    });
    case 'ro-slot-write': return attempt(async () => {
      const ro = 0x20_0000n * 2n; // above the 4 MiB of RAM
      const r = await timed(factory, cpl, BODY.mmioWrite, n, SETUP.rax(ro), (m) => {
        m.addRegion({ start: ro, size: 0x1000, readonly: true });
        m.mmio.register({ address: ro, size: 0x1000 }, sink);
      });
      await r.machine.close();
      return r.stop.reason === 'debug-exit' ? ok(r.ns, n) : broken(describeStop(r.stop));
    });
    case 'msr-exit': return attempt(async () => {
      const r = await timed(factory, cpl, BODY.rdmsr, n, SETUP.ecx(0xc000_0103), (m) => {
        m.interceptMsrs([0xc000_0103], []);
        m.addHook({ name: 'cal-msr', mode: 'mediate', matches: (e) => e.kind === 'msr', handle: () => ({ verdict: 'emulate', value: 0 }) });
      });
      await r.machine.close();
      return r.stop.reason === 'debug-exit' ? ok(r.ns, n) : broken(describeStop(r.stop));
    });
    case 'single-step': return attempt(async () => {
      let steps = 0;
      const r = await timed(factory, cpl, BODY.nop, n, [], (m) => {
        m.vcpu(0).setGuestDebug(GUESTDBG.ENABLE | GUESTDBG.SINGLESTEP);
        m.addHook({ name: 'cal-step', mode: 'mediate', matches: (e) => e.kind === 'debug', handle: () => { steps++; return { verdict: 'emulate', value: 0 }; } });
      });
      await r.machine.close();
      if (r.stop.reason !== 'debug-exit') return broken(`${steps <= 1 ? 'first step exits, then ' : ''}${describeStop(r.stop)}`);
      return steps >= 3 * r.events ? ok(r.ns / 3, steps, 'per step (3 instructions per iteration)') : broken(`only ${steps} of ${3 * r.events} steps exited`);
    });
    case 'sw-breakpoint': case 'probe-breakpoint': case 'hw-breakpoint': return attempt(() => breakpointExperiment(id, cpl, n, factory));
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
    case 'hook-dispatch': return ok(await measureHookDispatch(n), n, 'measured on the mock backend');
    case 'cpuid-table': return cpl === 0 ? ok(0, 0, 'set up front; no exit') : broken('not measured: on PVM CPL3 sees the outer hypervisor (see HOST-FACTS)');
    case 'exit': return ok(0, 0);
  }
}

function popcount(b: number): number {
  let n = 0;
  for (let x = b; x; x &= x - 1) n++;
  return n;
}

async function breakpointExperiment(id: 'sw-breakpoint' | 'hw-breakpoint' | 'probe-breakpoint', cpl: Cpl, n: number, factory: Factory): Promise<MechanismResult> {
  const { Monitor } = await import('../monitor.js');
  const guest = (iterations: number) => loopGuest(BODY.nop.concat([0x90, 0x90]), iterations, []);
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
  // Marginal cost per hit, as in timed(): (T(2n) − T(n)) with the hook minus the same without.
  const r1 = await run(true, n);
  if (r1.stop.reason !== 'debug-exit') return broken(describeStop(r1.stop));
  if (r1.hits !== n) return broken(`${r1.hits} of ${n} hits reached the VMM`);
  const r2 = await run(true, 2 * n);
  if (r2.stop.reason !== 'debug-exit') return broken(describeStop(r2.stop));
  const b1 = await run(false, n);
  const b2 = await run(false, 2 * n);
  const marginal = ((r2.stop.elapsedMs - r1.stop.elapsedMs) - (b2.stop.elapsedMs - b1.stop.elapsedMs)) * 1e6 / n;
  const ns = positiveOr(marginal, (r2.stop.elapsedMs - b2.stop.elapsedMs) * 1e6 / (2 * n));
  return ok(ns, n, id === 'probe-breakpoint' ? 'two exits per hit' : undefined);
}

/**
 * Monitor dispatch overhead per event (ns), on the mock backend: the same scripted exits with
 * and without a trivial mediate hook.
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
    if (hook) new Monitor(m, { guard: false }).mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => undefined);
    const t0 = performance.now();
    await m.run({ sliceMs: 1000 });
    const dt = performance.now() - t0;
    await m.close();
    return dt;
  };
  await once(true); // warm up the JIT
  const a = await once(false), b = await once(true);
  return Math.max(0, (b - a) * 1e6 / events);
}

/** Mechanisms `calibrate()` measures (everything but the bookkeeping entries). */
const MEASURED: readonly MechanismId[] = [
  'pio-exit', 'mmio-exit', 'coalesced-pio', 'coalesced-mmio', 'ro-slot-write', 'dirty-log-harvest', 'dirty-log-page', 'msr-exit',
  'single-step', 'sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint', 'hook-dispatch', 'cpuid-table', 'exit',
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
  const results = {} as Record<MechanismId, { cpl0: MechanismResult; cpl3: MechanismResult }>;
  for (const id of MEASURED) {
    const iterations = id === 'single-step' || id.endsWith('breakpoint') ? Math.min(n, 100) : n;
    results[id] = { cpl0: await experiment(id, 0, iterations, factory), cpl3: await experiment(id, 3, iterations, factory) };
  }
  const table: CalibrationTable = { version: 1, host, source: 'measured', createdAt: new Date().toISOString(), quick: options.quick ?? false, results };
  if (options.cachePath !== false) saveCalibration(table, path ? { path } : {});
  return table;
}
