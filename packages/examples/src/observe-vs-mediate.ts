/**
 * Example 4 — observe vs mediate. The same port-I/O stream (a guest writing N bytes to a
 * device port) watched two ways: a *mediate* hook (every write exits synchronously, the hook
 * could deny it) and an *observe* hook (the writes land in KVM's coalesced ring and are
 * delivered in batches at the next exit or slice end; the hook sees every byte but cannot
 * change it). The per-event cost of each is measured against the same loop without port
 * writes, in the same process, and the ratio printed next to the cost reports.
 *
 *   pnpm example:observe-vs-mediate [events]
 *
 * @module
 */
import { Machine } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Monitor, allow, renderTable, report, type CostReport, type MechanismId } from '@tsvm/monitor';
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

/** One way of watching. */
export interface WayResult {
  /** Mechanism the monitor chose. */
  readonly mechanism: MechanismId;
  /** Events the hook saw. */
  readonly events: number;
  /** Checksum of the bytes the hook saw (both ways must agree). */
  readonly checksum: number;
  /** Median run time (ms). */
  readonly runMs: number;
  /** Per event: (run − run of the loop without writes) / events (ns). */
  readonly perEventNs: number;
  /** The monitor's cost report for one run. */
  readonly report: CostReport;
}

/** What {@link runObserveVsMediate} measured. */
export interface ObserveVsMediateResult {
  /** Port writes per run. */
  readonly events: number;
  /** Runs per way (medians are reported). */
  readonly repeats: number;
  /** The loop without port writes (ms, median). */
  readonly baselineMs: number;
  /** Mediate hook. */
  readonly mediate: WayResult;
  /** Observe hook. */
  readonly observe: WayResult;
  /** mediate.perEventNs / observe.perEventNs. */
  readonly ratio: number;
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
};

/** Measures both ways (prints nothing). */
export async function runObserveVsMediate(options: { events?: number; repeats?: number } = {}): Promise<ObserveVsMediateResult> {
  const events = options.events ?? 5000;
  const repeats = options.repeats ?? 3;
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

  const runs: Record<'none' | 'mediate' | 'observe', Array<Awaited<ReturnType<typeof once>>>> = { none: [], mediate: [], observe: [] };
  await once('mediate'); // warm up the JIT and the asm engine
  for (let i = 0; i < repeats; i++) for (const way of ['none', 'mediate', 'observe'] as const) runs[way].push(await once(way));
  const baselineMs = median(runs.none.map((r) => r.ms));
  const way = (w: 'mediate' | 'observe'): WayResult => {
    const rs = runs[w];
    const runMs = median(rs.map((r) => r.ms));
    const last = rs[rs.length - 1] as (typeof rs)[number];
    return { mechanism: last.mechanism, events: last.seen, checksum: last.sum, runMs, perEventNs: (runMs - baselineMs) * 1e6 / events, report: last.report as CostReport };
  };
  const mediate = way('mediate'), observe = way('observe');
  return { events, repeats, baselineMs, mediate, observe, ratio: mediate.perEventNs / observe.perEventNs };
}

/** Prints the comparison; 0 when both ways saw every byte and observing was cheaper. */
export async function main(): Promise<number> {
  const arg = Number(process.argv[2]);
  const r = await runObserveVsMediate(Number.isInteger(arg) && arg > 0 ? { events: arg } : {});
  console.log(`${r.events} port writes per run, median of ${r.repeats} runs; loop without the writes: ${r.baselineMs.toFixed(2)} ms\n`);
  for (const [name, w] of [['mediate', r.mediate], ['observe', r.observe]] as const) {
    console.log(`${name.padEnd(8)} via ${w.mechanism.padEnd(14)} saw ${w.events} writes, run ${w.runMs.toFixed(2)} ms → ${(w.perEventNs / 1000).toFixed(2)} µs per event`);
  }
  console.log(`\nmeasured ratio: mediating costs ${r.ratio.toFixed(1)}× what observing costs per event\n`);
  console.log('cost report, mediate:');
  console.log(renderTable(r.mediate.report));
  console.log('cost report, observe:');
  console.log(renderTable(r.observe.report));
  const ok = r.mediate.events === r.events && r.observe.events === r.events && r.mediate.checksum === r.observe.checksum
    && r.observe.mechanism === 'coalesced-pio' && r.ratio > 1;
  console.log(ok ? 'OK: both ways saw the same stream; observing is cheaper' : 'FAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('observe-vs-mediate', main);
