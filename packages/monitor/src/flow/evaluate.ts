/**
 * The pure part of a flow decision: which rule matches a connection (with the trace of every rule
 * looked at, for {@link explain}) and what the lattice says. No guards, no callbacks, no I/O, so
 * the monitor, the analysis and tests all reach the same verdict for the same input.
 * @module
 */
import { latticeGap, type LatticeGap } from './labels.js';
import {
  ruleMismatch,
  type CompiledFlowPolicy,
  type CompiledFlowRule,
  type CompiledTopology,
  type ConnectRequest,
  type Principal,
} from './policy.js';

/** One rule looked at while deciding, in order. */
export interface TraceStep {
  /** Rule id. */
  readonly rule: string;
  /** Whether it matched (the last step is the match, if any). */
  readonly matched: boolean;
  /** Why it did not match, or `matched`. */
  readonly why: string;
}

/** The outcome of matching a connection against the policy. */
export interface ConnectEvaluation {
  /** `ask` still needs the callback's answer. */
  readonly verdict: 'allow' | 'deny' | 'ask';
  /** The matching rule, or null (deny by default, or an unknown principal). */
  readonly rule: CompiledFlowRule | null;
  /** Rules looked at, in order. */
  readonly trace: readonly TraceStep[];
  /** The lattice gap of source → destination (empty lists when it flows). Null when not checked. */
  readonly lattice: LatticeGap | null;
  /** Why, in one line. */
  readonly reason: string;
}

/**
 * Whether a message labelled like `from` may reach `to` on a connection whose guard may
 * declassify `declassifiable`: the secrecy gap must be coverable and there is no integrity gap.
 * @returns null if it may, else the reason.
 */
export function latticeRefusal(gap: LatticeGap, declassifiable: readonly string[], guard: string | null): string | null {
  if (gap.integrity.length > 0) return `lattice: would raise integrity {${gap.integrity.join(',')}}`;
  const uncovered = gap.secrecy.filter((t) => !declassifiable.includes(t));
  if (uncovered.length === 0) return null;
  return `lattice: would lower secrecy {${uncovered.join(',')}}${guard ? ` (guard '${guard}' may not declassify ${uncovered.length > 1 ? 'them' : 'it'})` : ' (no guard may declassify it)'}`;
}

/** Matches `req` against `policy` (first match wins, deny by default) and checks the lattice. */
export function evaluateConnect(policy: CompiledFlowPolicy, topology: CompiledTopology, req: ConnectRequest): ConnectEvaluation {
  const src = topology.principals.get(req.source);
  const dst = topology.principals.get(req.destination);
  if (src === undefined || dst === undefined) {
    return { verdict: 'deny', rule: null, trace: [], lattice: null, reason: `unknown principal '${src === undefined ? req.source : req.destination}'` };
  }
  if (topology.links !== null && !topology.links.has(`${src.name}→${dst.name}`)) {
    return { verdict: 'deny', rule: null, trace: [], lattice: null, reason: `no link ${src.name} → ${dst.name} in the topology` };
  }
  const trace: TraceStep[] = [];
  for (const rule of policy.rules) {
    const why = ruleMismatch(rule, src, dst, req);
    trace.push({ rule: rule.id, matched: why === null, why: why ?? 'matched' });
    if (why === null) return decide(policy, rule, src, dst, trace);
  }
  return { verdict: 'deny', rule: null, trace, lattice: null, reason: 'no rule matches (deny by default)' };
}

function decide(policy: CompiledFlowPolicy, rule: CompiledFlowRule, src: Principal, dst: Principal, trace: TraceStep[]): ConnectEvaluation {
  if (rule.action === 'deny') return { verdict: 'deny', rule, trace, lattice: null, reason: `rule '${rule.id}' denies${rule.reason ? `: ${rule.reason}` : ''}` };
  if (!policy.lattice) return { verdict: rule.action, rule, trace, lattice: null, reason: `rule '${rule.id}' ${rule.action === 'ask' ? 'asks' : 'allows'}` };
  const gap = latticeGap(src.label, dst.label);
  const guard = rule.guard === null ? null : policy.guards.get(rule.guard) ?? null;
  const refusal = latticeRefusal(gap, guard?.declassify ?? [], rule.guard);
  if (refusal !== null) return { verdict: 'deny', rule, trace, lattice: gap, reason: `rule '${rule.id}' ${rule.action === 'ask' ? 'asks' : 'allows'}, but ${refusal}` };
  const via = gap.secrecy.length > 0 ? ` (guard '${rule.guard ?? ''}' must declassify {${gap.secrecy.join(',')}})` : '';
  return { verdict: rule.action, rule, trace, lattice: gap, reason: `rule '${rule.id}' ${rule.action === 'ask' ? 'asks' : 'allows'}${via}` };
}
