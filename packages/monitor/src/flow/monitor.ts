/**
 * The flow monitor: the one place that decides whether a connection may be set up and whether
 * each message on it may reach the receiver. A channel (the vsock router, a host endpoint) asks
 * it before the receiver sees a byte. Every decision — labels, rule, guard, reason — goes to the
 * same hash-chained {@link AuditLog} as the machine monitor's, and to `tsvm:monitor:decision`.
 *
 * In `learn` mode nothing between known principals is denied (an unknown one still is): each connection is allowed, what the policy *would* have said
 * is recorded, and {@link FlowMonitor.observations} feeds {@link learnPolicy}.
 * @module
 */
import { InvalidArgumentError } from '@tsvm/core';
import { decisionChannel, type AuditEntry, type AuditLog } from '../audit.js';
import { PolicyError } from '../errors.js';
import { FlowCostMeter, type FlowCostReport } from './costs.js';
import { evaluateConnect, latticeRefusal, type TraceStep } from './evaluate.js';
import { runGuard, type GuardFn, type GuardOutcome } from './guards.js';
import { checkFlowCostModel, withPredictions, type FlowCostModel } from './predict.js';
import { declassify, latticeGap, type Label, type LatticeGap } from './labels.js';
import {
  compileFlowPolicy,
  compileTopology,
  type CompiledFlowPolicy,
  type CompiledGuard,
  type CompiledTopology,
  type ConnectRequest,
  type Principal,
} from './policy.js';

/** Answers an `ask` rule: true allows. A throw, a non-boolean or a timeout denies. */
export type AskFn = (request: ConnectRequest, rule: string) => boolean | Promise<boolean>;

/** Options of a {@link FlowMonitor}. */
export interface FlowMonitorOptions {
  /** The flow policy ({@link FlowPolicy} as an object or JSON string). */
  readonly policy: unknown;
  /** The topology ({@link Topology}) with every principal's label. */
  readonly topology: unknown;
  /** Guard code by name; every guard the policy declares must be here. */
  readonly guards?: Readonly<Record<string, GuardFn>>;
  /** Callback for `ask` rules. Absent: `ask` denies. */
  readonly ask?: AskFn;
  /** Longest wait for `ask`. Default 30 s. */
  readonly askTimeoutMs?: number;
  /** Where decisions are logged. */
  readonly audit?: AuditLog;
  /** `enforce` (default) or `learn` (allow everything, record what would have been decided). */
  readonly mode?: 'enforce' | 'learn';
  /** Log every message decision (`all`, default) or only denied ones (cheaper at high rates). */
  readonly logMessages?: 'all' | 'denied';
  /** Unit prices ({@link calibrateFlowCosts}): `costs()` then shows each row's predicted cost beside the measured one. */
  readonly costModel?: FlowCostModel;
}

/** An allowed connection, as the monitor knows it. */
export interface FlowConnection {
  /** Id, unique within this monitor. */
  readonly id: number;
  /** Connecting principal. */
  readonly source: string;
  /** Listening principal. */
  readonly destination: string;
  /** Destination port. */
  readonly port: number;
  /** Service, if the request named one. */
  readonly service: string | null;
  /** Rule that allowed it (null only in learn mode with nothing matching). */
  readonly rule: string | null;
  /** Guard every message passes, or null. */
  readonly guard: string | null;
  /** Source label. */
  readonly sourceLabel: Label;
  /** Destination label. */
  readonly destinationLabel: Label;
}

/** The monitor's answer to a connection request. */
export interface ConnectDecision {
  /** The verdict. */
  readonly verdict: 'allow' | 'deny';
  /** The request. */
  readonly request: ConnectRequest;
  /** The connection, when allowed. */
  readonly connection: FlowConnection | null;
  /** Matching rule id, or null. */
  readonly rule: string | null;
  /** Guard the connection uses, or null. */
  readonly guard: string | null;
  /** Rules looked at. */
  readonly trace: readonly TraceStep[];
  /** Lattice gap source → destination, when checked. */
  readonly lattice: LatticeGap | null;
  /** Whether an `ask` callback decided. */
  readonly asked: boolean;
  /** In learn mode: what enforcement would have said. */
  readonly wouldBe?: 'allow' | 'deny';
  /** Why. */
  readonly reason: string;
}

/** Direction of a message on a connection: `forward` is source → destination. */
export type FlowDirection = 'forward' | 'reverse';

/** The monitor's answer to one message. */
export type MessageDecision =
  | {
    /** Deliver `data` (possibly rewritten by the guard). */
    readonly verdict: 'allow';
    /** Bytes to deliver. */
    readonly data: Uint8Array;
    /** Label the delivered message carries. */
    readonly label: Label;
    /** Tags the guard removed. */
    readonly declassified: readonly string[];
    /** Whether the guard rewrote the message. */
    readonly rewritten: boolean;
    /** Guard that looked at it, or null. */
    readonly guard: string | null;
    /** Why. */
    readonly reason: string;
  }
  | {
    /** Drop it. */
    readonly verdict: 'deny';
    /** Guard that looked at it, or null. */
    readonly guard: string | null;
    /** Why. */
    readonly reason: string;
  };

/** Most (source, destination, EtherType) links the monitor remembers; the oldest is forgotten first. */
const MAX_LINKS = 4096;

/** One L2 frame as a switch asks about it (structurally the `SwitchFrame` of `@tsvm/devices`). */
export interface FrameRequest {
  /** Sending port's principal. */
  readonly source: string;
  /** Receiving port's principal. */
  readonly destination: string;
  /** EtherType: the link's "port" in rules (0x0800 IPv4, 0x0806 ARP, 0x86dd IPv6). */
  readonly ethertype: number;
  /** The frame, Ethernet header included. */
  readonly data: Uint8Array;
}

/** A connection observed in learn mode. */
export interface ObservedFlow {
  /** The request. */
  readonly request: ConnectRequest;
  /** What enforcement would have said. */
  readonly wouldBe: 'allow' | 'deny';
  /** The rule that matched, if any. */
  readonly rule: string | null;
  /** The lattice gap source → destination. */
  readonly lattice: LatticeGap;
}

/** Decision counters. */
export interface FlowStats {
  /** Connections allowed. */
  connectionsAllowed: number;
  /** Connections denied. */
  connectionsDenied: number;
  /** Messages allowed. */
  messagesAllowed: number;
  /** Messages denied. */
  messagesDenied: number;
  /** Bytes allowed through. */
  bytesAllowed: number;
  /** Messages a guard inspected. */
  guardInspections: number;
}

/** An audit line of a flow decision: the common fields plus what only flows have. */
export interface FlowAuditEntry extends AuditEntry {
  /** Flow details. */
  readonly flow: {
    /** Connection id, or null for a refused request. */
    readonly connection: number | null;
    /** Sender. */
    readonly from: string;
    /** Receiver. */
    readonly to: string;
    /** Destination port. */
    readonly port: number;
    /** Rule, or null. */
    readonly rule: string | null;
    /** Guard, or null. */
    readonly guard: string | null;
    /**
     * Sender label. On connection lines, denied messages and declassified messages; a plain
     * allowed message only names its connection, whose connect line carries the labels (this
     * keeps a per-message line small: it is written for every message).
     */
    readonly fromLabel?: Label;
    /** Receiver label (where `fromLabel` is). */
    readonly toLabel?: Label;
    /** Message length, for messages. */
    readonly bytes?: number;
    /** Tags declassified, for messages. */
    readonly declassified?: readonly string[];
    /** The machine that served the connection, for a disposable endpoint (`flow:disposable` lines). */
    readonly instance?: string;
    /** Mode. */
    readonly mode: 'enforce' | 'learn';
  };
}

interface Live {
  readonly conn: FlowConnection;
  readonly src: Principal;
  readonly dst: Principal;
  readonly guard: CompiledGuard | null;
  readonly guardFn: GuardFn | null;
  /** Precomputed unguarded verdict per direction: null allows, a string denies. */
  readonly forward: string | null;
  readonly reverse: string | null;
  /** A guarded message's lattice verdict per direction when nothing was declassified ('' allows), computed on first use. */
  plainForward?: string;
  plainReverse?: string;
  /** The reason of a guarded message allowed as is. */
  allowedWhy?: string;
  /** Per direction, the audit line of a plain allowed message up to its byte count (see `#logPlain`). */
  lineForward?: LineTemplate;
  lineReverse?: LineTemplate;
}

/**
 * `JSON.stringify` of a plain allowed message's entry cut where `flow.bytes` goes (the entry's
 * last key is `flow`, whose last keys are `bytes` and `mode`), for the reason and guard it was
 * made with: per message only the count goes between `head` and `tail`.
 */
interface LineTemplate { readonly kind: 'message' | 'frame'; readonly reason: string; readonly guard: string | null; readonly head: string; readonly tail: string }

/** Decides connections and messages between labelled principals. */
export class FlowMonitor {
  /** The compiled policy. */
  readonly policy: CompiledFlowPolicy;
  /** The compiled topology. */
  readonly topology: CompiledTopology;
  /** Mode. */
  readonly mode: 'enforce' | 'learn';
  /** Counters. */
  readonly stats: FlowStats = { connectionsAllowed: 0, connectionsDenied: 0, messagesAllowed: 0, messagesDenied: 0, bytesAllowed: 0, guardInspections: 0 };
  readonly #guards: ReadonlyMap<string, GuardFn>;
  readonly #ask: AskFn | undefined;
  readonly #askTimeout: number;
  readonly #audit: AuditLog | undefined;
  readonly #logAll: boolean;
  readonly #costModel: FlowCostModel | undefined;
  readonly #live = new Map<number, Live>();
  readonly #meter = new FlowCostMeter();
  readonly #observed: ObservedFlow[] = [];
  /** L2 links by `source\ndestination\nethertype`: connection id, refusal reason, or the pending decision. */
  readonly #links = new Map<string, number | string | Promise<number | string>>();
  #nextId = 1;
  /** One Date per millisecond for audit lines (a line's time has ms resolution; `new Date()` per line cost ~0.4 µs). */
  #date = new Date(0);

  /**
   * @param options - policy, topology, guard code, ask callback, audit log, mode.
   * @throws PolicyError for a malformed policy or topology, or a declared guard without code.
   */
  constructor(options: FlowMonitorOptions) {
    this.policy = compileFlowPolicy(options.policy);
    this.topology = compileTopology(options.topology);
    const code = new Map<string, GuardFn>();
    for (const [n, fn] of Object.entries(options.guards ?? {})) {
      if (!this.policy.guards.has(n)) throw new PolicyError(`guards.${n}`, 'guard code given for a guard the policy does not declare');
      if (typeof fn !== 'function') throw new InvalidArgumentError(`guards.${n}`, 'must be a function');
      code.set(n, fn);
    }
    for (const n of this.policy.guards.keys()) if (!code.has(n)) throw new PolicyError(`guards.${n}`, 'declared in the policy but no code was registered for it');
    this.#guards = code;
    this.#ask = options.ask;
    this.#askTimeout = options.askTimeoutMs ?? 30_000;
    this.#audit = options.audit;
    this.mode = options.mode ?? 'enforce';
    this.#logAll = (options.logMessages ?? 'all') === 'all';
    if (options.costModel !== undefined) checkFlowCostModel(options.costModel);
    this.#costModel = options.costModel;
  }

  /** Connections observed so far (learn mode records every one; enforce mode records none). */
  get observations(): readonly ObservedFlow[] {
    return this.#observed;
  }

  /** The principal called `name`, or undefined. */
  principal(name: string): Principal | undefined {
    return this.topology.principals.get(name);
  }

  /** The principal whose CID is `cid` (host endpoints may share CID 2; the first is returned). */
  principalByCid(cid: number): Principal | undefined {
    for (const p of this.topology.principals.values()) if (p.cid === cid) return p;
    return undefined;
  }

  /** Decides a connection request. Never throws for a hostile request: it is denied. */
  async connect(request: ConnectRequest): Promise<ConnectDecision> {
    const t0 = performance.now();
    const ev = evaluateConnect(this.policy, this.topology, request);
    let verdict: 'allow' | 'deny' = ev.verdict === 'allow' ? 'allow' : 'deny';
    let reason = ev.reason;
    let asked = false;
    if (ev.verdict === 'ask' && ev.rule !== null) {
      asked = true;
      const r = await this.#askUser(request, ev.rule.id);
      verdict = r.ok ? 'allow' : 'deny';
      reason = `${reason}; ${r.why}`;
    }
    const wouldBe = verdict;
    if (this.mode === 'learn') {
      const src = this.topology.principals.get(request.source), dst = this.topology.principals.get(request.destination);
      if (src && dst) this.#observed.push({ request: { ...request }, wouldBe, rule: ev.rule?.id ?? null, lattice: latticeGap(src.label, dst.label) });
      if (src && dst) {
        verdict = 'allow';
        reason = `learning: allowed; enforcement would ${wouldBe}: ${reason}`;
      }
    }
    const src = this.topology.principals.get(request.source);
    const dst = this.topology.principals.get(request.destination);
    let connection: FlowConnection | null = null;
    const guardName = ev.rule?.guard ?? null;
    if (verdict === 'allow' && src && dst) {
      connection = Object.freeze({
        id: this.#nextId++, source: src.name, destination: dst.name, port: request.port, service: request.service ?? null,
        rule: ev.rule?.id ?? null, guard: guardName, sourceLabel: src.label, destinationLabel: dst.label,
      });
      const guard = guardName === null ? null : this.policy.guards.get(guardName) ?? null;
      const declass = guard?.declassify ?? [];
      const lat = this.policy.lattice && this.mode === 'enforce';
      this.#live.set(connection.id, {
        conn: connection, src, dst, guard, guardFn: guardName === null ? null : this.#guards.get(guardName) ?? null,
        forward: lat ? latticeRefusal(latticeGap(src.label, dst.label), declass, guardName) : null,
        reverse: lat ? latticeRefusal(latticeGap(dst.label, src.label), declass, guardName) : null,
      });
      this.stats.connectionsAllowed++;
    } else {
      this.stats.connectionsDenied++;
    }
    const decision: ConnectDecision = {
      verdict, request, connection, rule: ev.rule?.id ?? null, guard: guardName, trace: ev.trace, lattice: ev.lattice, asked, reason,
      ...(this.mode === 'learn' ? { wouldBe } : {}),
    };
    this.#log('flow:connect', verdict, reason, src?.name ?? request.source, dst?.name ?? request.destination, request.port, connection?.id ?? null, decision.rule, guardName, src?.label, dst?.label);
    // Time spent waiting for an `ask` answer is a person's, not the monitor's: not counted.
    this.#meter.connection(decision.rule, asked ? 0 : (performance.now() - t0) * 1e6);
    return decision;
  }

  /**
   * Decides one message on `connection` before its receiver sees it. Without a guard this is
   * synchronous; with one, it is as synchronous as the guard.
   */
  message(connection: FlowConnection | number, direction: FlowDirection, data: Uint8Array): MessageDecision | Promise<MessageDecision> {
    const t0 = performance.now();
    return this.#inspect(t0, this.#live.get(typeof connection === 'number' ? connection : connection.id), direction, data, 'message');
  }

  /**
   * Decides one L2 frame from port `source` to port `destination` before that port sees it (the
   * `FrameMediator` of `@tsvm/devices`' `VirtualSwitch`). A frame is a message on a *link*: the
   * first frame of a (source, destination, EtherType) triple is decided like a connection
   * request with `port` = EtherType and `service` = `ethernet` (audited as `flow:connect`, cached;
   * a rule without `service` covers frames too), every frame then like a message on it — the
   * link's guard inspects it and may drop or rewrite it — audited as `flow:frame` and priced in
   * its own cost class. Synchronous once the link is known and the guard is.
   */
  frame(request: FrameRequest): MessageDecision | Promise<MessageDecision> {
    const t0 = performance.now();
    const key = `${request.source}\n${request.destination}\n${request.ethertype}`;
    const link = this.#links.get(key);
    if (typeof link === 'number') return this.#inspect(t0, this.#live.get(link), 'forward', request.data, 'frame');
    if (typeof link === 'string') return this.#messageDone(t0, null, 'forward', request.data.length, { verdict: 'deny', guard: null, reason: link }, 'frame', request);
    const pending = link ?? this.#openLink(key, request);
    // The link decision is priced as a connection; the frame's own price starts once it is known
    // (otherwise the wait for the event loop would be billed to the first frame).
    return pending.then((id) => {
      const t1 = performance.now();
      return typeof id === 'number'
        ? this.#inspect(t1, this.#live.get(id), 'forward', request.data, 'frame')
        : this.#messageDone(t1, null, 'forward', request.data.length, { verdict: 'deny', guard: null, reason: id }, 'frame', request);
    });
  }

  #openLink(key: string, request: FrameRequest): Promise<number | string> {
    // Bounded: a guest cycling through EtherTypes must not grow the cache without end.
    if (this.#links.size >= MAX_LINKS) {
      const [oldKey, old] = this.#links.entries().next().value as [string, number | string | Promise<number | string>];
      this.#links.delete(oldKey);
      if (typeof old === 'number') this.#live.delete(old);
    }
    const p = this.connect({ source: request.source, destination: request.destination, port: request.ethertype, service: 'ethernet' }).then((d) => {
      const v = d.connection !== null ? d.connection.id : `link refused: ${d.reason}`;
      if (this.#links.get(key) === p) this.#links.set(key, v);
      return v;
    });
    this.#links.set(key, p);
    return p;
  }

  #inspect(t0: number, live: Live | undefined, direction: FlowDirection, data: Uint8Array, kind: 'message' | 'frame'): MessageDecision | Promise<MessageDecision> {
    if (live === undefined) return this.#messageDone(t0, null, direction, data.length, { verdict: 'deny', guard: null, reason: 'unknown or closed connection' }, kind);
    const fwd = direction === 'forward';
    const sender = fwd ? live.src : live.dst;
    const receiver = fwd ? live.dst : live.src;
    if (live.guardFn === null || live.guard === null) {
      const refusal = fwd ? live.forward : live.reverse;
      return this.#messageDone(t0, live, direction, data.length, refusal === null
        ? { verdict: 'allow', data, label: sender.label, declassified: [], rewritten: false, guard: null, reason: 'connection allowed' }
        : { verdict: 'deny', guard: null, reason: refusal }, kind);
    }
    this.stats.guardInspections++;
    const g = live.guard;
    const out = runGuard(live.guardFn, data, { guard: g.name, connection: live.conn.id, from: sender.name, to: receiver.name, label: sender.label, port: live.conn.port }, g.declassify, g.timeoutMs);
    return out instanceof Promise
      ? out.then((o) => this.#guarded(t0, live, direction, data, kind, o))
      : this.#guarded(t0, live, direction, data, kind, out);
  }

  /** The decision on a guarded message once its guard has spoken. */
  #guarded(t0: number, live: Live, direction: FlowDirection, data: Uint8Array, kind: 'message' | 'frame', o: GuardOutcome): MessageDecision {
    const g = live.guard as CompiledGuard;
    if (!o.ok) return this.#messageDone(t0, live, direction, data.length, { verdict: 'deny', guard: g.name, reason: o.reason }, kind);
    const fwd = direction === 'forward';
    const sender = fwd ? live.src : live.dst;
    const receiver = fwd ? live.dst : live.src;
    const lattice = this.policy.lattice && this.mode === 'enforce';
    let label: Label;
    let refusal: string | null;
    if (o.declassified.length === 0) {
      // The common case: nothing declassified, so label and lattice verdict are the connection's
      // own for this direction, computed once.
      label = sender.label;
      const key = fwd ? 'plainForward' : 'plainReverse';
      refusal = lattice ? (live[key] ??= latticeRefusal(latticeGap(label, receiver.label), [], null) ?? '') || null : null;
    } else {
      label = declassify(sender.label, o.declassified);
      refusal = lattice ? latticeRefusal(latticeGap(label, receiver.label), [], null) : null;
    }
    if (refusal !== null) return this.#messageDone(t0, live, direction, data.length, { verdict: 'deny', guard: g.name, reason: `guard '${g.name}' allowed, but ${refusal}` }, kind);
    const why = o.declassified.length === 0 && !o.rewritten ? (live.allowedWhy ??= `guard '${g.name}' allowed`)
      : `guard '${g.name}' ${o.rewritten ? 'rewrote' : 'allowed'}${o.declassified.length ? `, declassifying {${o.declassified.join(',')}}` : ''}`;
    return this.#messageDone(t0, live, direction, o.data.length, { verdict: 'allow', data: o.data, label, declassified: o.declassified, rewritten: o.rewritten, guard: g.name, reason: why }, kind);
  }

  /**
   * The router says which machine serves `connection` to a disposable endpoint (a fresh fork per
   * connection): audited as a `flow:disposable` line naming the instance, so the log shows which
   * fork saw the connection's messages.
   */
  served(connection: FlowConnection | number, instance: string): void {
    const c = this.#live.get(typeof connection === 'number' ? connection : connection.id)?.conn;
    if (c === undefined) return;
    this.#log('flow:disposable', 'allow', `served by disposable machine '${instance}'`, c.source, c.destination, c.port, c.id, c.rule, c.guard, undefined, undefined, undefined, undefined, instance);
  }

  /** Forgets a connection (its later messages are denied). Idempotent. */
  close(connection: FlowConnection | number): void {
    this.#live.delete(typeof connection === 'number' ? connection : connection.id);
  }

  /**
   * What mediation cost so far, per rule and guard (measured on every decision, audit logging
   * included), with cheaper alternatives.
   */
  costs(): FlowCostReport {
    const r = this.#meter.report();
    return this.#costModel ? withPredictions(r, this.#costModel, this.#logAll ? 'all' : 'denied') : r;
  }

  /** Connections currently open. */
  get openConnections(): number {
    return this.#live.size;
  }

  async #askUser(request: ConnectRequest, rule: string): Promise<{ ok: boolean; why: string }> {
    const ask = this.#ask;
    if (ask === undefined) return { ok: false, why: 'no ask callback: denied' };
    let timer: NodeJS.Timeout | undefined;
    try {
      const answer = await Promise.race([
        Promise.resolve().then(() => ask({ ...request }, rule)),
        new Promise<'timeout'>((r) => { timer = setTimeout(() => r('timeout'), this.#askTimeout); }),
      ]);
      if (answer === 'timeout') return { ok: false, why: `ask did not answer within ${this.#askTimeout} ms: denied` };
      if (answer === true) return { ok: true, why: 'ask allowed' };
      return { ok: false, why: answer === false ? 'ask denied' : `ask returned ${String(answer)}: denied` };
    } catch (e) {
      return { ok: false, why: `ask threw: ${e instanceof Error ? e.message : String(e)}: denied` };
    } finally {
      clearTimeout(timer);
    }
  }

  #messageDone(t0: number, live: Live | null | undefined, direction: FlowDirection, bytes: number, d: MessageDecision, kind: 'message' | 'frame' = 'message', link?: FrameRequest): MessageDecision {
    if (d.verdict === 'allow') {
      this.stats.messagesAllowed++;
      this.stats.bytesAllowed += bytes;
    } else {
      this.stats.messagesDenied++;
    }
    if (d.verdict === 'allow' && this.#logAll && live && d.declassified.length === 0 && this.#audit !== undefined && !decisionChannel.hasSubscribers) {
      this.#logPlain(live, direction, kind, d, bytes, this.#audit);
    } else if (d.verdict === 'deny' || this.#logAll) {
      const fwd = direction === 'forward';
      const c = live?.conn;
      const labelled = c !== undefined && (d.verdict === 'deny' || d.declassified.length > 0);
      this.#log(`flow:${kind}`, d.verdict, d.reason, c ? (fwd ? c.source : c.destination) : link?.source ?? '?', c ? (fwd ? c.destination : c.source) : link?.destination ?? '?', c?.port ?? link?.ethertype ?? -1, c?.id ?? null, c?.rule ?? null, d.guard,
        labelled ? (fwd ? c.sourceLabel : c.destinationLabel) : undefined, labelled ? (fwd ? c.destinationLabel : c.sourceLabel) : undefined,
        bytes, d.verdict === 'allow' && d.declassified.length ? d.declassified : undefined);
    }
    const ns = (performance.now() - t0) * 1e6;
    if (kind === 'frame') this.#meter.frame(live?.conn.rule ?? null, d.guard, bytes, ns);
    else this.#meter.message(live?.conn.rule ?? null, d.guard, bytes, ns);
    return d;
  }

  /**
   * The line of a plain allowed message or frame (the one written per message): the same bytes
   * `#log` would write, from the connection's template, so a message costs one string
   * concatenation and the chain's hash instead of building and stringifying the entry.
   */
  #logPlain(live: Live, direction: FlowDirection, kind: 'message' | 'frame', d: MessageDecision, bytes: number, audit: AuditLog): void {
    const fwd = direction === 'forward';
    let t = fwd ? live.lineForward : live.lineReverse;
    if (t === undefined || t.kind !== kind || t.reason !== d.reason || t.guard !== d.guard) {
      const c = live.conn;
      const from = fwd ? c.source : c.destination, to = fwd ? c.destination : c.source;
      const entry: FlowAuditEntry = {
        machine: from, vcpu: -1, rip: '-', event: `flow:${kind}`, address: `${to}:${c.port}`, hook: c.rule ?? (d.guard ? `guard:${d.guard}` : 'default'),
        decision: 'allow', reason: d.reason, exit: -1, flow: { connection: c.id, from, to, port: c.port, rule: c.rule, guard: d.guard, mode: this.mode },
      };
      const json = JSON.stringify(entry);
      // `bytes` goes before `,"mode":…}}` (the mode is fixed for the monitor's life).
      const at = json.lastIndexOf(',"mode":');
      t = { kind, reason: d.reason, guard: d.guard, head: json.slice(0, at), tail: json.slice(at) };
      if (fwd) live.lineForward = t; else live.lineReverse = t;
    }
    audit.appendJson(`${t.head},"bytes":${bytes}${t.tail}`, this.#now());
  }

  #now(): Date {
    const ms = Date.now();
    if (ms !== this.#date.getTime()) this.#date = new Date(ms);
    return this.#date;
  }

  #log(event: string, verdict: 'allow' | 'deny', reason: string, from: string, to: string, port: number, connection: number | null, rule: string | null, guard: string | null,
    fromLabel?: Label, toLabel?: Label, bytes?: number, declassified?: readonly string[], instance?: string): void {
    if (this.#audit === undefined && !decisionChannel.hasSubscribers) return;
    // A plain allowed message (the line written per message) gets one fixed-shape literal; the
    // rest add fields in the same order (spreads here cost ~1 µs a line between guest exits).
    let flow: FlowAuditEntry['flow'];
    if (fromLabel === undefined && declassified === undefined && instance === undefined) {
      flow = bytes === undefined ? { connection, from, to, port, rule, guard, mode: this.mode } : { connection, from, to, port, rule, guard, bytes, mode: this.mode };
    } else {
      const f: Record<string, unknown> = { connection, from, to, port, rule, guard };
      if (fromLabel !== undefined && toLabel !== undefined) { f['fromLabel'] = fromLabel; f['toLabel'] = toLabel; }
      if (bytes !== undefined) f['bytes'] = bytes;
      if (declassified !== undefined) f['declassified'] = declassified;
      if (instance !== undefined) f['instance'] = instance;
      f['mode'] = this.mode;
      flow = f as FlowAuditEntry['flow'];
    }
    // Flow decisions are not tied to a vCPU or an exit: vcpu and exit are -1, rip is '-'.
    const entry: FlowAuditEntry = {
      machine: from, vcpu: -1, rip: '-', event, address: `${to}:${port}`, hook: rule ?? (guard ? `guard:${guard}` : 'default'), decision: verdict, reason, exit: -1, flow,
    };
    this.#audit?.append(entry, this.#now());
    if (decisionChannel.hasSubscribers) decisionChannel.publish(entry);
  }
}
