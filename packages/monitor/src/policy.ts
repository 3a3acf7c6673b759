/**
 * Policies as data: a JSON-serialisable rule set, validated by a hand-written schema check
 * (errors name the path, e.g. `rules[3].ports`), checked for overlapping or contradictory rules
 * (errors name both ids), and compiled into ordinary monitor hooks — one per rule, so plans,
 * reports and audit lines name the rule. Anything a rule can say, a function can say too.
 *
 * ```json
 * { "version": 1, "default": "deny", "rules": [
 *   { "id": "uart", "event": "pio", "ports": [1016, 1023], "direction": "out", "action": "allow" },
 *   { "id": "rtc-read", "event": "pio", "ports": [113, 113], "direction": "in", "action": "emulate", "value": 0 } ] }
 * ```
 * `default: "deny"` denies every port and MMIO access no rule matches, even where a device
 * exists; `"allow"` leaves such accesses to devices (and core's deny-by-default).
 * @module
 */
import type { DenyEffect } from '@tsvm/core';
import { PolicyConflictError, PolicyError } from './errors.js';
import { normaliseSpec, specsOverlap, type EventSpec, type NormalSpec } from './events.js';
import { allow, deny, emulate, type Decision } from './decisions.js';
import type { HookHandle, Monitor } from './monitor.js';

/** Events a rule may name. */
export type RuleEvent = 'pio' | 'mmio' | 'msr' | 'hypercall' | 'exec' | 'write-watch' | 'halt' | 'shutdown';

/** A number, or a hex/decimal string for values beyond 2^53 (JSON has no bigint). */
export type JsonInt = number | string;

/** One rule. */
export interface PolicyRule {
  /** Unique id, used in errors, plans and audit lines. */
  readonly id: string;
  /** The event. */
  readonly event: RuleEvent;
  /** `pio`: inclusive port range. */
  readonly ports?: readonly [number, number];
  /** `mmio`, `write-watch`: inclusive guest-physical range. */
  readonly range?: readonly [JsonInt, JsonInt];
  /** `msr`: MSR indices. */
  readonly indices?: readonly number[];
  /** `exec`: guest-physical address. */
  readonly address?: JsonInt;
  /** `hypercall`: port (default 0xee8). */
  readonly port?: number;
  /** `pio`: in/out/both; `mmio`, `msr`: read/write/both. */
  readonly direction?: string;
  /** What to do. */
  readonly action: 'allow' | 'deny' | 'emulate';
  /** `emulate`: the value. */
  readonly value?: JsonInt;
  /** `deny`: how (default `stop`). */
  readonly effect?: DenyEffect;
  /** `deny`: reason recorded in the violation and audit log. */
  readonly reason?: string;
}

/** A policy document. */
export interface Policy {
  /** Format version: 1. */
  readonly version: 1;
  /** What happens to port and MMIO accesses no rule matches. Default `deny`. */
  readonly default?: 'deny' | 'allow';
  /** The rules; order does not matter because they may not overlap. */
  readonly rules: readonly PolicyRule[];
}

/** A validated rule, ready to register. */
export interface CompiledRule {
  /** Rule id. */
  readonly id: string;
  /** Spec to register. */
  readonly spec: EventSpec;
  /** Normalised spec (for overlap checks). */
  readonly normal: NormalSpec;
  /** The fixed decision. */
  readonly decision: Decision;
}

const RULE_FIELDS: Readonly<Record<RuleEvent, readonly string[]>> = {
  pio: ['ports', 'direction'], mmio: ['range', 'direction'], msr: ['indices', 'direction'], hypercall: ['port'],
  exec: ['address'], 'write-watch': ['range'], halt: [], shutdown: [],
};
const COMMON = ['id', 'event', 'action', 'value', 'effect', 'reason'];

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function jsonInt(v: unknown, path: string): bigint {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === 'string' && /^(0x[0-9a-f]+|[0-9]+)$/i.test(v)) return BigInt(v);
  throw new PolicyError(path, `must be a non-negative integer or a "0x..." string, got ${JSON.stringify(v)}`);
}

function pair(v: unknown, path: string): [bigint, bigint] {
  if (!Array.isArray(v) || v.length !== 2) throw new PolicyError(path, `must be an inclusive [first, last] pair, got ${JSON.stringify(v)}`);
  const lo = jsonInt(v[0], `${path}[0]`), hi = jsonInt(v[1], `${path}[1]`);
  if (hi < lo) throw new PolicyError(path, `last (${hi}) is below first (${lo})`);
  return [lo, hi];
}

function directionOf(v: unknown, allowed: readonly string[], path: string): string | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || !allowed.includes(v)) throw new PolicyError(path, `must be one of ${allowed.join(', ')}, got ${JSON.stringify(v)}`);
  return v;
}

function specOf(r: Record<string, unknown>, event: RuleEvent, p: string): EventSpec {
  switch (event) {
    case 'pio': {
      const [lo, hi] = pair(r['ports'], `${p}.ports`);
      if (hi > 0xffffn) throw new PolicyError(`${p}.ports`, 'ports are 0..0xffff');
      const d = directionOf(r['direction'], ['in', 'out', 'both'], `${p}.direction`);
      return { event, ports: [Number(lo), Number(hi)], ...(d ? { direction: d as 'in' } : {}) };
    }
    case 'mmio': {
      const d = directionOf(r['direction'], ['read', 'write', 'both'], `${p}.direction`);
      return { event, range: pair(r['range'], `${p}.range`), ...(d ? { direction: d as 'read' } : {}) };
    }
    case 'msr': {
      const list = r['indices'];
      if (!Array.isArray(list) || list.length === 0) throw new PolicyError(`${p}.indices`, 'must be a non-empty array of MSR indices');
      const d = directionOf(r['direction'], ['read', 'write', 'both'], `${p}.direction`);
      return { event, indices: list.map((x, i) => Number(jsonInt(x, `${p}.indices[${i}]`))), ...(d ? { direction: d as 'read' } : {}) };
    }
    case 'hypercall': return r['port'] === undefined ? { event } : { event, port: Number(jsonInt(r['port'], `${p}.port`)) };
    case 'exec': return { event, address: jsonInt(r['address'], `${p}.address`) };
    case 'write-watch': return { event, range: pair(r['range'], `${p}.range`) };
    case 'halt': case 'shutdown': return { event };
  }
}

function decisionOf(r: Record<string, unknown>, p: string): Decision {
  const action = r['action'];
  if (action === 'allow' || action === 'deny' || action === 'emulate') {
    if (action !== 'emulate' && r['value'] !== undefined) throw new PolicyError(`${p}.value`, `only 'emulate' rules take a value`);
    if (action !== 'deny' && (r['effect'] !== undefined || r['reason'] !== undefined)) throw new PolicyError(`${p}.${r['effect'] !== undefined ? 'effect' : 'reason'}`, `only 'deny' rules take an effect or reason`);
  }
  switch (action) {
    case 'allow': return allow();
    case 'emulate': {
      if (r['value'] === undefined) throw new PolicyError(`${p}.value`, "an 'emulate' rule needs a value");
      const v = jsonInt(r['value'], `${p}.value`);
      return emulate(v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);
    }
    case 'deny': {
      const effect = r['effect'];
      if (effect !== undefined && effect !== 'stop' && effect !== 'ignore' && effect !== 'gp') throw new PolicyError(`${p}.effect`, `must be stop, ignore or gp, got ${JSON.stringify(effect)}`);
      const reason = r['reason'];
      if (reason !== undefined && typeof reason !== 'string') throw new PolicyError(`${p}.reason`, 'must be a string');
      return deny({ ...(effect ? { effect } : {}), reason: `policy rule '${String(r['id'])}'${reason ? `: ${reason}` : ''}` });
    }
    default: throw new PolicyError(`${p}.action`, `must be allow, deny or emulate, got ${JSON.stringify(action)}`);
  }
}

/**
 * Validates a policy document (parsed JSON or a JSON string) and checks its rules pairwise.
 * @throws PolicyError naming the path of a malformed field; PolicyConflictError naming both rules.
 */
export function compilePolicy(doc: unknown): { readonly default: 'deny' | 'allow'; readonly rules: readonly CompiledRule[] } {
  if (typeof doc === 'string') {
    try { doc = JSON.parse(doc); } catch (e) { throw new PolicyError('$', `not JSON: ${(e as Error).message}`); }
  }
  if (!isObj(doc)) throw new PolicyError('$', 'must be an object');
  for (const k of Object.keys(doc)) if (!['version', 'default', 'rules'].includes(k)) throw new PolicyError(k, 'unknown field');
  if (doc['version'] !== 1) throw new PolicyError('version', `must be 1, got ${JSON.stringify(doc['version'])}`);
  const dflt = doc['default'] ?? 'deny';
  if (dflt !== 'deny' && dflt !== 'allow') throw new PolicyError('default', `must be 'deny' or 'allow', got ${JSON.stringify(dflt)}`);
  const rules = doc['rules'];
  if (!Array.isArray(rules)) throw new PolicyError('rules', 'must be an array');
  const ids = new Set<string>();
  const out: CompiledRule[] = rules.map((r: unknown, i) => {
    const p = `rules[${i}]`;
    if (!isObj(r)) throw new PolicyError(p, 'must be an object');
    const id = r['id'];
    if (typeof id !== 'string' || !/^[\w.:-]{1,64}$/.test(id)) throw new PolicyError(`${p}.id`, 'must be 1-64 characters of [A-Za-z0-9_.:-]');
    if (ids.has(id)) throw new PolicyError(`${p}.id`, `duplicate id '${id}'`);
    ids.add(id);
    const event = r['event'];
    if (typeof event !== 'string' || !(event in RULE_FIELDS)) throw new PolicyError(`${p}.event`, `must be one of ${Object.keys(RULE_FIELDS).join(', ')}, got ${JSON.stringify(event)}`);
    const ev = event as RuleEvent;
    for (const k of Object.keys(r)) if (!COMMON.includes(k) && !RULE_FIELDS[ev].includes(k)) throw new PolicyError(`${p}.${k}`, `unknown field for a '${ev}' rule`);
    const spec = specOf(r, ev, p);
    let normal: NormalSpec;
    try { normal = normaliseSpec(spec, p); } catch (e) { throw new PolicyError(p, (e as Error).message); }
    return { id, spec, normal, decision: decisionOf(r, p) };
  });
  for (let i = 0; i < out.length; i++) {
    for (let j = i + 1; j < out.length; j++) {
      const a = out[i] as CompiledRule, b = out[j] as CompiledRule;
      if (!specsOverlap(a.normal, b.normal)) continue;
      const same = a.decision.verdict === b.decision.verdict;
      throw new PolicyConflictError(a.id, b.id, same ? 'they overlap (each event must match at most one rule)' : `they overlap and contradict (${a.decision.verdict} vs ${b.decision.verdict})`);
    }
  }
  return { default: dflt, rules: out };
}

/** Compiles `doc` and registers it on `mon` (one mediate hook per rule, named `policy:<id>`). */
export function applyPolicy(mon: Monitor, doc: unknown): HookHandle[] {
  const compiled = compilePolicy(doc);
  const handles = compiled.rules.map((r) => mon.mediate(r.spec, () => r.decision, { name: `policy:${r.id}` }));
  if (compiled.default === 'deny') {
    // Catch-alls match only what no rule matches, so an `allow` rule is never overridden.
    for (const kind of ['pio', 'mmio'] as const) {
      const ruled = compiled.rules.filter((r) => r.normal.event === kind || (kind === 'pio' && r.normal.event === 'hypercall')).map((r) => r.normal);
      const exceptionPort = mon.machine.layout.exceptionPort; // core's exception reports are not guest I/O
      const spec: EventSpec = kind === 'pio' ? { event: 'pio', ports: [0, 0xffff] } : { event: 'mmio', range: [0n, (1n << 52n) - 1n] };
      const all = normaliseSpec(spec);
      handles.push(mon.mediate(spec, (ev) => {
        if (ev.event === 'pio' && ev.port === exceptionPort) return allow();
        const hit = ruled.some((n) => specsOverlap(n, pointSpec(ev, all)));
        return hit ? allow() : deny({ reason: `policy default: no rule allows this ${kind} access` });
      }, { name: `policy:default-${kind}` }));
    }
  }
  return handles;
}

function pointSpec(ev: Parameters<Parameters<Monitor['mediate']>[1]>[0], fallback: NormalSpec): NormalSpec {
  if (ev.event === 'pio') return { event: 'pio', lo: BigInt(ev.port), hi: BigInt(ev.port), dir: ev.direction };
  if (ev.event === 'mmio') return { event: 'mmio', lo: ev.address, hi: ev.address, dir: ev.direction };
  return fallback;
}
