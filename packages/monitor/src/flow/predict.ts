/**
 * Predicted flow costs: what a policy will cost per rule and per guard *before* the traffic
 * runs, from a {@link FlowCostModel} of unit prices — one connection decision, one unguarded
 * message (fixed part and per byte), one audit line, and per guard one inspection (fixed part
 * and per byte). {@link calibrateFlowCosts} measures the prices on this host by running a
 * private {@link FlowMonitor} (and the guards' own code) against synthetic messages of two sizes,
 * reading the monitor's own meter, so calibration and the live report use the same clock.
 * {@link predictFlowCosts} applies a model to expected traffic; a monitor given the model
 * (`FlowMonitorOptions.costModel`) prices the traffic it actually saw too, so `costs()` shows
 * predicted beside measured for every rule and guard.
 *
 * The prices are host-side only: the exits and slice switches a message costs its guests are
 * the machine cost model's (`predict` in the cost report), not counted here.
 * @module
 */
import { InvalidArgumentError } from '@tsvm/core';
import { AuditLog } from '../audit.js';
import type { GuardFn } from './guards.js';
import type { FlowCostReport, FlowCostRow } from './costs.js';
import { FlowMonitor } from './monitor.js';
import { compileFlowPolicy, type CompiledFlowPolicy, type FlowPolicy, type Topology } from './policy.js';

/** Unit prices of flow mediation, ns. */
export interface FlowCostModel {
  /** Schema version (1). */
  readonly version: 1;
  /** `measured` by {@link calibrateFlowCosts} on this host, or `given` by hand. */
  readonly source: 'measured' | 'given';
  /** One connection decision, its audit line included (connections are always audited). */
  readonly connectionNs: number;
  /** One unguarded message check without its audit line, fixed part. */
  readonly messageNs: number;
  /** One unguarded message, per byte (≈ 0: nothing reads the bytes). */
  readonly messageByteNs: number;
  /** One audit line of a message (paid per allowed message with `logMessages: 'all'`). */
  readonly auditLineNs: number;
  /** Per guard: one inspection without its audit line, fixed part and per byte. */
  readonly guards: Readonly<Record<string, { readonly messageNs: number; readonly byteNs: number }>>;
}

/** Expected traffic per rule id (frames count as messages: a frame is a message on a link). */
export type FlowTraffic = Readonly<Record<string, { readonly connections?: number; readonly messages?: number; readonly bytes?: number }>>;

/** One predicted row. */
export interface FlowCostPredictionRow {
  /** `rule` (connections and unguarded messages) or `guard` (inspections). */
  readonly kind: 'rule' | 'guard';
  /** Rule id or guard name. */
  readonly name: string;
  /** Connections expected. */
  readonly connections: number;
  /** Messages expected. */
  readonly messages: number;
  /** Bytes expected. */
  readonly bytes: number;
  /** Predicted time, ns. */
  readonly predictedNs: number;
}

/** What {@link predictFlowCosts} returns. */
export interface FlowCostPrediction {
  /** Rules first, then guards, each by descending predicted time. */
  readonly rows: readonly FlowCostPredictionRow[];
  /** Sum of all rows, ns. */
  readonly totalNs: number;
  /** Where the prices came from. */
  readonly source: FlowCostModel['source'];
}

/** Options of {@link predictFlowCosts}. */
export interface PredictFlowOptions {
  /** Whether every message gets an audit line (`all`, default, as `FlowMonitor`) or only denials. */
  readonly logMessages?: 'all' | 'denied';
}

const count = (v: unknown, what: string): number => {
  if (v === undefined) return 0;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new InvalidArgumentError(what, `must be a non-negative number, got ${String(v)}`);
  return v;
};

/** The price of `messages` messages of `bytes` bytes in total, on a rule without a guard or through `guard`. */
function messagesNs(model: FlowCostModel, guard: string | null, messages: number, bytes: number, logAll: boolean): number {
  const audit = logAll ? model.auditLineNs : 0;
  if (guard === null) return messages * (model.messageNs + audit) + bytes * model.messageByteNs;
  const g = model.guards[guard];
  if (g === undefined) throw new InvalidArgumentError('model.guards', `no price for guard '${guard}' (calibrate with its code: calibrateFlowCosts({ guards }))`);
  return messages * (g.messageNs + audit) + bytes * g.byteNs;
}

/**
 * Checks that `model` is a usable {@link FlowCostModel} (version 1, non-negative prices).
 * @throws InvalidArgumentError naming the bad field.
 */
export function checkFlowCostModel(model: FlowCostModel): void {
  if (model === null || typeof model !== 'object' || model.version !== 1) throw new InvalidArgumentError('model', 'must be a FlowCostModel of version 1');
  for (const k of ['connectionNs', 'messageNs', 'messageByteNs', 'auditLineNs'] as const) count(model[k], `model.${k}`);
  for (const [n, g] of Object.entries(model.guards ?? {})) {
    count(g?.messageNs, `model.guards.${n}.messageNs`);
    count(g?.byteNs, `model.guards.${n}.byteNs`);
  }
}

/**
 * Predicts what `traffic` costs under `policy`, per rule (connection decisions, unguarded
 * messages) and per guard (inspections of the messages of every rule that names it).
 * @throws InvalidArgumentError for a rule id the policy lacks, a negative count, or a guard the model has no price for.
 * @throws PolicyError for a malformed policy.
 */
export function predictFlowCosts(policy: FlowPolicy | CompiledFlowPolicy | unknown, traffic: FlowTraffic, model: FlowCostModel, options: PredictFlowOptions = {}): FlowCostPrediction {
  checkFlowCostModel(model);
  const compiled = isCompiled(policy) ? policy : compileFlowPolicy(policy);
  const logAll = (options.logMessages ?? 'all') === 'all';
  const byId = new Map(compiled.rules.map((r) => [r.id, r]));
  const rules = new Map<string, { connections: number; messages: number; bytes: number; ns: number }>();
  const guards = new Map<string, { connections: number; messages: number; bytes: number; ns: number }>();
  for (const [id, t] of Object.entries(traffic ?? {})) {
    const rule = byId.get(id);
    if (rule === undefined) throw new InvalidArgumentError(`traffic.${id}`, `the policy has no rule '${id}' (rules: ${[...byId.keys()].join(', ') || 'none'})`);
    const connections = count(t?.connections, `traffic.${id}.connections`);
    const messages = count(t?.messages, `traffic.${id}.messages`);
    const bytes = count(t?.bytes, `traffic.${id}.bytes`);
    const r = { connections, messages: 0, bytes: 0, ns: connections * model.connectionNs };
    if (rule.guard === null) {
      r.messages = messages;
      r.bytes = bytes;
      r.ns += messagesNs(model, null, messages, bytes, logAll);
    } else if (messages > 0 || bytes > 0) {
      const g = guards.get(rule.guard) ?? { connections: 0, messages: 0, bytes: 0, ns: 0 };
      g.messages += messages;
      g.bytes += bytes;
      g.ns += messagesNs(model, rule.guard, messages, bytes, logAll);
      guards.set(rule.guard, g);
    }
    rules.set(id, r);
  }
  const rows = (kind: 'rule' | 'guard', m: typeof rules): FlowCostPredictionRow[] =>
    [...m].map(([name, a]) => ({ kind, name, connections: a.connections, messages: a.messages, bytes: a.bytes, predictedNs: a.ns })).sort((x, y) => y.predictedNs - x.predictedNs);
  const all = [...rows('rule', rules), ...rows('guard', guards)];
  return { rows: all, totalNs: all.reduce((s, r) => s + r.predictedNs, 0), source: model.source };
}

function isCompiled(p: unknown): p is CompiledFlowPolicy {
  return typeof p === 'object' && p !== null && (p as { guards?: unknown }).guards instanceof Map;
}

/**
 * What the model predicts for the traffic a report measured, row by row (`predictedNs` on each
 * row; guards without a price stay without a prediction).
 */
export function withPredictions(report: FlowCostReport, model: FlowCostModel, logMessages: 'all' | 'denied'): FlowCostReport {
  const logAll = logMessages === 'all';
  const rows = report.rows.map((r): FlowCostRow => {
    const guard = r.kind === 'guard' ? r.name : null;
    if (guard !== null && model.guards[guard] === undefined) return r;
    // A link's first frame is decided like a connection and counted there; later frames are messages on it.
    const ns = (r.kind === 'rule' ? r.connections * model.connectionNs : 0) + messagesNs(model, guard, r.messages + r.frames, r.bytes + r.frameBytes, logAll);
    return { ...r, predictedNs: ns };
  });
  return { ...report, rows };
}

const BATCHES = 5;
const median = (xs: readonly number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0;
/** Runs `f` `n` times one after the other (never concurrently: they would share the clock). */
async function sequence<T>(n: number, f: () => Promise<T>): Promise<T[]> {
  const out: T[] = [];
  for (let i = 0; i < n; i++) out.push(await f());
  return out;
}

/** Options of {@link calibrateFlowCosts}. */
export interface CalibrateFlowOptions {
  /** Guards to price, by name, with their code (each is run on synthetic messages). */
  readonly guards?: Readonly<Record<string, GuardFn>>;
  /** Message sizes of the two-point fit, bytes. Default [64, 65536]. */
  readonly sizes?: readonly [number, number];
  /** Messages per size and case. Default 2000 (small) and a tenth of it (large). */
  readonly iterations?: number;
  /** Synthetic message of `size` bytes. Default all zeros (a scanning guard reads every byte). */
  readonly sample?: (size: number) => Uint8Array;
}

/**
 * Measures a {@link FlowCostModel} on this host: connection decisions, unguarded messages of two
 * sizes (with and without audit lines) and each given guard on the same two sizes, through a
 * private `FlowMonitor` whose audit log discards its lines. Takes ~10-100 ms plus the guards' time.
 */
export async function calibrateFlowCosts(options: CalibrateFlowOptions = {}): Promise<FlowCostModel> {
  const [small, large] = options.sizes ?? [64, 65536];
  if (!Number.isInteger(small) || !Number.isInteger(large) || small < 1 || large <= small) throw new InvalidArgumentError('sizes', 'must be two integers 1 <= small < large');
  const n = options.iterations ?? 2000;
  if (!Number.isInteger(n) || n < 10) throw new InvalidArgumentError('iterations', 'must be an integer >= 10');
  const sample = options.sample ?? ((size: number) => new Uint8Array(size));
  const guardFns = options.guards ?? {};
  for (const [name, fn] of Object.entries(guardFns)) if (typeof fn !== 'function') throw new InvalidArgumentError(`guards.${name}`, 'must be a function');
  const topology: Topology = { version: 1, principals: { a: { kind: 'machine', cid: 3 }, b: { kind: 'machine', cid: 4 } } };
  const names = Object.keys(guardFns);
  const policy: FlowPolicy = {
    version: 1,
    guards: Object.fromEntries(names.map((g) => [g, { declassify: [], timeoutMs: 60_000 }])),
    rules: [{ id: 'plain', source: 'a', destination: 'b', port: 1, action: 'allow' }, ...names.map((g, i) => ({ id: `g${i}`, source: 'a', destination: 'b', port: 2 + i, action: 'allow' as const, guard: g }))],
  };
  const monitor = (logMessages: 'all' | 'denied') => new FlowMonitor({ policy, topology, guards: guardFns, audit: new AuditLog(() => {}), logMessages });
  /**
   * ns per message of `size` on a connection to `port`, as the monitor's meter saw it: the median
   * of five batches, each on a fresh monitor (a batch the host preempted does not move the price).
   */
  const perMessage = async (logMessages: 'all' | 'denied', port: number, size: number, iterations: number, row: (r: FlowCostRow) => boolean): Promise<number> => {
    const data = sample(size);
    const batch = async (k: number): Promise<number> => {
      const m = monitor(logMessages);
      const c = await m.connect({ source: 'a', destination: 'b', port });
      if (c.connection === null) throw new InvalidArgumentError('guards', `calibration connection refused: ${c.reason}`);
      for (let i = 0; i < k; i++) await m.message(c.connection, 'forward', data);
      return m.costs().rows.find(row)?.perMessageNs ?? 0;
    };
    await batch(Math.min(200, iterations)); // warm-up (JIT)
    return median(await sequence(BATCHES, () => batch(Math.max(2, Math.floor(iterations / BATCHES)))));
  };
  const slope = (a: number, b: number) => Math.max(0, (b - a) / (large - small));
  const plain = (r: FlowCostRow) => r.kind === 'rule' && r.name === 'plain';
  const bigN = Math.max(10, Math.floor(n / 10));
  const plainSmall = await perMessage('denied', 1, small, n, plain);
  const plainLarge = await perMessage('denied', 1, large, bigN, plain);
  const plainAudited = await perMessage('all', 1, small, n, plain);
  const messageByteNs = slope(plainSmall, plainLarge);
  // Connection decisions (each is audited), read from the meter, median of batches as above.
  const connections = async (k: number): Promise<number> => {
    const m = monitor('denied');
    for (let i = 0; i < k; i++) await m.connect({ source: 'a', destination: 'b', port: 1 });
    return m.costs().perConnectionNs;
  };
  await connections(100);
  const connectionNs = median(await sequence(BATCHES, () => connections(Math.max(2, Math.floor(Math.min(n, 500) / BATCHES)))));
  const guards: Record<string, { messageNs: number; byteNs: number }> = {};
  for (const [i, g] of names.entries()) {
    const mine = (r: FlowCostRow) => r.kind === 'guard' && r.name === g;
    const s = await perMessage('denied', 2 + i, small, n, mine);
    const l = await perMessage('denied', 2 + i, large, bigN, mine);
    const byteNs = slope(s, l);
    guards[g] = { messageNs: Math.max(0, s - byteNs * small), byteNs };
  }
  return {
    version: 1,
    source: 'measured',
    connectionNs,
    messageNs: Math.max(0, plainSmall - messageByteNs * small),
    messageByteNs,
    auditLineNs: Math.max(0, plainAudited - plainSmall),
    guards,
  };
}
