/**
 * The cost model. `predict(plan, counts)` prices a plan *before* a run from the calibration
 * table; `report(monitor)` prices what happened *after* one, from the monitor's counters and
 * core's hook timings, and says what the cheaper alternative would have saved.
 *
 * Prices. `unitNs` is the full price of delivering one event through the mechanism. `overhead`
 * is what the hook adds compared with the same run without it: for port and MMIO hooks the
 * exit happens anyway (the guest touches a device), so only the difference counts — which is
 * *negative* when an observe hook moves a device's writes to the coalesced ring. Probes,
 * breakpoints, single-step, MSR exits and read-only-slot faults are induced in full.
 * @module
 */
import { InvalidArgumentError, type Machine, type Stop } from '@tsvm/core';
import { priceOf, probePriceOf, type CalibrationTable, type Cpl, type MechanismId } from '../calibration/table.js';
import type { Monitor, PlanEntry } from '../monitor.js';

/**
 * The monitor's per-event dispatch price at `cpl` for a hook of `mode` (calibrated per CPL on a
 * real host; CPL0's otherwise). An observer skips the decision pipeline (validation, verdict
 * counters, audit), so it has its own price; tables without one use the mediate price.
 */
function dispatchPriceAt(table: CalibrationTable, cpl: Cpl, mode: 'mediate' | 'observe' = 'mediate', mechanism?: MechanismId): number {
  const observe = mode === 'observe' ? priceOf(table, 'observe-dispatch', cpl) ?? priceOf(table, 'observe-dispatch', 0) : undefined;
  // A mediate hook on MMIO goes through the MMIO half of the pipeline (range lookup, the
  // access's own decode): priced on MMIO exits where the table has it.
  const mmio = mode === 'mediate' && mechanism === 'mmio-exit' ? priceOf(table, 'mmio-dispatch', cpl) ?? priceOf(table, 'mmio-dispatch', 0) : undefined;
  return observe ?? mmio ?? priceOf(table, 'hook-dispatch', cpl) ?? priceOf(table, 'hook-dispatch', 0) ?? 0;
}

/**
 * Mechanisms `calibrate()` prices *through the monitor* (a Monitor with one trivial user hook
 * delivers every event of the experiment): their unit price already holds the dispatch, which
 * must not be charged twice.
 */
const DELIVERED_IN_UNIT: ReadonlySet<MechanismId> = new Set<MechanismId>(['ro-slot-write', 'msr-exit', 'probe-breakpoint', 'hw-breakpoint', 'sw-breakpoint']);

/** Dispatch charged per event on top of the unit price of `mechanism`. */
function extraDispatch(table: CalibrationTable, mechanism: MechanismId, cpl: Cpl, mode: 'mediate' | 'observe'): number {
  return table.source === 'measured' && DELIVERED_IN_UNIT.has(mechanism) ? 0 : dispatchPriceAt(table, cpl, mode, mechanism);
}

/** What the same event would cost without the hook (ns). */
export function baselineNs(table: CalibrationTable, mechanism: MechanismId, cpl: Cpl): number {
  switch (mechanism) {
    case 'pio-exit': case 'coalesced-pio': return priceOf(table, 'pio-exit', cpl) ?? 0;
    case 'mmio-exit': case 'coalesced-mmio': return priceOf(table, 'mmio-exit', cpl) ?? 0;
    default: return 0;
  }
}

/** One hook's prediction. */
export interface HookPrediction {
  /** Hook name. */
  readonly name: string;
  /** Mechanism. */
  readonly mechanism: MechanismId;
  /** CPL priced at. */
  readonly cpl: Cpl;
  /** Expected events. */
  readonly events: number;
  /** Full mechanism price per event (ns). */
  readonly unitNs: number;
  /** Monitor dispatch per event (ns). */
  readonly dispatchNs: number;
  /** Expected handler time per event (ns), if given. */
  readonly handlerNs: number;
  /** Predicted overhead per event over the run without the hook (ns): unit − baseline + dispatch + handler; negative when the hook's mechanism is cheaper than the exit it replaces. */
  readonly perEventNs: number;
  /** Predicted overhead over the run without the hook (ns), signed: negative is a saving (see {@link HookPrediction.savesNs}). */
  readonly overheadNs: number;
  /** What the hook saves over the run without it (ns, ≥ 0): `max(0, −overheadNs)`. Renderers show this, never a negative overhead. */
  readonly savesNs: number;
}

/** A plan's prediction. */
export interface Prediction {
  /** Per hook. */
  readonly hooks: readonly HookPrediction[];
  /** Sum of overheads (ns). */
  readonly totalNs: number;
  /** Whether the prices were measured or assumed. */
  readonly source: CalibrationTable['source'];
}

/**
 * Predicts the overhead of `plan` for `counts` expected events per hook name (hooks not named
 * count 0). `handlerNs` optionally gives a per-event handler estimate per hook name.
 */
export function predict(plan: readonly PlanEntry[], counts: Readonly<Record<string, number>>, table: CalibrationTable, options: { handlerNs?: Readonly<Record<string, number>> } = {}): Prediction {
  const hooks = plan.map((p): HookPrediction => {
    const dispatch = extraDispatch(table, p.mechanism, p.cpl, p.mode);
    const events = counts[p.name] ?? 0;
    if (!Number.isFinite(events) || events < 0) throw new InvalidArgumentError(`counts['${p.name}']`, 'must be a non-negative number');
    // A probe hit on an instruction that must run in place costs two exits (see PlanEntry.exitsPerHit).
    const unit = (p.mechanism === 'probe-breakpoint' ? probePriceOf(table, p.cpl, p.exitsPerHit ?? 1) : priceOf(table, p.mechanism, p.cpl)) ?? NaN;
    const handler = options.handlerNs?.[p.name] ?? 0;
    // A hook whose mechanism is the exit the event makes anyway (a mediate hook on a port that
    // exits to its device) adds dispatch and handler, not an exit: baselineNs cancels the unit.
    const perEventNs = unit - baselineNs(table, p.mechanism, p.cpl) + dispatch + handler;
    const overheadNs = events * perEventNs;
    return { name: p.name, mechanism: p.mechanism, cpl: p.cpl, events, unitNs: unit, dispatchNs: dispatch, handlerNs: handler, perEventNs, overheadNs, savesNs: Math.max(0, -overheadNs) };
  });
  return { hooks, totalNs: hooks.reduce((n, h) => n + h.overheadNs, 0), source: table.source };
}

/** A cheaper way to get (nearly) the same event. */
export interface Alternative {
  /** The other mechanism. */
  readonly mechanism: MechanismId;
  /** What changes for the user, e.g. "observe instead of mediate". */
  readonly change: string;
  /** Nanoseconds it would have saved over this run. */
  readonly savesNs: number;
}

/** One hook after a run. */
export interface HookCost {
  /** Hook name. */
  readonly name: string;
  /** Mediate or observe. */
  readonly mode: 'mediate' | 'observe';
  /** Event name. */
  readonly event: string;
  /** Mechanism. */
  readonly mechanism: MechanismId;
  /** CPL priced at. */
  readonly cpl: Cpl;
  /** Events delivered. */
  readonly events: number;
  /** Mechanism price per event (ns). */
  readonly unitNs: number;
  /** Time in the hook function (ns). */
  readonly handlerNs: number;
  /** The monitor's dispatch beyond the function (table lookup, decision check, audit): events × the calibrated dispatch price (ns). */
  readonly dispatchNs: number;
  /** events × unit + handler + dispatch (ns): what delivering the events cost, all of it per event. */
  readonly totalNs: number;
  /** totalNs / events: the price of one event, mechanism + dispatch + handler (ns; unit + dispatch when no event came). */
  readonly perEventNs: number;
  /** Overhead over the run without the hook (ns), signed: negative when the hook's mechanism is cheaper than the exit it replaces (see {@link HookCost.savesNs}). */
  readonly overheadNs: number;
  /** What the hook saved over the run without it (ns, ≥ 0): `max(0, −overheadNs)`. */
  readonly savesNs: number;
  /** totalNs / run time. */
  readonly share: number;
  /** The cheaper alternative, if any. */
  readonly alternative: Alternative | undefined;
}

/**
 * Where a run's time went, from core's exit counters: the one run figure ({@link RunTime.ns},
 * whose source is named) split into time in the guest, per-exit handling in the VMM, and what
 * the run paid outside both (once: set-up, first entry, slice boundaries).
 */
export interface RunTime {
  /** The run figure (ns): the same number every renderer prints. */
  readonly ns: number;
  /** Where {@link RunTime.ns} came from: `stop` (`Stop.elapsedMs`, wall time of `run()`), `given` (the caller's ns) or `exit-counters` (Σ time in KVM_RUN + exit handling). */
  readonly source: 'stop' | 'given' | 'exit-counters';
  /** Exits the run made. */
  readonly exits: number;
  /** Σ time inside KVM_RUN (guest code and the kernel's side of each exit), ns. */
  readonly guestNs: number;
  /** Σ time handling exits in the VMM (devices, hooks, decisions, deny explanations), ns. */
  readonly vmmNs: number;
  /** The part of {@link RunTime.vmmNs} not charged to any hook's handler or dispatch: devices, and one-time work on a first use (e.g. loading the disassembler for the first deny's explanation), ns. */
  readonly unchargedVmmNs: number;
  /** One-time: ns − guestNs − vmmNs (≥ 0): machine set-up inside `run()`, first entry, slice boundaries, event-loop turns. */
  readonly oneTimeNs: number;
}

/** A run's cost report. */
export interface CostReport {
  /** Monitor name. */
  readonly monitor: string;
  /** Run time (ns): the same figure as {@link RunTime.ns}. */
  readonly runNs: number;
  /** The run figure, its source and where the time went. */
  readonly run: RunTime;
  /** Per hook. */
  readonly hooks: readonly HookCost[];
  /** Sum of hook totals (ns). */
  readonly totalNs: number;
  /** Sum of hook overheads (ns, signed). */
  readonly overheadNs: number;
  /** Whether the prices were measured or assumed. */
  readonly source: CalibrationTable['source'];
}

function alternativeFor(table: CalibrationTable, machine: Machine, h: { mode: string; event: string; mechanism: MechanismId; cpl: Cpl; events: number; onlyAllowed: boolean }): Alternative | undefined {
  const save = (to: MechanismId, change: string): Alternative | undefined => {
    const a = priceOf(table, h.mechanism, h.cpl), b = priceOf(table, to, h.cpl);
    return a !== undefined && b !== undefined && b < a ? { mechanism: to, change, savesNs: h.events * (a - b) } : undefined;
  };
  const caps = machine.capabilities;
  switch (h.mechanism) {
    case 'pio-exit':
      if (h.event === 'pio' && h.mode === 'mediate' && h.onlyAllowed && caps.coalescedPio) return save('coalesced-pio', 'observe instead of mediate (it only ever allowed)');
      if (h.event === 'pio' && h.mode === 'observe' && caps.coalescedPio) return save('coalesced-pio', 'remove the overlapping mediate hook so the range can be coalesced');
      return undefined;
    case 'mmio-exit':
      if (h.mode === 'mediate' && h.onlyAllowed && caps.coalescedMmio) return save('coalesced-mmio', 'observe instead of mediate (it only ever allowed)');
      return undefined;
    case 'ro-slot-write': return h.onlyAllowed ? save('dirty-log-page', 'observe (dirty log) instead of mediate') : undefined;
    case 'sw-breakpoint': return save('hw-breakpoint', 'hardware instead of software breakpoint');
    case 'probe-breakpoint': return save('hw-breakpoint', 'hardware breakpoint') ?? save('sw-breakpoint', 'software breakpoint');
    case 'single-step': return { mechanism: 'probe-breakpoint', change: 'exec hooks on the instructions you need instead of every step', savesNs: NaN };
    default: return undefined;
  }
}

/**
 * Prices what happened: per hook, mechanism, events, unit price, handler time, total, share of
 * run time and the cheaper alternative. `run` gives the run time (a `Stop`, or ns); default: the
 * machine's exit counters (time in KVM_RUN + handling).
 */
export function report(mon: Monitor, options: { run?: Stop | { readonly ns: number }; table?: CalibrationTable } = {}): CostReport {
  const table = options.table ?? mon.calibration;
  const stats = mon.machine.stats();
  const kinds = Object.values(stats.byKind);
  const guestNs = kinds.reduce((n, k) => n + k.runNs, 0), vmmNs = kinds.reduce((n, k) => n + k.handleNs, 0);
  const source: RunTime['source'] = options.run === undefined ? 'exit-counters' : 'ns' in options.run ? 'given' : 'stop';
  const runNs = options.run === undefined ? guestNs + vmmNs : 'ns' in options.run ? options.run.ns : options.run.elapsedMs * 1e6;
  const plan = new Map(mon.plan().map((p) => [p.id, p]));
  const hooks = mon.recordsForReport().map((r): HookCost => {
    const p = plan.get(r.id);
    const mechanism = p?.mechanism ?? r.selection.mechanism;
    const unit = (mechanism === 'probe-breakpoint' ? probePriceOf(table, r.cpl, p?.exitsPerHit ?? 1) : priceOf(table, mechanism, r.cpl)) ?? 0;
    // One dispatcher serves every hook, so the per-hook dispatch is the calibrated price per
    // event. Nothing measured around the dispatcher is charged: that time holds one-time work
    // (the first deny's explanation loads the disassembler, an audit sink may block) which is
    // no event's price; it stays in the run's uncharged VMM time.
    const dispatchNs = r.events * extraDispatch(table, mechanism, r.cpl, r.mode);
    const totalNs = r.events * unit + r.handlerNs + dispatchNs;
    const overheadNs = r.events * (unit - baselineNs(table, mechanism, r.cpl)) + r.handlerNs + dispatchNs;
    const onlyAllowed = r.mode === 'mediate' && r.verdicts.deny === 0 && r.verdicts.emulate === 0;
    return {
      name: r.name, mode: r.mode, event: r.spec.event, mechanism, cpl: r.cpl, events: r.events, unitNs: unit, handlerNs: r.handlerNs,
      dispatchNs, totalNs, perEventNs: r.events > 0 ? totalNs / r.events : unit + extraDispatch(table, mechanism, r.cpl, r.mode),
      overheadNs, savesNs: Math.max(0, -overheadNs), share: runNs > 0 ? totalNs / runNs : 0,
      alternative: alternativeFor(table, mon.machine, { mode: r.mode, event: r.spec.event, mechanism, cpl: r.cpl, events: r.events, onlyAllowed }),
    };
  });
  const charged = hooks.reduce((n, h) => n + h.handlerNs + h.dispatchNs, 0);
  const run: RunTime = { ns: runNs, source, exits: stats.total, guestNs, vmmNs, unchargedVmmNs: Math.max(0, vmmNs - charged), oneTimeNs: Math.max(0, runNs - guestNs - vmmNs) };
  return { monitor: mon.name, runNs, run, hooks, totalNs: hooks.reduce((n, h) => n + h.totalNs, 0), overheadNs: hooks.reduce((n, h) => n + h.overheadNs, 0), source: table.source };
}
