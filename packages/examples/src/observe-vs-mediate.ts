/**
 * Example 4 — observe vs mediate. The same port-I/O stream (a guest writing N bytes to a
 * device port) watched two ways: a *mediate* hook (every write exits synchronously, the hook
 * could deny it) and an *observe* hook (the writes land in KVM's coalesced ring and are
 * delivered in batches at the next exit or slice end; the hook sees every byte but cannot
 * change it). The per-event cost of each is measured against the same loop without port
 * writes, in the same process, in interleaved rounds, with the spread over the rounds, and
 * printed next to what the cost report prices an event at. One run figure: the median run's
 * `Stop.elapsedMs`, whose cost report is printed.
 *
 *   pnpm example:observe-vs-mediate [events]
 *
 * @module
 */
import { Machine } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Monitor, allow, formatReport, report, textTable, type CostReport, type MechanismId } from '@tsvm/monitor';
import { hostCalibration, isMain, runCli } from './support.js';

const PORT = 0x3f8;
const END = 0xf4;

function guest(events: number, write: boolean): string {
  return `
    mov ecx, ${events}
    mov dx, ${PORT}
    xor eax, eax
  l:
    inc al
    ${write ? 'out dx, al' : 'nop'}
    dec ecx
    jnz l
    mov dx, ${END}
    out dx, al
  `;
}

/** Min, median and max of a sample. */
export interface Range {
  /** Smallest. */
  readonly min: number;
  /** Median (for an even count, the lower middle sample, so it is one of the runs). */
  readonly median: number;
  /** Largest. */
  readonly max: number;
}

function range(xs: readonly number[]): Range {
  const s = [...xs].sort((a, b) => a - b);
  return { min: s[0] as number, median: s[(s.length - 1) >> 1] as number, max: s[s.length - 1] as number };
}

/** One way of watching. */
export interface WayResult {
  /** Mechanism the monitor chose. */
  readonly mechanism: MechanismId;
  /** Events the hook saw. */
  readonly events: number;
  /** Checksum of the bytes the hook saw (both ways must agree). */
  readonly checksum: number;
  /**
   * The run figure (ms): `Stop.elapsedMs` of the median run. {@link WayResult.report} is that
   * same run's cost report, so both print the same number.
   */
  readonly runMs: number;
  /** Run times over the repeats (ms). */
  readonly runs: Range;
  /** Measured per event: (run − the loop without writes) / events of the median runs (ns). */
  readonly perEventNs: number;
  /** The same per round (the runs next to each other in time), over the repeats (ns). */
  readonly perEvent: Range;
  /** What the cost report prices one event at: unit + dispatch + handler (ns). */
  readonly pricedPerEventNs: number;
  /** The monitor's cost report of the median run. */
  readonly report: CostReport;
}

/** What {@link runObserveVsMediate} measured. */
export interface ObserveVsMediateResult {
  /** Port writes per run. */
  readonly events: number;
  /** Runs per way (medians are reported). */
  readonly repeats: number;
  /** The loop without port writes (ms, median run). */
  readonly baselineMs: number;
  /** Mediate hook. */
  readonly mediate: WayResult;
  /** Observe hook. */
  readonly observe: WayResult;
  /** mediate.perEventNs / observe.perEventNs. */
  readonly ratio: number;
}

/** Measures both ways (prints nothing). */
export async function runObserveVsMediate(options: { events?: number; repeats?: number } = {}): Promise<ObserveVsMediateResult> {
  const events = options.events ?? 5000;
  const repeats = options.repeats ?? 5;
  const calibration = await hostCalibration();
  const code = { with: await asm(guest(events, true), { bits: 64, address: 0x1000 }), without: await asm(guest(events, false), { bits: 64, address: 0x1000 }) };

  const once = async (way: 'none' | 'mediate' | 'observe'): Promise<{ ms: number; seen: number; sum: number; mechanism: MechanismId; report: CostReport | undefined }> => {
    await using vm = await Machine.create({ memory: 2 * 1024 * 1024, name: `observe-vs-mediate:${way}` });
    vm.io.register({ port: PORT, size: 1 }, { name: 'sink', write: () => {} });
    vm.io.register({ port: END, size: 1 }, { name: 'debug-exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    vm.loadFlat(way === 'none' ? code.without : code.with, { at: 0x1000, mode: 'long', ring: 3 });
    let seen = 0, sum = 0;
    let mon: Monitor | undefined;
    let mechanism: MechanismId = 'exit';
    if (way !== 'none') {
      mon = new Monitor(vm, calibration ? { calibration } : {});
      const spec = { event: 'pio', ports: [PORT, PORT], direction: 'out' } as const;
      const see = (ev: Parameters<Parameters<Monitor['observe']>[1]>[0]): void => { if (ev.event === 'pio') { seen++; sum = (sum + (ev.value ?? 0)) % 65521; } };
      const h = way === 'mediate'
        ? mon.mediate(spec, (ev) => { see(ev); return allow(); }, { name: 'uart-writes' })
        : mon.observe(spec, see, { name: 'uart-writes' });
      mon.seal();
      mechanism = mon.plan().find((p) => p.name === 'uart-writes')?.mechanism ?? h.mechanism;
    }
    const stop = await vm.run({ timeout: 60_000 });
    if (stop.reason !== 'debug-exit') throw new Error(`${way}: guest stopped with ${stop.reason}${'message' in stop ? `: ${String(stop.message)}` : ''}`);
    const r = mon ? report(mon, { run: stop }) : undefined;
    mon?.close();
    return { ms: stop.elapsedMs, seen, sum, mechanism, report: r };
  };

  const ways = ['none', 'mediate', 'observe'] as const;
  const runs: Record<(typeof ways)[number], Array<Awaited<ReturnType<typeof once>>>> = { none: [], mediate: [], observe: [] };
  for (const w of ways) await once(w); // warm up the JIT, the asm engine and first-use code paths
  // Interleaved rounds, each starting one way later, so no way always runs first after a pause.
  for (let i = 0; i < repeats; i++) for (let j = 0; j < ways.length; j++) { const w = ways[(i + j) % ways.length] as (typeof ways)[number]; runs[w].push(await once(w)); }
  const baselineMs = range(runs.none.map((r) => r.ms)).median;
  const way = (w: 'mediate' | 'observe'): WayResult => {
    const rs = runs[w];
    const runsMs = range(rs.map((r) => r.ms));
    const mid = rs.find((r) => r.ms === runsMs.median) as (typeof rs)[number];
    const report = mid.report as CostReport;
    const h = report.hooks.find((x) => x.name === 'uart-writes');
    return {
      mechanism: mid.mechanism, events: mid.seen, checksum: mid.sum, runMs: report.runNs / 1e6, runs: runsMs,
      perEventNs: (report.runNs / 1e6 - baselineMs) * 1e6 / events,
      perEvent: range(rs.map((r, i) => (r.ms - (runs.none[i] as (typeof rs)[number]).ms) * 1e6 / events)),
      pricedPerEventNs: h?.perEventNs ?? NaN, report,
    };
  };
  const mediate = way('mediate'), observe = way('observe');
  return { events, repeats, baselineMs, mediate, observe, ratio: mediate.perEventNs / observe.perEventNs };
}

/** Prints the comparison; 0 when both ways saw every byte and observing was cheaper. */
export async function main(): Promise<number> {
  const arg = Number(process.argv[2]);
  const r = await runObserveVsMediate(Number.isInteger(arg) && arg > 0 ? { events: arg } : {});
  console.log(`${r.events} port writes per run, ${r.repeats} interleaved rounds; loop without the writes: ${r.baselineMs.toFixed(2)} ms (median run)`);
  console.log('run = Stop.elapsedMs of the median run; the cost reports below are of those same runs.\n');
  const us = (ns: number): string => `${(ns / 1000).toFixed(2)} µs`;
  console.log(textTable([['mediate', r.mediate], ['observe', r.observe]].map(([name, w]) => {
    const x = w as WayResult;
    return {
      way: name as string, mechanism: x.mechanism, seen: x.events, run: `${x.runMs.toFixed(2)} ms`, 'runs min–max': `${x.runs.min.toFixed(1)}–${x.runs.max.toFixed(1)} ms`,
      'measured per event': us(x.perEventNs), 'per round min–max': `${(x.perEvent.min / 1000).toFixed(2)}–${(x.perEvent.max / 1000).toFixed(2)} µs`, 'priced per event': us(x.pricedPerEventNs),
    };
  })));
  console.log('measured per event = (run − loop without writes) / writes; priced = the report\'s unit + dispatch + handler');
  console.log(`\nmeasured ratio: mediating costs ${r.ratio.toFixed(1)}× what observing costs per event\n`);
  console.log(formatReport(r.mediate.report));
  console.log('');
  console.log(formatReport(r.observe.report));
  const ok = r.mediate.events === r.events && r.observe.events === r.events && r.mediate.checksum === r.observe.checksum
    && r.observe.mechanism === 'coalesced-pio' && r.ratio > 1;
  console.log(ok ? 'OK: both ways saw the same stream; observing is cheaper' : 'FAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('observe-vs-mediate', main);
