/**
 * Cost-model accuracy benchmark. For each workload guest × hook set: calibrate once at the start
 * (`calibrate({ quick: true })`, forced, same process), predict the overhead of the hooks with
 * `predict()` from the plan and the known event counts, with prices re-measured before every pair
 * (median over the rounds), then measure it as the run time with the hooks minus the run time
 * without them — run time on the thread's CPU clock (`Stop.cpuMs`, as the prices), so another
 * process taking the CPU does not count as hook overhead; the wall-time difference is kept too — (same guest, same process, interleaved, median of `TSVM_COST_REPEATS` interleaved
 * pairs, with the spread of the per-pair differences). Prints a table and writes
 * bench-results/cost-model.json and, next to it, cost-model.svg (predicted vs measured overhead
 * per case, error bars over the pairs) with |predicted − measured| / measured per case, median
 * and worst, against the targets (≤ 10 % median, ≤ 30 % worst).
 *
 *   pnpm bench:cost
 *
 * Exit codes: 0 targets met, 1 missed, 2 KVM unavailable (reason printed).
 * @module
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { Machine, KvmUnavailableError, type Stop } from '@tsvm/core';
import { asm } from '@tsvm/core/testing';
import { median, spread, type Spread } from './stats.js';
import { Monitor, allow, emulate, predict, priceOf, renderChart, type CalibrationTable, type Cpl, type MechanismId } from '@tsvm/monitor';
import { ExitTimer, calibrate, remeasure, runCostMs } from '@tsvm/monitor/calibrate';

const MiB = 1024 * 1024;
const DEV_PORT = 0x3f8;
const END_PORT = 0xf4;
const MMIO_AT = 0xd000_0000;
const DATA_AT = 0x20_0000; // a RAM page the write workloads store to
const CODE_AT = 0x1000;
const MSR = 0xc000_0081; // IA32_STAR: rdmsr is handled in the kernel unless filtered

/** A workload guest. */
interface Workload {
  readonly name: string;
  readonly cpl: Cpl;
  /** Loop body (Intel syntax); the loop counter is ebx. */
  readonly body: string;
  /** Set-up before the loop. */
  readonly setup: string;
  /** Iterations. */
  readonly n: number;
  /** Devices etc., applied to both the baseline and the hooked machine. */
  readonly prepare?: (vm: Machine) => void;
}

/** A hook set on a workload: registers hooks, returns the expected event count per hook name. */
interface HookSet {
  readonly name: string;
  readonly install: (mon: Monitor, w: Workload, bodyAt: number) => Record<string, number>;
  /** Skip when this returns a reason (mechanism not working here). */
  readonly skip?: (cal: CalibrationTable, w: Workload) => string | undefined;
}

interface Case { readonly workload: Workload; readonly hooks: HookSet }

const sink = { name: 'sink', write: () => {}, read: () => 0 };

const W = {
  pio: { name: 'pio-loop', cpl: 3, setup: `mov dx, ${DEV_PORT}`, body: 'out dx, al', n: 6000, prepare: (vm) => { vm.io.register({ port: DEV_PORT, size: 8 }, sink); } },
  mmio: { name: 'mmio-loop', cpl: 0, setup: `mov rsi, ${MMIO_AT}`, body: 'mov byte ptr [rsi], al', n: 6000, prepare: (vm) => { vm.mmio.register({ address: MMIO_AT, size: 0x1000 }, sink); } },
  nop: { name: 'nop-loop', cpl: 3, setup: '', body: 'nop\n nop\n nop', n: 300 },
  store: { name: 'store-loop', cpl: 3, setup: `mov rdi, ${DATA_AT}`, body: 'mov dword ptr [rdi], ebx', n: 1000 },
  msr: { name: 'msr-loop', cpl: 0, setup: `mov ecx, ${MSR}`, body: 'rdmsr', n: 1000 },
  mixed: { name: 'mixed-loop', cpl: 0, setup: `mov dx, ${DEV_PORT}\n mov rdi, ${DATA_AT}`, body: 'out dx, al\n mov dword ptr [rdi], ebx\n nop\n nop', n: 500, prepare: (vm) => { vm.io.register({ port: DEV_PORT, size: 8 }, sink); } },
} satisfies Record<string, Workload>;

const works = (cal: CalibrationTable, m: MechanismId, cpl: Cpl): string | undefined => (priceOf(cal, m, cpl) === undefined ? `${m} does not work at CPL${cpl} here` : undefined);

const H = {
  mediatePio: { name: 'mediate pio', install: (mon, w) => { mon.mediate({ event: 'pio', ports: [DEV_PORT, DEV_PORT] }, () => allow(), { name: 'h' }); return { h: w.n }; } },
  observePio: { name: 'observe pio', install: (mon, w) => { mon.observe({ event: 'pio', ports: [DEV_PORT, DEV_PORT], direction: 'out' }, () => {}, { name: 'h' }); return { h: w.n }; }, skip: (c, w) => works(c, 'coalesced-pio', w.cpl) },
  mediateMmio: { name: 'mediate mmio', install: (mon, w) => { mon.mediate({ event: 'mmio', range: [MMIO_AT, MMIO_AT + 0xfff] }, () => allow(), { name: 'h' }); return { h: w.n }; } },
  observeMmio: { name: 'observe mmio', install: (mon, w) => { mon.observe({ event: 'mmio', range: [MMIO_AT, MMIO_AT + 0xfff], direction: 'write' }, () => {}, { name: 'h' }); return { h: w.n }; }, skip: (c, w) => works(c, 'coalesced-mmio', w.cpl) },
  exec: { name: 'exec (loop body)', install: (mon, w, at) => { mon.observe({ event: 'exec', address: at, cpl: w.cpl }, () => {}, { name: 'h' }); return { h: w.n }; } },
  writeWatch: { name: 'mediate write-watch', install: (mon, w) => { mon.mediate({ event: 'write-watch', range: [DATA_AT, DATA_AT + 0xfff] }, () => allow(), { name: 'h' }); return { h: w.n }; }, skip: (c, w) => works(c, 'ro-slot-write', w.cpl) },
  msr: { name: 'mediate msr (emulate)', install: (mon, w) => { mon.mediate({ event: 'msr', indices: [MSR], direction: 'read' }, () => emulate(0x1234), { name: 'h' }); return { h: w.n }; }, skip: (c, w) => works(c, 'msr-exit', w.cpl) },
  anyExit: { name: 'observe any-exit', install: (mon, w) => { mon.observe({ event: 'any-exit' }, () => {}, { name: 'h' }); return { h: w.n + 1 }; } },
  all3: {
    name: 'pio + write-watch + exec', skip: (c, w) => works(c, 'ro-slot-write', w.cpl),
    install: (mon, w, at) => {
      mon.mediate({ event: 'pio', ports: [DEV_PORT, DEV_PORT] }, () => allow(), { name: 'p' });
      mon.mediate({ event: 'write-watch', range: [DATA_AT, DATA_AT + 0xfff] }, () => allow(), { name: 'w' });
      mon.observe({ event: 'exec', address: at, cpl: w.cpl }, () => {}, { name: 'x' });
      return { p: w.n, w: w.n, x: w.n };
    },
  },
} satisfies Record<string, HookSet>;

const CASES: Case[] = [
  { workload: W.pio, hooks: H.mediatePio },
  { workload: W.pio, hooks: H.observePio },
  { workload: W.pio, hooks: H.anyExit },
  { workload: W.mmio, hooks: H.mediateMmio },
  { workload: W.mmio, hooks: H.observeMmio },
  { workload: W.nop, hooks: H.exec },
  { workload: W.store, hooks: H.writeWatch },
  { workload: W.msr, hooks: H.msr },
  { workload: W.mixed, hooks: H.all3 },
];

async function code(w: Workload): Promise<{ bytes: Uint8Array; bodyAt: number }> {
  const pre = `${w.setup}\n mov ebx, ${w.n}`;
  const head = await asm(pre, { bits: 64, address: CODE_AT });
  const src = `${pre}\n l: ${w.body}\n dec ebx\n jnz l\n mov dx, ${END_PORT}\n out dx, al`;
  return { bytes: await asm(src, { bits: 64, address: CODE_AT }), bodyAt: CODE_AT + head.length };
}

async function runOnce(w: Workload, img: { bytes: Uint8Array; bodyAt: number }, hooks: HookSet | undefined, cal: CalibrationTable): Promise<{ stop: Stop; vmmNs: number; pipelineNs: number; counts: Record<string, number>; plan: ReturnType<Monitor['plan']> | undefined }> {
  await using vm = await Machine.create({ memory: 4 * MiB, name: `cost:${w.name}` });
  vm.io.register({ port: END_PORT, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  const timer = new ExitTimer(vm, 2 * w.n + 64);
  w.prepare?.(vm);
  vm.loadFlat(img.bytes, { at: CODE_AT, mode: 'long', ring: w.cpl });
  let counts: Record<string, number> = {};
  let plan: ReturnType<Monitor['plan']> | undefined;
  let mon: Monitor | undefined;
  if (hooks) {
    mon = new Monitor(vm, { calibration: cal });
    counts = hooks.install(mon, w, img.bodyAt);
    // Not sealed: seal() re-adds the monitor's hooks, which would put its observe hooks after the
    // timer's end stamp. Sealing changes no per-exit work.
    timer.finish();
    plan = mon.plan();
  }
  if (!mon) timer.finish();
  const stop = await vm.run({ timeout: Number(process.env.TSVM_COST_RUN_TIMEOUT_MS ?? 30_000) });
  mon?.close();
  const vmmNs = Object.values(vm.stats().byKind).reduce((n, k) => n + k.handleNs, 0);
  if (stop.reason !== 'debug-exit') throw new Error(`${w.name}${hooks ? ` + ${hooks.name}` : ''}: guest stopped with ${stop.reason}${'message' in stop ? `: ${String(stop.message)}` : ''}`);
  return { stop, vmmNs, pipelineNs: timer.median() * stop.exits, counts, plan };
}


interface Row {
  readonly workload: string; readonly hooks: string; readonly cpl: Cpl; readonly mechanisms: string; readonly events: number;
  readonly baselineMs: number; readonly hookedMs: number; readonly measuredNs: number; readonly measured: Spread; readonly predictedNs: number; readonly error: number;
  /** Half the IQR of the per-pair differences over their median: the noise against the effect. */
  readonly noise: number;
  /** What the overhead was measured on: whole-run time, or exits × median per-exit pipeline time for exit-free hooks. */
  readonly basis: 'pipeline' | 'run-time';
  /** The per-round predictions (each from that round's prices): how much the prices moved during the case. */
  readonly predictedSpread: Spread;
  /** The whole-run differences, also for exit-free hooks (shown for comparison). */
  readonly wholeRun: Spread;
  /** The whole-run differences in wall time (what a busy host's preemptions add to). */
  readonly wallRun: Spread;
  /** The per-hook prices the prediction used (measured next to the case). */
  readonly prices: ReadonlyArray<{ hook: string; mechanism: string; unitNs: number; dispatchNs: number; overheadNs: number }>;
}

/**
 * `cal` with, for each of `mechanisms` at `cpl`, the median price over `rounds` (a mechanism
 * that failed in some round keeps the rounds where it worked; in none, the round's failure).
 */
function medianTable(cal: CalibrationTable, rounds: readonly CalibrationTable[], mechanisms: readonly MechanismId[], cpl: Cpl): CalibrationTable {
  const results = { ...cal.results } as Record<MechanismId, CalibrationTable['results'][MechanismId]>;
  for (const m of mechanisms) {
    const prices = rounds.map((t) => priceOf(t, m, cpl)).filter((v): v is number => v !== undefined);
    const key = cpl === 0 ? 'cpl0' : 'cpl3';
    const r = prices.length > 0 ? { works: true as const, ns: median(prices), samples: prices.length } : (rounds[0] ?? cal).results[m][key];
    results[m] = { ...results[m], [key]: r };
  }
  return { ...cal, results };
}

async function main(): Promise<number> {
  const repeats = Number(process.env.TSVM_COST_REPEATS ?? 15);
  let cal: CalibrationTable;
  const t0 = performance.now();
  try {
    cal = await calibrate({ quick: true, force: true });
  } catch (e) {
    if (e instanceof KvmUnavailableError) { console.error(`\n***** bench:cost SKIPPED: KVM is not available here: ${e.reason} *****\n`); return 0; }
    throw e;
  }
  const calSecs = (performance.now() - t0) / 1000;
  console.log(`calibrate({ quick: true }) on ${cal.host.flavour} (${cal.host.cpu}, ${cal.host.kernel}) took ${calSecs.toFixed(1)} s`);
  const rows: Row[] = [];
  const skipped: Array<{ workload: string; hooks: string; why: string }> = [];
  const failed: Array<{ workload: string; hooks: string; error: string }> = [];
  for (const c of CASES) {
    const why = c.hooks.skip?.(cal, c.workload);
    if (why) { skipped.push({ workload: c.workload.name, hooks: c.hooks.name, why }); continue; }
    try {
    const img = await code(c.workload);
    const warm = await runOnce(c.workload, img, c.hooks, cal); // warm-up (JIT, first-touch)
    await runOnce(c.workload, img, undefined, cal);
    // Prices measured *interleaved* with the case: before each pair, the case's mechanisms are
    // re-priced (quick calibration guests, not the workload); the prediction uses, per
    // mechanism, the median over those rounds. On a shared host prices follow the load (2×
    // within a minute), so prices and measurement must sample the same stretch of time.
    const used = new Set<MechanismId>(['hook-dispatch', 'observe-dispatch']);
    for (const p of warm.plan ?? []) {
      used.add(p.mechanism);
      if (p.mechanism === 'coalesced-pio') used.add('pio-exit');
      if (p.mechanism === 'coalesced-mmio') used.add('mmio-exit');
      if (p.mechanism === 'mmio-exit') used.add('mmio-dispatch');
      if (p.mechanism === 'probe-breakpoint' && (p.exitsPerHit ?? 1) > 1) used.add('probe-in-place');
    }
    used.delete('exit');
    const priceRounds: CalibrationTable[] = [];
    // A hook whose mechanism is the exit the workload makes anyway adds only dispatch: it cannot
    // change the time in KVM_RUN. Its overhead is then measured as exits × the change of the
    // median per-exit time in core's hook pipeline (ExitTimer), which carries neither the noise of
    // thousands of exits nor the thread's preemptions on a shared host.
    const exitFree = (warm.plan ?? []).every((p) => p.mechanism === 'pio-exit' || p.mechanism === 'mmio-exit' || p.mechanism === 'exit');
    const base: number[] = [], hooked: number[] = [], diffs: number[] = [], wholeDiffs: number[] = [], wallDiffs: number[] = [], predicted: number[] = [];
    let counts: Record<string, number> = {};
    let plan: ReturnType<Monitor['plan']> | undefined;
    // Interleaved pairs, alternating which one runs first; the overhead is the median of the
    // per-pair differences (two runs next to each other in time see the same host load).
    for (let i = 0; i < repeats; i++) {
      const round = await remeasure(cal, [...used], { cpls: [c.workload.cpl], quick: true });
      priceRounds.push(round);
      const b0 = i % 2 ? await runOnce(c.workload, img, undefined, cal) : undefined;
      const h = await runOnce(c.workload, img, c.hooks, cal);
      const b = b0 ?? await runOnce(c.workload, img, undefined, cal);
      // The same clock as the prices: the thread's CPU time where the backend has it (runCostMs).
      base.push(runCostMs(b.stop));
      hooked.push(runCostMs(h.stop));
      wholeDiffs.push((runCostMs(h.stop) - runCostMs(b.stop)) * 1e6);
      wallDiffs.push((h.stop.elapsedMs - b.stop.elapsedMs) * 1e6);
      diffs.push(exitFree ? h.pipelineNs - b.pipelineNs : (runCostMs(h.stop) - runCostMs(b.stop)) * 1e6);
      counts = h.counts;
      plan = h.plan;
      predicted.push(predict(h.plan ?? [], h.counts, round).totalNs);
    }
    const caseCal = medianTable(cal, priceRounds, [...used], c.workload.cpl);
    const prediction = predict(plan ?? [], counts, caseCal);
    const d = spread(diffs);
    const measuredNs = d.median;
    const p = spread(predicted);
    const row: Row = {
      predictedSpread: p,
      workload: c.workload.name, hooks: c.hooks.name, cpl: c.workload.cpl,
      mechanisms: [...new Set((plan ?? []).map((p) => p.mechanism))].join('+'),
      events: Object.values(counts).reduce((a, b) => a + b, 0),
      baselineMs: median(base), hookedMs: median(hooked), measuredNs, measured: d, predictedNs: prediction.totalNs,
      error: Math.abs(prediction.totalNs - measuredNs) / Math.abs(measuredNs),
      noise: (d.p75 - d.p25) / 2 / Math.abs(measuredNs),
      basis: exitFree ? 'pipeline' : 'run-time', wholeRun: spread(wholeDiffs), wallRun: spread(wallDiffs),
      prices: prediction.hooks.map((hp) => ({ hook: hp.name, mechanism: hp.mechanism, unitNs: hp.unitNs, dispatchNs: hp.dispatchNs, overheadNs: hp.overheadNs })),
    };
    rows.push(row);
    console.log(`  ${row.workload} + ${row.hooks}: measured ${(measuredNs / 1e6).toFixed(2)} ms [${(d.min / 1e6).toFixed(2)}–${(d.max / 1e6).toFixed(2)}] ±${(row.noise * 100).toFixed(0)} %, predicted ${(row.predictedNs / 1e6).toFixed(2)} ms [${(p.min / 1e6).toFixed(2)}–${(p.max / 1e6).toFixed(2)}], error ${(row.error * 100).toFixed(0)} %`);
    } catch (e) {
      // A case whose guest does not finish is a failure of the case, not of the benchmark: report it and go on.
      failed.push({ workload: c.workload.name, hooks: c.hooks.name, error: (e as Error).message });
      console.log(`  ${c.workload.name} + ${c.hooks.name}: FAILED: ${(e as Error).message}`);
    }
  }
  const errors = rows.map((r) => r.error);
  const med = median(errors), worst = Math.max(...errors);
  const targets = { median: 0.1, worst: 0.3 };
  const pass = rows.length >= 6 && failed.length === 0 && med <= targets.median && worst <= targets.worst;

  const fmt = (ns: number): string => `${(ns / 1e6).toFixed(2)} ms`;
  const clock = rows.length > 0 && cal.host.flavour !== 'mock' ? 'the thread\'s CPU time (Stop.cpuMs; prices use the same clock)' : 'wall time';
  console.log('\nCost model accuracy: overhead = median over', repeats, `interleaved pairs of (run with hooks − run without), on ${clock}`);
  console.table(rows.map((r) => ({
    workload: r.workload, hooks: r.hooks, cpl: r.cpl, mechanism: r.mechanisms, events: r.events, basis: r.basis,
    'without': `${r.baselineMs.toFixed(2)} ms`, 'with': `${r.hookedMs.toFixed(2)} ms`,
    measured: fmt(r.measuredNs), 'min–max': `${(r.measured.min / 1e6).toFixed(2)}–${(r.measured.max / 1e6).toFixed(2)}`, '±noise': `${(r.noise * 100).toFixed(0)} %`,
    predicted: fmt(r.predictedNs), 'pred. min–max': `${(r.predictedSpread.min / 1e6).toFixed(2)}–${(r.predictedSpread.max / 1e6).toFixed(2)}`, '|err|': `${(r.error * 100).toFixed(0)} %`,
  })));
  for (const s of skipped) console.log(`skipped ${s.workload} + ${s.hooks}: ${s.why}`);
  for (const f of failed) console.log(`FAILED ${f.workload} + ${f.hooks}: ${f.error}`);
  console.log(`median |err| ${(med * 100).toFixed(1)} % (target ≤ ${targets.median * 100} %), worst ${(worst * 100).toFixed(1)} % (target ≤ ${targets.worst * 100} %) over ${rows.length} cases: ${pass ? 'PASS' : 'MISS'}`);
  if (cal.host.flavour === 'svm' && /QEMU|TCG/i.test(cal.host.cpu)) console.log('note: nested KVM under QEMU TCG — timings are not representative of a real host');

  mkdirSync('bench-results', { recursive: true });
  const json = JSON.stringify({
    date: new Date().toISOString(), host: cal.host, clock, calibrationSeconds: calSecs, repeats, targets,
    median: med, worst, pass, cases: rows, skipped, failed, calibration: cal.results,
  }, null, 2);
  writeFileSync('bench-results/cost-model.json', `${json}\n`);
  const svg = renderChart({
    title: `Cost model: predicted vs measured hook overhead (${cal.host.flavour})`,
    predictedLabel: 'predicted (calibration prices, median of rounds)',
    measuredLabel: `measured (median of ${repeats} pairs)`,
    spreadLabel: 'measured min–max',
    rows: rows.map((r) => ({
      label: `${r.workload} + ${r.hooks}`, detail: `${r.mechanisms}, CPL${r.cpl}, ${r.events} events, ${r.basis}`,
      predictedNs: r.predictedNs, measuredNs: r.measuredNs, spread: { lowNs: r.measured.min, highNs: r.measured.max, n: r.measured.n }, note: `|err| ${(r.error * 100).toFixed(0)} %`,
    })),
    footnote: `${new Date().toISOString().slice(0, 10)}, ${cal.host.cpu}, ${cal.host.kernel}; median |err| ${(med * 100).toFixed(1)} %, worst ${(worst * 100).toFixed(1)} %; shared host, noisy`,
  });
  writeFileSync('bench-results/cost-model.svg', `${svg}\n`);
  console.log('wrote bench-results/cost-model.json and bench-results/cost-model.svg');
  return pass ? 0 : 1;
}

process.exitCode = await main();
