/**
 * Learning mode's second half, `audit2allow` for machine channels: from the connections a
 * {@link FlowMonitor} in `learn` mode observed, propose the smallest policy that admits exactly
 * those connections — one rule per (source, destination, service) with the observed ports merged
 * into contiguous ranges only where every port of the range was seen — plus a diff against the
 * policy in force, for a person to review before enforcing it.
 *
 * Where the lattice would refuse an observed flow (it lowers secrecy), the proposal routes it
 * through a declared guard that may declassify the missing tags; if none may, the flow is listed
 * in {@link LearnedPolicy.unresolved} instead of being silently allowed.
 * @module
 */
import { PolicyError } from '../errors.js';
import { latticeRefusal } from './evaluate.js';
import type { ObservedFlow } from './monitor.js';
import { compileFlowPolicy, type FlowPolicy, type FlowRule, type GuardDeclaration } from './policy.js';

/** Options of {@link learnPolicy}. */
export interface LearnOptions {
  /** The policy in force during the run, to diff against (and whose guards may be reused). */
  readonly current?: FlowPolicy;
  /** Guards the proposal may route lattice-refused flows through (merged over `current`'s). */
  readonly guards?: Readonly<Record<string, GuardDeclaration>>;
  /** Whether the proposal keeps the lattice rule. Default true. */
  readonly lattice?: boolean;
}

/** An observed flow the proposal cannot admit without relabelling or a new guard. */
export interface UnresolvedFlow {
  /** Source. */
  readonly source: string;
  /** Destination. */
  readonly destination: string;
  /** Port. */
  readonly port: number;
  /** Why. */
  readonly reason: string;
}

/** What {@link learnPolicy} proposes. */
export interface LearnedPolicy {
  /** The proposed policy (valid; deny by default admits nothing else). */
  readonly policy: FlowPolicy;
  /** Human-reviewable diff against `current` (`+` proposed rules, `-` rules no observed flow used). */
  readonly diff: string;
  /** Flows the proposal cannot admit. */
  readonly unresolved: readonly UnresolvedFlow[];
}

function ranges(ports: number[]): (number | [number, number])[] {
  const s = [...new Set(ports)].sort((a, b) => a - b);
  const out: (number | [number, number])[] = [];
  let i = 0;
  while (i < s.length) {
    let j = i;
    while (j + 1 < s.length && (s[j + 1] as number) === (s[j] as number) + 1) j++;
    out.push(i === j ? (s[i] as number) : [s[i] as number, s[j] as number]);
    i = j + 1;
  }
  return out;
}

function ruleId(src: string, dst: string, p: number | [number, number], service: string | undefined, taken: Set<string>): string {
  const base = `${src}-${dst}-${Array.isArray(p) ? `${p[0]}_${p[1]}` : p}${service ? `-${service}` : ''}`.replace(/[^\w.:-]/g, '_').slice(0, 60);
  let id = base, n = 2;
  while (taken.has(id)) id = `${base}.${n++}`;
  taken.add(id);
  return id;
}

/**
 * Proposes the smallest policy admitting exactly the observed connections.
 * @throws PolicyError if `current` or `guards` is malformed.
 */
export function learnPolicy(observations: readonly ObservedFlow[], options: LearnOptions = {}): LearnedPolicy {
  const current = options.current === undefined ? null : compileFlowPolicy(options.current);
  const guards: Record<string, GuardDeclaration> = { ...(current?.source.guards ?? {}), ...(options.guards ?? {}) };
  // Validates the merged guard declarations (paths name `guards.<name>`).
  const compiledGuards = compileFlowPolicy({ version: 1, guards, rules: [] }).guards;
  const lattice = options.lattice ?? true;
  const groups = new Map<string, { source: string; destination: string; service: string | undefined; guard: string | null; ports: number[] }>();
  const unresolved: UnresolvedFlow[] = [];
  for (const o of observations) {
    const r = o.request;
    let guard: string | null = null;
    if (lattice && latticeRefusal(o.lattice, [], null) !== null) {
      const g = [...compiledGuards.values()].find((c) => latticeRefusal(o.lattice, c.declassify, c.name) === null);
      if (g === undefined) {
        unresolved.push({ source: r.source, destination: r.destination, port: r.port, reason: latticeRefusal(o.lattice, [], null) ?? '' });
        continue;
      }
      guard = g.name;
    }
    const k = JSON.stringify([r.source, r.destination, r.service ?? null, guard]);
    const g = groups.get(k) ?? { source: r.source, destination: r.destination, service: r.service, guard, ports: [] };
    g.ports.push(r.port);
    groups.set(k, g);
  }
  const taken = new Set<string>();
  const rules: FlowRule[] = [];
  for (const g of groups.values()) {
    for (const p of ranges(g.ports)) {
      rules.push({
        id: ruleId(g.source, g.destination, p, g.service, taken), source: g.source, destination: g.destination, port: p,
        ...(g.service !== undefined ? { service: g.service } : {}), action: 'allow', ...(g.guard !== null ? { guard: g.guard } : {}),
      });
    }
  }
  const usedGuards = new Set(rules.flatMap((r) => (r.guard ? [r.guard] : [])));
  const keptGuards = Object.fromEntries(Object.entries(guards).filter(([n]) => usedGuards.has(n)));
  const policy: FlowPolicy = { version: 1, lattice, ...(usedGuards.size ? { guards: keptGuards } : {}), rules };
  try {
    compileFlowPolicy(policy);
  } catch (e) {
    throw new PolicyError('learned', `the proposal does not validate (a bug): ${(e as Error).message}`);
  }
  return { policy, diff: renderDiff(current?.source ?? null, policy, observations, unresolved), unresolved };
}

function renderDiff(current: FlowPolicy | null, learned: FlowPolicy, observations: readonly ObservedFlow[], unresolved: readonly UnresolvedFlow[]): string {
  const lines = ['--- policy in force', '+++ learned from the run'];
  if (current !== null) {
    const used = new Set(observations.flatMap((o) => (o.rule === null ? [] : [o.rule])));
    for (const r of current.rules) {
      if (!used.has(r.id)) lines.push(`- ${JSON.stringify(r)}    # no observed connection matched it`);
      else lines.push(`- ${JSON.stringify(r)}    # replaced by exact rules below`);
    }
  }
  for (const r of learned.rules) {
    const n = observations.filter((o) => o.request.source === r.source && o.request.destination === r.destination && (Array.isArray(r.port) ? o.request.port >= r.port[0] && o.request.port <= r.port[1] : o.request.port === r.port)).length;
    lines.push(`+ ${JSON.stringify(r)}    # ${n} connection${n === 1 ? '' : 's'} observed${r.guard ? `; lattice needs guard '${r.guard}'` : ''}`);
  }
  for (const u of unresolved) lines.push(`! ${u.source} → ${u.destination}:${u.port} not admitted: ${u.reason}; relabel or declare a guard that may declassify`);
  return `${lines.join('\n')}\n`;
}
