/**
 * The flow policy and the topology it governs, as data. Both are JSON documents, checked by a
 * hand-written schema whose errors name the JSON path (`rules[2].port[1]`,
 * `topology.principals.vault.secrecy[0]`); compiling them yields frozen, indexed forms that the
 * {@link FlowMonitor}, {@link analyzeFlows} and {@link learnPolicy} share.
 *
 * Explicit rules follow Qubes qrexec: `source`, `destination`, optional `port`/`service`, and an
 * action `allow` / `deny` / `ask`; the first rule that matches decides; nothing matching means
 * deny. On top of that, with `lattice: true` (the default), an allowed flow must also respect the
 * label lattice ({@link canFlow}) unless the rule names a guard declared able to declassify the
 * missing secrecy tags.
 *
 * ```json
 * { "version": 1,
 *   "guards": { "dlp": { "declassify": ["key"], "timeoutMs": 50 } },
 *   "rules": [
 *     { "id": "key-to-worker", "source": "vault", "destination": "worker", "port": 1, "action": "allow" },
 *     { "id": "worker-out", "source": "worker", "destination": "@tag:public", "action": "allow", "guard": "dlp" } ] }
 * ```
 * Principal patterns: a name, `*` (anything), `@tag:T` (a principal whose label carries T),
 * `@host` / `@machine` (by kind), `@dispvm:T` (a disposable principal, served by fresh forks of
 * template T, as Qubes' `@dispvm:T`) and `@dispvm` (any disposable one).
 * @module
 */
import { PolicyError } from '../errors.js';
import { hasTag, makeLabel, type Label } from './labels.js';

/** What a rule does with a matching connection. `ask` defers to an async callback. */
export type FlowAction = 'allow' | 'deny' | 'ask';

/** One explicit rule of a {@link FlowPolicy}. */
export interface FlowRule {
  /** Unique id, named in decisions, audit lines and analysis. */
  readonly id: string;
  /** Principal pattern of the connecting side. */
  readonly source: string;
  /** Principal pattern of the listening side. */
  readonly destination: string;
  /** Destination port, or an inclusive `[first, last]` range. Absent: any port. */
  readonly port?: number | readonly [number, number];
  /** Service name (a host endpoint's or listener's name). Absent: any service. */
  readonly service?: string;
  /** The action. */
  readonly action: FlowAction;
  /** Guard every message of the connection passes (both directions). Only with `allow`/`ask`. */
  readonly guard?: string;
  /** Free text recorded with a `deny`. */
  readonly reason?: string;
}

/** A guard's declaration in the policy: what it may do, not how (the code is registered apart). */
export interface GuardDeclaration {
  /** Secrecy tags this guard may remove from a message it allows. */
  readonly declassify?: readonly string[];
  /** Longest time one inspection may take before the message is denied. Default 100 ms. */
  readonly timeoutMs?: number;
  /** What it checks, for people reading the policy. */
  readonly description?: string;
}

/** A flow policy document. */
export interface FlowPolicy {
  /** Format version: 1. */
  readonly version: 1;
  /** Whether allowed flows must also respect the label lattice. Default true. */
  readonly lattice?: boolean;
  /** Guards by name. */
  readonly guards?: Readonly<Record<string, GuardDeclaration>>;
  /** Rules, first match wins. */
  readonly rules: readonly FlowRule[];
}

/** One principal (machine or host endpoint) of a {@link Topology}. */
export interface PrincipalSpec {
  /** A guest machine or a host-side endpoint. */
  readonly kind: 'machine' | 'host';
  /** Secrecy tags. */
  readonly secrecy?: readonly string[];
  /** Integrity tags. */
  readonly integrity?: readonly string[];
  /** vsock context id (≥ 3 for machines; 2 is the host). */
  readonly cid?: number;
  /**
   * For a machine served by a fresh fork per connection (the router's `serveDisposable`): the
   * template's name, which `@dispvm:<template>` patterns match. Every fork carries this label.
   */
  readonly disposable?: string;
}

/** The machines and host endpoints a policy governs, with their labels. */
export interface Topology {
  /** Format version: 1. */
  readonly version: 1;
  /** Principals by name. */
  readonly principals: Readonly<Record<string, PrincipalSpec>>;
  /**
   * Which principals can reach which at all (`[source, destination]` pairs). Absent: everyone can
   * try everyone (a vsock router connects any two CIDs).
   */
  readonly links?: readonly (readonly [string, string])[];
  /**
   * Virtual switches (L2) by name, each with the principals that have a port on it. Frames
   * (requests with `service: 'ethernet'`, port = EtherType) flow only between principals that
   * share a switch; {@link analyzeFlows} puts the switch on every edge it carries. Absent: frames
   * are analysed between every pair, as if one switch joined everyone.
   */
  readonly switches?: Readonly<Record<string, SwitchSpec>>;
}

/** One virtual switch of a {@link Topology}. */
export interface SwitchSpec {
  /** Principals with a port on the switch (each at most once). */
  readonly ports: readonly string[];
}

/** A compiled rule. */
export interface CompiledFlowRule {
  /** Rule id. */
  readonly id: string;
  /** Index in the policy. */
  readonly index: number;
  /** Source pattern. */
  readonly source: string;
  /** Destination pattern. */
  readonly destination: string;
  /** Inclusive port range, or null for any. */
  readonly ports: readonly [number, number] | null;
  /** Service, or null for any. */
  readonly service: string | null;
  /** Action. */
  readonly action: FlowAction;
  /** Guard name, or null. */
  readonly guard: string | null;
  /** Deny reason, or null. */
  readonly reason: string | null;
}

/** A compiled guard declaration. */
export interface CompiledGuard {
  /** Guard name. */
  readonly name: string;
  /** Tags it may declassify. */
  readonly declassify: readonly string[];
  /** Inspection timeout in ms. */
  readonly timeoutMs: number;
  /** Description, or empty. */
  readonly description: string;
}

/** A validated {@link FlowPolicy}. */
export interface CompiledFlowPolicy {
  /** Lattice rule on. */
  readonly lattice: boolean;
  /** Guards by name. */
  readonly guards: ReadonlyMap<string, CompiledGuard>;
  /** Rules in order. */
  readonly rules: readonly CompiledFlowRule[];
  /** The document it came from (normalised, JSON-serialisable). */
  readonly source: FlowPolicy;
}

/** A principal with its label. */
export interface Principal {
  /** Name. */
  readonly name: string;
  /** Kind. */
  readonly kind: 'machine' | 'host';
  /** Label. */
  readonly label: Label;
  /** vsock CID, if given. */
  readonly cid: number | null;
  /** Template of a disposable machine, or null. */
  readonly disposable: string | null;
}

/** A validated {@link Topology}. */
export interface CompiledTopology {
  /** Principals by name. */
  readonly principals: ReadonlyMap<string, Principal>;
  /** Allowed `source→destination` keys, or null when everyone can reach everyone. */
  readonly links: ReadonlySet<string> | null;
  /** Switches by name with their ports' principals, or null when the topology declares none. */
  readonly switches: ReadonlyMap<string, readonly string[]> | null;
}

/** A connection attempt, as the router presents it. */
export interface ConnectRequest {
  /** Connecting principal. */
  readonly source: string;
  /** Listening principal. */
  readonly destination: string;
  /** Destination port. */
  readonly port: number;
  /** Service name, when the destination names one. */
  readonly service?: string;
}

/** Default guard timeout. */
export const DEFAULT_GUARD_TIMEOUT_MS = 100;
const NAME = /^[\w.:-]{1,64}$/;
const POLICY_FIELDS = ['version', 'lattice', 'guards', 'rules'];
const RULE_FIELDS = ['id', 'source', 'destination', 'port', 'service', 'action', 'guard', 'reason'];
const GUARD_FIELDS = ['declassify', 'timeoutMs', 'description'];

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parseDoc(doc: unknown, root: string): Record<string, unknown> {
  if (typeof doc === 'string') {
    try { doc = JSON.parse(doc); } catch (e) { throw new PolicyError(root, `not JSON: ${(e as Error).message}`); }
  }
  if (!isObj(doc)) throw new PolicyError(root, 'must be an object');
  return doc;
}

function onlyFields(o: Record<string, unknown>, allowed: readonly string[], p: string): void {
  for (const k of Object.keys(o)) if (!allowed.includes(k)) throw new PolicyError(p === '$' ? k : `${p}.${k}`, 'unknown field');
}

function name(v: unknown, p: string, what: string): string {
  if (typeof v !== 'string' || !NAME.test(v)) throw new PolicyError(p, `${what} must be 1-64 characters of [A-Za-z0-9_.:-], got ${JSON.stringify(v)}`);
  return v;
}

function tags(v: unknown, p: string): string[] {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw new PolicyError(p, 'must be an array of tag names');
  return v.map((t, i) => name(t, `${p}[${i}]`, 'a tag'));
}

function pattern(v: unknown, p: string): string {
  if (v === '*' || v === '@host' || v === '@machine' || v === '@dispvm') return v;
  if (typeof v === 'string' && v.startsWith('@tag:')) {
    name(v.slice(5), p, 'the tag of @tag:');
    return v;
  }
  if (typeof v === 'string' && v.startsWith('@dispvm:')) {
    name(v.slice(8), p, 'the template of @dispvm:');
    return v;
  }
  if (typeof v === 'string' && v.startsWith('@')) throw new PolicyError(p, `unknown pattern ${JSON.stringify(v)} (use a name, *, @tag:T, @host, @machine, @dispvm or @dispvm:T)`);
  return name(v, p, 'a principal name');
}

function port(v: unknown, p: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new PolicyError(p, `must be an integer port 0..0xffffffff, got ${JSON.stringify(v)}`);
  return v;
}

function ports(v: unknown, p: string): readonly [number, number] | null {
  if (v === undefined) return null;
  if (typeof v === 'number') {
    const n = port(v, p);
    return [n, n];
  }
  if (!Array.isArray(v) || v.length !== 2) throw new PolicyError(p, `must be a port or an inclusive [first, last] pair, got ${JSON.stringify(v)}`);
  const lo = port(v[0], `${p}[0]`), hi = port(v[1], `${p}[1]`);
  if (hi < lo) throw new PolicyError(p, `last (${hi}) is below first (${lo})`);
  return [lo, hi];
}

function compileGuards(v: unknown): Map<string, CompiledGuard> {
  const out = new Map<string, CompiledGuard>();
  if (v === undefined) return out;
  if (!isObj(v)) throw new PolicyError('guards', 'must be an object of guard declarations by name');
  for (const [g, d] of Object.entries(v)) {
    const p = `guards.${g}`;
    name(g, p, 'a guard name');
    if (!isObj(d)) throw new PolicyError(p, 'must be an object');
    onlyFields(d, GUARD_FIELDS, p);
    const t = d['timeoutMs'] ?? DEFAULT_GUARD_TIMEOUT_MS;
    if (typeof t !== 'number' || !Number.isFinite(t) || t <= 0 || t > 60_000) throw new PolicyError(`${p}.timeoutMs`, `must be a number of ms in (0, 60000], got ${JSON.stringify(t)}`);
    const desc = d['description'] ?? '';
    if (typeof desc !== 'string') throw new PolicyError(`${p}.description`, 'must be a string');
    out.set(g, Object.freeze({ name: g, declassify: Object.freeze(makeLabel(tags(d['declassify'], `${p}.declassify`)).secrecy), timeoutMs: t, description: desc }));
  }
  return out;
}

/**
 * Validates a flow policy (parsed JSON or a JSON string).
 * @throws PolicyError naming the path of the first malformed field.
 */
export function compileFlowPolicy(doc: unknown): CompiledFlowPolicy {
  const d = parseDoc(doc, '$');
  onlyFields(d, POLICY_FIELDS, '$');
  if (d['version'] !== 1) throw new PolicyError('version', `must be 1, got ${JSON.stringify(d['version'])}`);
  const lattice = d['lattice'] ?? true;
  if (typeof lattice !== 'boolean') throw new PolicyError('lattice', 'must be true or false');
  const guards = compileGuards(d['guards']);
  const list = d['rules'];
  if (!Array.isArray(list)) throw new PolicyError('rules', 'must be an array');
  const ids = new Set<string>();
  const rules = list.map((r: unknown, index): CompiledFlowRule => {
    const p = `rules[${index}]`;
    if (!isObj(r)) throw new PolicyError(p, 'must be an object');
    onlyFields(r, RULE_FIELDS, p);
    const id = name(r['id'], `${p}.id`, 'an id');
    if (ids.has(id)) throw new PolicyError(`${p}.id`, `duplicate id '${id}'`);
    ids.add(id);
    const action = r['action'];
    if (action !== 'allow' && action !== 'deny' && action !== 'ask') throw new PolicyError(`${p}.action`, `must be allow, deny or ask, got ${JSON.stringify(action)}`);
    let guard: string | null = null;
    if (r['guard'] !== undefined) {
      guard = name(r['guard'], `${p}.guard`, 'a guard name');
      if (action === 'deny') throw new PolicyError(`${p}.guard`, "a 'deny' rule takes no guard");
      if (!guards.has(guard)) throw new PolicyError(`${p}.guard`, `guard '${guard}' is not declared in guards`);
    }
    const reason = r['reason'];
    if (reason !== undefined && (typeof reason !== 'string' || action !== 'deny')) throw new PolicyError(`${p}.reason`, "only 'deny' rules take a reason, and it is a string");
    const service = r['service'];
    if (service !== undefined) name(service, `${p}.service`, 'a service name');
    return Object.freeze({
      id, index, action, guard,
      source: pattern(r['source'], `${p}.source`),
      destination: pattern(r['destination'], `${p}.destination`),
      ports: ports(r['port'], `${p}.port`),
      service: (service as string | undefined) ?? null,
      reason: (reason as string | undefined) ?? null,
    });
  });
  return Object.freeze({ lattice, guards, rules, source: toFlowPolicy(lattice, guards, rules) });
}

function toFlowPolicy(lattice: boolean, guards: ReadonlyMap<string, CompiledGuard>, rules: readonly CompiledFlowRule[]): FlowPolicy {
  const g: Record<string, GuardDeclaration> = {};
  for (const c of guards.values()) g[c.name] = { declassify: c.declassify, timeoutMs: c.timeoutMs, ...(c.description ? { description: c.description } : {}) };
  return {
    version: 1, lattice,
    ...(guards.size ? { guards: g } : {}),
    rules: rules.map((r) => ({
      id: r.id, source: r.source, destination: r.destination,
      ...(r.ports ? { port: r.ports[0] === r.ports[1] ? r.ports[0] : r.ports } : {}),
      ...(r.service !== null ? { service: r.service } : {}),
      action: r.action,
      ...(r.guard !== null ? { guard: r.guard } : {}),
      ...(r.reason !== null ? { reason: r.reason } : {}),
    })),
  };
}

/**
 * Validates a topology (parsed JSON or a JSON string). Paths start with `topology.`.
 * @throws PolicyError naming the path of the first malformed field.
 */
export function compileTopology(doc: unknown): CompiledTopology {
  const d = parseDoc(doc, 'topology');
  for (const k of Object.keys(d)) if (!['version', 'principals', 'links', 'switches'].includes(k)) throw new PolicyError(`topology.${k}`, 'unknown field');
  if (d['version'] !== 1) throw new PolicyError('topology.version', `must be 1, got ${JSON.stringify(d['version'])}`);
  const ps = d['principals'];
  if (!isObj(ps)) throw new PolicyError('topology.principals', 'must be an object of principals by name');
  const principals = new Map<string, Principal>();
  const cids = new Map<number, string>();
  for (const [n, s] of Object.entries(ps)) {
    const p = `topology.principals.${n}`;
    name(n, p, 'a principal name');
    if (!isObj(s)) throw new PolicyError(p, 'must be an object');
    for (const k of Object.keys(s)) if (!['kind', 'secrecy', 'integrity', 'cid', 'disposable'].includes(k)) throw new PolicyError(`${p}.${k}`, 'unknown field');
    const kind = s['kind'];
    if (kind !== 'machine' && kind !== 'host') throw new PolicyError(`${p}.kind`, `must be 'machine' or 'host', got ${JSON.stringify(kind)}`);
    let cid: number | null = null;
    if (s['cid'] !== undefined) {
      const c = s['cid'];
      if (typeof c !== 'number' || !Number.isInteger(c) || c < 2 || c > 0xfffffffe) throw new PolicyError(`${p}.cid`, `must be an integer CID 2..0xfffffffe, got ${JSON.stringify(c)}`);
      if (kind === 'machine' && c < 3) throw new PolicyError(`${p}.cid`, 'a machine CID is at least 3 (0-2 are reserved for the hypervisor and host)');
      const other = cids.get(c);
      if (other !== undefined && kind === 'machine') throw new PolicyError(`${p}.cid`, `CID ${c} is already '${other}'`);
      if (kind === 'machine') cids.set(c, n);
      cid = c;
    }
    let disposable: string | null = null;
    if (s['disposable'] !== undefined) {
      if (kind !== 'machine') throw new PolicyError(`${p}.disposable`, 'only a machine can be disposable');
      disposable = name(s['disposable'], `${p}.disposable`, 'a template name');
    }
    principals.set(n, Object.freeze({ name: n, kind, cid, disposable, label: Object.freeze(makeLabel(tags(s['secrecy'], `${p}.secrecy`), tags(s['integrity'], `${p}.integrity`))) }));
  }
  let links: Set<string> | null = null;
  if (d['links'] !== undefined) {
    const l = d['links'];
    if (!Array.isArray(l)) throw new PolicyError('topology.links', 'must be an array of [source, destination] pairs');
    links = new Set();
    l.forEach((pair: unknown, i) => {
      const p = `topology.links[${i}]`;
      if (!Array.isArray(pair) || pair.length !== 2) throw new PolicyError(p, 'must be a [source, destination] pair');
      pair.forEach((x: unknown, j) => {
        if (typeof x !== 'string' || !principals.has(x)) throw new PolicyError(`${p}[${j}]`, `unknown principal ${JSON.stringify(x)}`);
      });
      links?.add(`${String(pair[0])}→${String(pair[1])}`);
    });
  }
  return Object.freeze({ principals, links, switches: compileSwitches(d['switches'], principals) });
}

function compileSwitches(doc: unknown, principals: ReadonlyMap<string, Principal>): ReadonlyMap<string, readonly string[]> | null {
  if (doc === undefined) return null;
  if (!isObj(doc)) throw new PolicyError('topology.switches', 'must be an object of switches by name');
  const out = new Map<string, readonly string[]>();
  for (const [n, sw] of Object.entries(doc)) {
    const p = `topology.switches.${n}`;
    name(n, p, 'a switch name');
    if (!isObj(sw)) throw new PolicyError(p, 'must be an object');
    for (const k of Object.keys(sw)) if (k !== 'ports') throw new PolicyError(`${p}.${k}`, 'unknown field');
    const ports = sw['ports'];
    if (!Array.isArray(ports)) throw new PolicyError(`${p}.ports`, 'must be an array of principal names');
    const seen = new Set<string>();
    ports.forEach((x: unknown, i) => {
      if (typeof x !== 'string' || !principals.has(x)) throw new PolicyError(`${p}.ports[${i}]`, `unknown principal ${JSON.stringify(x)}`);
      if (seen.has(x)) throw new PolicyError(`${p}.ports[${i}]`, `'${x}' already has a port on this switch`);
      seen.add(x);
    });
    out.set(n, Object.freeze([...seen]));
  }
  return out;
}

/** Whether principal `p` matches a rule's source or destination pattern. */
export function matchesPattern(pat: string, p: Principal): boolean {
  if (pat === '*') return true;
  if (pat === '@host') return p.kind === 'host';
  if (pat === '@machine') return p.kind === 'machine';
  if (pat.startsWith('@tag:')) return hasTag(p.label, pat.slice(5));
  if (pat === '@dispvm') return p.disposable !== null;
  if (pat.startsWith('@dispvm:')) return p.disposable === pat.slice(8);
  return pat === p.name;
}

/** Why `rule` does or does not match `req`: null when it matches, else the first mismatch. */
export function ruleMismatch(rule: CompiledFlowRule, src: Principal, dst: Principal, req: ConnectRequest): string | null {
  if (!matchesPattern(rule.source, src)) return `source '${rule.source}' does not match '${src.name}'`;
  if (!matchesPattern(rule.destination, dst)) return `destination '${rule.destination}' does not match '${dst.name}'`;
  if (rule.ports !== null && (req.port < rule.ports[0] || req.port > rule.ports[1])) {
    return `port ${req.port} is outside ${rule.ports[0] === rule.ports[1] ? rule.ports[0] : `${rule.ports[0]}-${rule.ports[1]}`}`;
  }
  if (rule.service !== null && rule.service !== req.service) return `service '${req.service ?? '(none)'}' is not '${rule.service}'`;
  return null;
}
