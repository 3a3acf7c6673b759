/**
 * Rendering plans and cost reports: flat rows for `console.table` ({@link planRows},
 * {@link costRows}), text tables ({@link formatPlan}, {@link formatReport}), JSON, and an SVG chart
 * of predicted vs measured overhead per hook ({@link renderSvg}, drawn by `chart.ts`).
 * @module
 */
import type { PlanEntry } from '../monitor.js';
import type { CostReport, Prediction } from './model.js';
import { renderChart, type CostChart } from './chart.js';

/** Formats nanoseconds for people: `850 ns`, `12.3 µs`, `4.56 ms`, `1.20 s`. */
export function formatNs(ns: number): string {
  if (!Number.isFinite(ns)) return '—';
  const a = Math.abs(ns);
  if (a < 1e3) return `${ns.toFixed(0)} ns`;
  if (a < 1e6) return `${(ns / 1e3).toFixed(1)} µs`;
  if (a < 1e9) return `${(ns / 1e6).toFixed(2)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}

/** A signed overhead for people: `+1.20 ms`, or `saves 4.56 ms` when negative (never a negative overhead). */
export function formatOverhead(ns: number): string {
  if (!Number.isFinite(ns)) return '—';
  return ns < 0 ? `saves ${formatNs(-ns)}` : `+${formatNs(ns)}`;
}

const pct = (x: number): string => (Number.isFinite(x) ? `${(x * 100).toFixed(1)} %` : '—');

/** One flat row per plan entry (primitive columns only), for `console.table` or a CSV. */
export interface PlanRow {
  /** Hook name. */
  readonly hook: string;
  /** Mediate or observe. */
  readonly mode: string;
  /** What it watches. */
  readonly target: string;
  /** `CPL0` / `CPL3`. */
  readonly cpl: string;
  /** Chosen mechanism. */
  readonly mechanism: string;
  /** Price per event, formatted. */
  readonly unit: string;
  /** Why the mechanism was chosen. */
  readonly why: string;
  /** The rejected mechanisms, `name: why; …` (empty when none). */
  readonly rejected: string;
}

/** The plan as flat rows: `console.table(planRows(mon.plan()))` prints readably. */
export function planRows(plan: readonly PlanEntry[]): PlanRow[] {
  return plan.map((p) => ({
    hook: p.name, mode: p.mode, target: p.target, cpl: `CPL${p.cpl}`, mechanism: p.mechanism, unit: formatNs(p.unitNs), why: p.why,
    rejected: p.rejected.map((r) => `${r.mechanism}: ${r.why}`).join('; '),
  }));
}

/** One flat row per hook of a report (primitive columns only, times formatted). */
export interface CostRow {
  /** Hook name. */
  readonly hook: string;
  /** Mediate or observe. */
  readonly mode: string;
  /** Mechanism. */
  readonly mechanism: string;
  /** `CPL0` / `CPL3`. */
  readonly cpl: string;
  /** Events delivered. */
  readonly events: number;
  /** Mechanism price per event. */
  readonly unit: string;
  /** Dispatch per event. */
  readonly dispatch: string;
  /** Handler time per event. */
  readonly handler: string;
  /** unit + dispatch + handler: one event's price. */
  readonly 'per event': string;
  /** events × per event. */
  readonly total: string;
  /** Against the run without the hook: `+x` or `saves x`. */
  readonly 'vs no hook': string;
  /** total / run. */
  readonly share: string;
  /** The cheaper alternative and what it would save (empty when none). */
  readonly cheaper: string;
}

/** The report as flat rows: `console.table(costRows(report(mon)))` prints readably. */
export function costRows(r: CostReport): CostRow[] {
  return r.hooks.map((h) => ({
    hook: h.name, mode: h.mode, mechanism: h.mechanism, cpl: `CPL${h.cpl}`, events: h.events,
    unit: formatNs(h.unitNs), dispatch: formatNs(h.events > 0 ? h.dispatchNs / h.events : 0), handler: formatNs(h.events > 0 ? h.handlerNs / h.events : 0),
    'per event': formatNs(h.perEventNs), total: formatNs(h.totalNs), 'vs no hook': formatOverhead(h.overheadNs), share: pct(h.share),
    cheaper: h.alternative ? `${h.alternative.change} (${h.alternative.mechanism}): saves ${formatNs(h.alternative.savesNs)}` : '',
  }));
}

/** Plain-text table of `rows` (strings left-aligned, numbers and times right-aligned). */
export function textTable<R extends object>(rows: readonly R[], columns?: readonly (keyof R & string)[]): string {
  const cols: readonly string[] = columns ?? Object.keys(rows[0] ?? {});
  const cells = rows.map((r) => cols.map((c) => String((r as Record<string, unknown>)[c] ?? '')));
  const widths = cols.map((c, i) => Math.max(c.length, ...cells.map((r) => (r[i] as string).length)));
  const numeric = cols.map((_c, i) => cells.length > 0 && cells.every((r) => /^[-+−]?[\d.]+( ?(ns|µs|ms|s|%))?$|^—$|^saves /.test(r[i] as string)));
  const line = (cs: readonly string[]): string => cs.map((c, i) => (numeric[i] ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0))).join('  ').trimEnd();
  return [line(cols), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.map(line)].join('\n');
}

/** The plan as a text table, one line per hook. */
export function formatPlan(plan: readonly PlanEntry[]): string {
  return textTable(planRows(plan), ['hook', 'mode', 'target', 'cpl', 'mechanism', 'unit', 'why']);
}

/**
 * The report as text: the run figure with its source, where the run's time went (one-time costs
 * apart from per-event ones), one row per hook, and the cheaper alternatives.
 */
export function formatReport(r: CostReport): string {
  const run = r.run;
  const src = run.source === 'stop' ? 'Stop.elapsedMs, wall time of run()' : run.source === 'given' ? 'given by the caller' : 'exit counters: Σ KVM_RUN + exit handling';
  const rows = costRows(r);
  const alts = r.hooks.filter((h) => h.alternative).map((h) => `  ${h.name}: ${h.alternative?.change} (${h.alternative?.mechanism}) would save ${formatNs(h.alternative?.savesNs ?? NaN)}`);
  const net = r.overheadNs;
  return [
    `cost report for '${r.monitor}' (${r.source} prices)`,
    `run ${formatNs(run.ns)} (${src}); ${run.exits} exits`,
    `  in the guest (KVM_RUN)        ${formatNs(run.guestNs)}`,
    `  exit handling in the VMM      ${formatNs(run.vmmNs)}, of which charged to no hook ${formatNs(run.unchargedVmmNs)} (devices, first-use set-up)`,
    `  one-time (set-up, first entry, slices)  ${formatNs(run.oneTimeNs)}`,
    `hooks: per-event total ${formatNs(r.totalNs)}, against the run without them ${formatOverhead(net)}`,
    textTable(rows, ['hook', 'mechanism', 'cpl', 'events', 'unit', 'dispatch', 'handler', 'per event', 'total', 'vs no hook', 'share']),
    ...(alts.length ? ['cheaper alternatives:', ...alts] : []),
  ].join('\n');
}

/** Same as {@link formatReport} (the older name). */
export function renderTable(r: CostReport): string {
  return formatReport(r);
}

/** The report as JSON (numbers in ns; NaN becomes null). */
export function renderJson(r: CostReport): string {
  return JSON.stringify(r, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2);
}

/**
 * The chart of a report: per hook, the predicted overhead (from {@link predict}) against the
 * overhead priced after the run from what the monitor counted (events, handler time). Both are
 * overheads over the run without the hook, so like is compared with like. A report holds one run,
 * so it has no spread; the cost benchmark draws the spread over repeats with {@link renderChart}.
 */
export function reportChart(measured: CostReport, predicted: Prediction | undefined, options: { title?: string } = {}): CostChart {
  const pred = new Map(predicted?.hooks.map((h) => [h.name, h.overheadNs]) ?? []);
  return {
    title: options.title ?? `Hook overhead — ${measured.monitor}`,
    predictedLabel: 'predicted (before the run)',
    measuredLabel: 'priced after the run (counted events, timed handlers)',
    rows: measured.hooks.map((h) => ({ label: h.name, detail: `${h.mechanism}, CPL${h.cpl}, ${h.events} events`, predictedNs: pred.get(h.name), measuredNs: h.overheadNs })),
    footnote: `${measured.source} prices; run ${formatNs(measured.runNs)} (${measured.run.source})`,
  };
}

/** The report as an SVG chart ({@link reportChart} drawn by {@link renderChart}). */
export function renderSvg(measured: CostReport, predicted: Prediction | undefined, options: { title?: string } = {}): string {
  return renderChart(reportChart(measured, predicted, options));
}
