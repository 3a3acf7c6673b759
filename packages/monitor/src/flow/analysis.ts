/**
 * Static analysis of a flow policy over a topology, in the spirit of SETools `seinfoflow`: which
 * flows the policy admits at all (the flow graph), whether information with a tag can reach a
 * principal and through which chains of principals and guards (every simple path, shortest first),
 * and which rules never match, are shadowed by earlier ones, contradict earlier ones, or are always
 * refused by the lattice.
 *
 * It is exact, not sampled: ports and services are split into the classes the rules distinguish,
 * and every (source, destination, class) is evaluated with the same {@link evaluateConnect} the
 * monitor uses. The graph renders as DOT or SVG. Labels are static, so a message carries its sender's label and only a guard on the
 * edge can lift a tag.
 *
 * Two kinds of channel carry information: vsock connections (any pair of principals, or the
 * topology's `links`) and L2 frames through a virtual switch (requests with `service: 'ethernet'`
 * and port = EtherType, as the `FlowMonitor` decides a switch's links). When the topology names
 * its `switches`, frames are analysed only between principals that share one, each edge says
 * which switch carries it, and a path through a switch lists it — so "the only way from the key
 * to `outside` is through switch `lan` and its content filter" is a question `reach` answers.
 * @module
 */
import { PolicyError } from '../errors.js';
import { evaluateConnect, latticeRefusal } from './evaluate.js';
import { latticeGap } from './labels.js';
import { renderFlowSvg } from './svg.js';
import {
  compileFlowPolicy,
  compileTopology,
  ruleMismatch,
  type CompiledFlowPolicy,
  type CompiledTopology,
  type ConnectRequest,
  type Principal,
} from './policy.js';

/** One edge of the flow graph: information can go `from` → `to` under `rule`. */
export interface FlowEdge {
  /** Sender. */
  readonly from: string;
  /** Receiver. */
  readonly to: string;
  /** The rule that admits the connection. */
  readonly rule: string;
  /** Guard on the edge, or null. */
  readonly guard: string | null;
  /** `request`: the connecting side sends; `reply`: the listener answers on the same connection. */
  readonly direction: 'request' | 'reply';
  /** Whether the rule is `ask` (the edge exists only if the callback allows). */
  readonly ask: boolean;
  /** Port/service classes admitted, e.g. `80-90`, `*`, `1 (svc)`; for frames, EtherTypes `0x800 (ethernet)`. */
  readonly ports: readonly string[];
  /** What carries it: `vsock`, `switch:<name>` (frames through that switch), or `ethernet` (frames, no switches declared). */
  readonly channel: string;
}

/** A chain of principals along which tagged information can travel. */
export interface FlowPath {
  /** Principals from the tag's holder to the target. */
  readonly hops: readonly string[];
  /** Edges taken (`hops.length - 1`). */
  readonly edges: readonly FlowEdge[];
  /** Guards passed, in order (null entries omitted). */
  readonly guards: readonly string[];
  /** Switches passed, in order (a hop by vsock adds none). */
  readonly switches: readonly string[];
  /** The first guard on the path that may declassify the tag, or null (the tag arrives as is). */
  readonly declassifiedBy: string | null;
}

/** The answer to "can tag T reach principal M?". */
export interface TagReach {
  /** The tag. */
  readonly tag: string;
  /** The target. */
  readonly target: string;
  /** Principals holding the tag (secrecy), where paths start. */
  readonly sources: readonly string[];
  /** Whether any path exists (a holder of the tag is trivially reached by itself). */
  readonly reachable: boolean;
  /** Every simple path, shortest first (up to `maxPaths`). */
  readonly paths: readonly FlowPath[];
  /** Whether `maxPaths` cut the list short. */
  readonly truncated: boolean;
}

/** A problem with one rule. */
export interface RuleFinding {
  /** What kind of problem. */
  readonly kind: 'never-matches' | 'shadowed' | 'contradicted' | 'lattice-refuses';
  /** The rule. */
  readonly rule: string;
  /** Earlier rules responsible (for `shadowed`, `contradicted`). */
  readonly by: readonly string[];
  /** One line for people. */
  readonly message: string;
}

/** The result of {@link analyzeFlows}. */
export interface FlowAnalysis {
  /** The compiled policy analysed. */
  readonly policy: CompiledFlowPolicy;
  /** The compiled topology analysed. */
  readonly topology: CompiledTopology;
  /** Every edge the policy admits. */
  readonly edges: readonly FlowEdge[];
  /** Findings about rules, in rule order. */
  readonly findings: readonly RuleFinding[];
  /** Can information with `tag` reach `target`? Every path, shortest first. */
  reach(tag: string, target: string): TagReach;
  /** Whether every path from `tag`'s holders to `target` passes `guard` (vacuously true if none). */
  onlyThrough(tag: string, target: string, guard: string): boolean;
  /** The flow graph in Graphviz DOT. */
  toDot(): string;
  /** The flow graph as standalone SVG. */
  toSvg(): string;
}

/** Options of {@link analyzeFlows}. */
export interface AnalyzeOptions {
  /** Most paths one {@link FlowAnalysis.reach} returns. Default 1000. */
  readonly maxPaths?: number;
}

interface PortClass {
  readonly port: number;
  readonly last: number;
  readonly service: string | undefined;
}

/** The service frames carry in connect requests (`FlowMonitor.frame`). */
const ETHERNET = 'ethernet';

function portClasses(policy: CompiledFlowPolicy): PortClass[] {
  const cuts = new Set<number>([0]);
  for (const r of policy.rules) {
    if (r.ports === null) continue;
    cuts.add(r.ports[0]);
    if (r.ports[1] < 0xffffffff) cuts.add(r.ports[1] + 1);
  }
  const starts = [...cuts].sort((a, b) => a - b);
  const services = [undefined, ...new Set(policy.rules.flatMap((r) => (r.service === null ? [] : [r.service])))];
  const out: PortClass[] = [];
  starts.forEach((s, i) => {
    const last = (starts[i + 1] ?? 0x100000000) - 1;
    for (const service of services) out.push({ port: s, last, service });
  });
  return out;
}

/** Classes of frames: the port cuts below 2^16 (EtherTypes), each with service `ethernet`. */
function frameClasses(classes: readonly PortClass[]): PortClass[] {
  const seen = new Set<number>();
  const out: PortClass[] = [];
  for (const c of classes) {
    if (c.port > 0xffff || seen.has(c.port)) continue;
    seen.add(c.port);
    out.push({ port: c.port, last: Math.min(c.last, 0xffff), service: ETHERNET });
  }
  return out;
}

function describeClass(c: PortClass): string {
  const hex = c.service === ETHERNET;
  const n = (x: number): string => (hex ? `0x${x.toString(16)}` : `${x}`);
  const p = c.port === 0 && c.last >= (hex ? 0xffff : 0xffffffff) ? '*' : c.port === c.last ? n(c.port) : `${n(c.port)}-${c.last === 0xffffffff ? 'max' : n(c.last)}`;
  return c.service === undefined ? p : `${p} (${c.service})`;
}

/**
 * Analyses `policy` (a {@link FlowPolicy} or its JSON) over `topology` (a {@link Topology}).
 * @throws PolicyError if either is malformed.
 */
export function analyzeFlows(policy: unknown, topology: unknown, options: AnalyzeOptions = {}): FlowAnalysis {
  const pol = compileFlowPolicy(policy);
  const top = compileTopology(topology);
  const maxPaths = options.maxPaths ?? 1000;
  if (!Number.isInteger(maxPaths) || maxPaths < 1) throw new PolicyError('options.maxPaths', 'must be a positive integer');
  const all = portClasses(pol);
  // With switches declared, frames go only over them; vsock never carries service `ethernet`.
  const streamClasses = top.switches === null ? all : all.filter((c) => c.service !== ETHERNET);
  const frames = frameClasses(all);
  const edges = new Map<string, { e: Omit<FlowEdge, 'ports'>; ports: string[] }>();
  const addEdge = (e: Omit<FlowEdge, 'ports'>, cls: string): void => {
    const k = `${e.from}|${e.to}|${e.rule}|${e.direction}|${e.channel}`;
    const have = edges.get(k);
    if (have) have.ports.push(cls);
    else edges.set(k, { e, ports: [cls] });
  };
  const stats = pol.rules.map(() => ({ matched: 0, first: 0, firstRefused: 0, shadowers: new Set<string>(), contradictors: new Set<string>() }));
  // What is evaluated: (source, destination, class, channel). Frames through a switch are
  // decided per receiving port, so a switch joins every ordered pair of its ports.
  const work: { src: Principal; dst: Principal; classes: readonly PortClass[]; channel: string }[] = [];
  for (const src of top.principals.values()) {
    for (const dst of top.principals.values()) {
      if (src === dst) continue;
      if (top.links !== null && !top.links.has(`${src.name}→${dst.name}`)) continue;
      work.push({ src, dst, classes: streamClasses, channel: top.switches === null ? 'any' : 'vsock' });
    }
  }
  for (const [name, ports] of top.switches ?? []) {
    for (const s of ports) for (const t of ports) {
      const src = top.principals.get(s), dst = top.principals.get(t);
      if (src && dst && src !== dst) work.push({ src, dst, classes: frames, channel: `switch:${name}` });
    }
  }
  for (const { src, dst, classes, channel: ch } of work) {
    for (const c of classes) {
      const channel = ch === 'any' ? (c.service === ETHERNET ? ETHERNET : 'vsock') : ch;
      const req: ConnectRequest = { source: src.name, destination: dst.name, port: c.port, ...(c.service !== undefined ? { service: c.service } : {}) };
      const ev = evaluateConnect(pol, top, req);
      const first = ev.rule;
      for (const r of pol.rules) {
        if (ruleMismatch(r, src, dst, req) !== null) continue;
        const s = stats[r.index];
        if (s === undefined) continue;
        s.matched++;
        if (first === null || r === first) continue;
        s.shadowers.add(first.id);
        if (first.action !== r.action || first.guard !== r.guard) s.contradictors.add(first.id);
      }
      if (first === null) continue;
      const fs = stats[first.index];
      if (fs) fs.first++;
      if (ev.verdict === 'deny') {
        if (first.action !== 'deny' && fs) fs.firstRefused++;
        continue;
      }
      const cls = describeClass(c);
      addEdge({ from: src.name, to: dst.name, rule: first.id, guard: first.guard, direction: 'request', ask: ev.verdict === 'ask', channel }, cls);
      // A frame link is one-way (the other direction is its own link, decided on its own).
      if (c.service === ETHERNET) continue;
      const declass = first.guard === null ? [] : pol.guards.get(first.guard)?.declassify ?? [];
      if (!pol.lattice || latticeRefusal(latticeGap(dst.label, src.label), declass, first.guard) === null) {
        addEdge({ from: dst.name, to: src.name, rule: first.id, guard: first.guard, direction: 'reply', ask: ev.verdict === 'ask', channel }, cls);
      }
    }
  }
  const edgeList: FlowEdge[] = [...edges.values()].map(({ e, ports }) => Object.freeze({ ...e, ports: mergeClasses(ports) }));
  const findings = ruleFindings(pol, stats);
  const reach = (tag: string, target: string): TagReach => reachOf(pol, top, edgeList, tag, target, maxPaths);
  return {
    policy: pol, topology: top, edges: edgeList, findings, reach,
    onlyThrough: (tag, target, guard) => {
      const r = reach(tag, target);
      if (r.truncated) return false;
      return r.paths.every((p) => p.guards.includes(guard));
    },
    toDot: () => renderFlowDot(top, edgeList),
    toSvg: () => renderFlowSvg(top, edgeList),
  };
}

function mergeClasses(ports: string[]): string[] {
  return [...new Set(ports)];
}

type Stat = { matched: number; first: number; firstRefused: number; shadowers: Set<string>; contradictors: Set<string> };

function ruleFindings(pol: CompiledFlowPolicy, stats: readonly Stat[]): RuleFinding[] {
  const out: RuleFinding[] = [];
  pol.rules.forEach((r, i) => {
    const s = stats[i];
    if (s === undefined) return;
    if (s.matched === 0) {
      out.push({ kind: 'never-matches', rule: r.id, by: [], message: `rule '${r.id}' matches no connection between principals of the topology (${r.source} → ${r.destination})` });
      return;
    }
    if (s.first === 0) {
      out.push({ kind: 'shadowed', rule: r.id, by: [...s.shadowers], message: `rule '${r.id}' never decides: every connection it matches is decided earlier by ${[...s.shadowers].map((x) => `'${x}'`).join(', ')}` });
    } else if (s.contradictors.size > 0) {
      out.push({ kind: 'contradicted', rule: r.id, by: [...s.contradictors], message: `rule '${r.id}' (${r.action}${r.guard ? ` via ${r.guard}` : ''}) overlaps earlier ${[...s.contradictors].map((x) => `'${x}'`).join(', ')} with a different outcome; the earlier rule wins where they overlap` });
    }
    if (s.first > 0 && r.action !== 'deny' && s.firstRefused === s.first) {
      out.push({ kind: 'lattice-refuses', rule: r.id, by: [], message: `rule '${r.id}' ${r.action}s, but the lattice refuses every connection it decides (add a guard that may declassify, or relabel)` });
    }
  });
  return out;
}

function reachOf(pol: CompiledFlowPolicy, top: CompiledTopology, edges: readonly FlowEdge[], tag: string, target: string, maxPaths: number): TagReach {
  if (!top.principals.has(target)) throw new PolicyError('target', `unknown principal '${target}'`);
  const sources = [...top.principals.values()].filter((p) => p.label.secrecy.includes(tag)).map((p) => p.name);
  const out = new Map<string, FlowEdge[]>();
  for (const e of edges) {
    const l = out.get(e.from) ?? [];
    l.push(e);
    out.set(e.from, l);
  }
  const paths: FlowPath[] = [];
  const seen = new Set<string>();
  let truncated = false;
  // Two paths through the same principals and guards differ only in which rule admitted a hop:
  // the same chain for a reader, so it is listed once (with the first rule found).
  const push = (hops: string[], es: FlowEdge[]): void => {
    const p = toPath(pol, hops, es, tag);
    const k = `${hops.join('>')}|${p.guards.join(',')}|${p.switches.join(',')}`;
    if (seen.has(k)) return;
    seen.add(k);
    paths.push(p);
  };
  // Breadth-first over simple paths, so paths come out shortest first.
  let frontier: { hops: string[]; edges: FlowEdge[] }[] = sources.map((s) => ({ hops: [s], edges: [] }));
  for (const f of frontier) if (f.hops[0] === target) push(f.hops, f.edges);
  while (frontier.length > 0 && !truncated) {
    const next: typeof frontier = [];
    for (const f of frontier) {
      const at = f.hops[f.hops.length - 1] as string;
      if (at === target) continue;
      for (const e of out.get(at) ?? []) {
        if (f.hops.includes(e.to)) continue;
        const p = { hops: [...f.hops, e.to], edges: [...f.edges, e] };
        if (e.to === target) {
          if (paths.length >= maxPaths) { truncated = true; break; }
          push(p.hops, p.edges);
        } else {
          next.push(p);
        }
      }
      if (truncated) break;
    }
    frontier = next;
  }
  return { tag, target, sources, reachable: paths.length > 0, paths, truncated };
}

function toPath(pol: CompiledFlowPolicy, hops: string[], edges: FlowEdge[], tag: string): FlowPath {
  const guards = edges.flatMap((e) => (e.guard === null ? [] : [e.guard]));
  const declassifiedBy = guards.find((g) => pol.guards.get(g)?.declassify.includes(tag)) ?? null;
  const switches = edges.flatMap((e) => (e.channel.startsWith('switch:') ? [e.channel.slice(7)] : []));
  return { hops, edges, guards, switches, declassifiedBy };
}

function q(s: string): string {
  return `"${s.replace(/["\\]/g, '\\$&')}"`;
}

/** Renders principals and edges as Graphviz DOT; a guard is a diamond on its edge. */
export function renderFlowDot(top: CompiledTopology, edges: readonly FlowEdge[]): string {
  const lines = ['digraph flows {', '  rankdir=LR;', '  node [fontname="Helvetica"];'];
  for (const p of top.principals.values()) {
    const l = p.label;
    const tags = `s: ${l.secrecy.join(',') || '-'}\\ni: ${l.integrity.join(',') || '-'}`;
    lines.push(`  ${q(p.name)} [shape=${p.kind === 'host' ? 'ellipse' : 'box'}, label="${p.name.replace(/"/g, '')}\\n${tags}"];`);
  }
  for (const e of edges) {
    const style = e.direction === 'reply' ? 'dotted' : e.ask ? 'dashed' : 'solid';
    const via = e.channel.startsWith('switch:') ? ` [${e.channel}]` : '';
    const label = `${e.rule}${e.direction === 'reply' ? ' (reply)' : ''}: ${e.ports.join(' ')}${via}`;
    if (e.guard === null) {
      lines.push(`  ${q(e.from)} -> ${q(e.to)} [style=${style}, label=${q(label)}];`);
    } else {
      const g = `guard:${e.guard}:${e.from}:${e.to}${e.channel.startsWith('switch:') ? `:${e.channel}` : ''}`;
      lines.push(`  ${q(g)} [shape=diamond, label=${q(e.guard)}];`);
      lines.push(`  ${q(e.from)} -> ${q(g)} [style=${style}, label=${q(label)}];`);
      lines.push(`  ${q(g)} -> ${q(e.to)} [style=${style}];`);
    }
  }
  lines.push('}');
  return `${lines.join('\n')}\n`;
}
