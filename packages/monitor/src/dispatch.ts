/**
 * The monitor's two core hooks: one mediate dispatcher and one observe dispatcher. Each exit
 * is decoded into monitor events once, and the hooks that want it are found in a table keyed
 * by exit kind and address (port → records is memoised; MSR index → records is a map), so an
 * exit costs the same whether the monitor holds one hook or fifty that do not match.
 *
 * Mediate, in this order: the probe trap (exec hooks), guest-debug exits (exec/step), stores
 * to write-watched pages, then the user's mediate hooks in registration order (first non-allow
 * wins). An explicit `allow` goes back to core, whose defaults then apply: the device, an MSR
 * passed through to the vCPU, a store written through to watched RAM. Deny by default is
 * core's, so a machine stops the same way with or without a monitor.
 *
 * Observe: a late (coalesced) write to a mediated range means mediation was bypassed — that
 * stops the machine; then the user's observe hooks; then probes waiting to be re-armed.
 * @module
 */
import type { ExitHook, HookDecision, HookInfo, VcpuExit } from '@tsvm/core';
import { HookFailure, describeExit } from '@tsvm/core';
import { MediationBypassError } from './errors.js';
import { eventOf, type MonitorEvent } from './events.js';
import { callObserve, hookContext, runMediators, type HookRecord } from './records.js';
import type { Decision } from './decisions.js';
import { PROBE_PORT } from './probe.js';
import type { InternalEnv } from './internal-hooks.js';

const ALLOW: HookDecision = { verdict: 'allow' };
const RESUME: HookDecision = { verdict: 'emulate', value: 0 };

/** The hooks of one mode, by exit kind. */
class Table {
  readonly io: HookRecord[] = [];
  readonly mmio: HookRecord[] = [];
  readonly msr = new Map<number, HookRecord[]>();
  readonly hlt: HookRecord[] = [];
  readonly shutdown: HookRecord[] = [];
  readonly any: HookRecord[] = [];
  readonly #ports = new Map<number, HookRecord[]>();
  /** Per port × direction × probe-port skip: the matching records, computed once (no array per exit). */
  readonly #io = new Map<number, readonly HookRecord[]>();
  size = 0;

  add(r: HookRecord): void {
    const s = r.spec;
    switch (s.event) {
      case 'pio': case 'hypercall': this.io.push(r); break;
      case 'mmio': this.mmio.push(r); break;
      case 'msr': for (const i of s.indices) { const l = this.msr.get(i) ?? []; l.push(r); this.msr.set(i, l); } break;
      case 'halt': this.hlt.push(r); break;
      case 'shutdown': this.shutdown.push(r); break;
      case 'any-exit': this.any.push(r); break;
      default: return; // exec, step, write-watch, cpuid: delivered by their mechanisms
    }
    this.size++;
  }

  /** Records on `port` (pio ranges and hypercall ports), memoised per port. */
  port(port: number): readonly HookRecord[] {
    let l = this.#ports.get(port);
    if (!l) {
      const p = BigInt(port);
      l = this.io.filter((r) => (r.spec.event === 'pio' ? r.spec.lo <= p && p <= r.spec.hi : r.spec.event === 'hypercall' && r.spec.port === port));
      this.#ports.set(port, l);
    }
    return l;
  }

  /** The records that want `exit`, in registration order (shared arrays: do not modify). */
  match(exit: VcpuExit, skipPioOnProbePort: boolean): readonly HookRecord[] {
    let own: readonly HookRecord[];
    switch (exit.kind) {
      case 'io': {
        const key = exit.port * 4 + (exit.direction === 'out' ? 2 : 0) + (skipPioOnProbePort ? 1 : 0);
        let l = this.#io.get(key);
        if (l === undefined) {
          l = this.port(exit.port).filter((r) => (r.spec.event === 'pio'
            ? !skipPioOnProbePort && (r.spec.dir === 'both' || r.spec.dir === exit.direction)
            : exit.direction === 'out'));
          if (this.any.length > 0) l = [...l, ...this.any].sort((a, b) => a.id - b.id);
          this.#io.set(key, l);
        }
        return l;
      }
      case 'mmio': {
        const dir = exit.isWrite ? 'write' : 'read';
        own = this.mmio.filter((r) => r.spec.event === 'mmio' && r.spec.lo <= exit.address && exit.address <= r.spec.hi && (r.spec.dir === 'both' || r.spec.dir === dir));
        break;
      }
      case 'msr': own = (this.msr.get(exit.index) ?? []).filter((r) => r.spec.event === 'msr' && (r.spec.dir === 'both' || r.spec.dir === exit.direction)); break;
      case 'hlt': own = this.hlt; break;
      case 'shutdown': own = this.shutdown; break;
      default: own = [];
    }
    if (this.any.length === 0 || exit.kind === 'intr') return own;
    return [...own, ...this.any].sort((a, b) => a.id - b.id);
  }
}

/**
 * The monitor events of one exit for `recs`: one event when they all want the same kind (the
 * common case), else one per record; each kind decoded once, whatever the number of hooks.
 */
function eventsOf(exit: VcpuExit, recs: readonly HookRecord[]): MonitorEvent | MonitorEvent[] {
  const first = recs[0] as HookRecord;
  const ev = eventOf(first.spec, exit) as MonitorEvent;
  let mixed = false;
  for (let i = 1; i < recs.length; i++) if ((recs[i] as HookRecord).spec.event !== first.spec.event) { mixed = true; break; }
  if (!mixed) return ev;
  // Every spec of one event kind decodes a matched exit to the same event.
  const byKind = new Map<string, MonitorEvent>([[first.spec.event, ev]]);
  return recs.map((r) => {
    let e = byKind.get(r.spec.event);
    if (!e) { e = eventOf(r.spec, exit) as MonitorEvent; byKind.set(r.spec.event, e); }
    return e;
  });
}

/** Whether `recs` holds a hypercall hook (only a port exit can match one). */
function hasHypercall(recs: readonly HookRecord[]): boolean {
  for (let i = 0; i < recs.length; i++) if ((recs[i] as HookRecord).spec.event === 'hypercall') return true;
  return false;
}

const finishAllowed = (d: Decision): HookDecision => (d.verdict !== 'allow' ? d : ALLOW);
const finishHypercall = (d: Decision): HookDecision => (d.verdict !== 'allow' ? d : RESUME);

/** The internal handlers the dispatchers route to (from `internal-hooks.ts`). */
export interface InternalHandlers {
  /** Probe traps (`out` to the probe port). */
  readonly probe: ExitHook;
  /** Guest-debug exits. */
  readonly debug: ExitHook;
  /** Stores to write-watched pages. */
  readonly watch: ExitHook;
}

/** Builds the tables from the live records and hands core the two hooks that use them. */
export class Dispatcher {
  readonly #env: InternalEnv;
  readonly #internal: InternalHandlers;
  #mediate = new Table();
  #observe = new Table();
  #debugWanted = false;
  readonly #guard: boolean;

  /** The one mediate hook. */
  readonly mediateHook: ExitHook;
  /** The one observe hook. */
  readonly observeHook: ExitHook;

  /**
   * @param env - the monitor's live view; @param internal - the mechanism handlers;
   * @param options - `guard`: stop on a late write to a mediated range.
   */
  constructor(env: InternalEnv, internal: InternalHandlers, options: { readonly guard: boolean }) {
    this.#env = env;
    this.#internal = internal;
    this.#guard = options.guard;
    this.mediateHook = { name: 'monitor:mediate', mode: 'mediate', matches: (e) => this.#mediateMatches(e), handle: (e, i) => this.#mediate_(e, i) };
    this.observeHook = { name: 'monitor:observe', mode: 'observe', matches: (e) => this.#observeMatches(e), handle: (e, i) => this.#observe_(e, i) };
    this.rebuild();
  }

  /** Re-reads the records (after a registration or removal): set-up time, not per exit. */
  rebuild(): void {
    this.#mediate = new Table();
    this.#observe = new Table();
    for (const r of this.#env.records()) (r.mode === 'mediate' ? this.#mediate : this.#observe).add(r);
    this.#debugWanted = this.#env.records().some((r) => r.spec.event === 'exec' || r.spec.event === 'step');
  }

  #probeTrap(exit: VcpuExit): boolean {
    return exit.kind === 'io' && exit.port === PROBE_PORT && exit.direction === 'out' && this.#env.probe() !== undefined;
  }

  #mediateMatches(exit: VcpuExit): boolean {
    switch (exit.kind) {
      case 'io': return this.#mediate.size > 0 || this.#probeTrap(exit);
      case 'mmio': return this.#mediate.size > 0 || (exit.isWrite && this.#internal.watch.matches(exit));
      case 'debug': return this.#debugWanted;
      case 'msr': return this.#mediate.size > 0 || this.#observe.msr.has(exit.index);
      case 'intr': return false;
      default: return this.#mediate.size > 0;
    }
  }

  #mediate_(exit: VcpuExit, info: HookInfo): HookDecision | Promise<HookDecision> {
    const probe = this.#probeTrap(exit);
    if (probe) {
      const d = this.#internal.probe.handle(exit, info);
      if (d !== undefined) return d as HookDecision | Promise<HookDecision>;
    }
    if (exit.kind === 'debug') return (this.#internal.debug.handle(exit, info) ?? undefined) as HookDecision | Promise<HookDecision>;
    if (exit.kind === 'mmio' && exit.isWrite && this.#internal.watch.matches(exit)) {
      return (this.#internal.watch.handle(exit, info) ?? undefined) as HookDecision | Promise<HookDecision>;
    }
    const recs = this.#mediate.match(exit, probe);
    // An MSR the monitor intercepts only to observe it still happens: allow it explicitly.
    if (recs.length === 0) return exit.kind === 'msr' ? ALLOW : undefined;
    // An allowed hypercall is complete: the monitor is the device behind the hypercall port.
    const finish = exit.kind === 'io' && hasHypercall(recs) ? finishHypercall : finishAllowed;
    const d = runMediators(this.#env, recs, eventsOf(exit, recs), exit, info);
    return d instanceof Promise ? d.then(finish) : finish(d);
  }

  #observeMatches(exit: VcpuExit): boolean {
    if (exit.kind === 'intr') return false;
    return this.#observe.size > 0 || ((exit.kind === 'io' || exit.kind === 'mmio') && exit.late === true) || this.#lazyProbes();
  }

  #lazyProbes(): boolean {
    return (this.#env.probe()?.hasLazy ?? false) || (this.#env.int3()?.hasLazy ?? false);
  }

  #observe_(exit: VcpuExit, info: HookInfo): void {
    if (this.#guard && (exit.kind === 'io' || exit.kind === 'mmio') && exit.late) {
      const rec = this.#mediate.match(exit, false).find((r) => r.spec.event !== 'any-exit');
      if (rec) throw new HookFailure('monitor:mediation-guard', new MediationBypassError(`${describeExit(exit)} reached the device without passing mediate hook '${rec.name}' (a coalesced zone covers a mediated range?)`));
    }
    if (this.#observe.size > 0) {
      const recs = this.#observe.match(exit, this.#probeTrap(exit));
      if (recs.length > 0) {
        const ev = eventsOf(exit, recs);
        const ctx = hookContext(this.#env.machine, exit, info);
        for (let i = 0; i < recs.length; i++) callObserve(recs[i] as HookRecord, Array.isArray(ev) ? (ev[i] as MonitorEvent) : ev, ctx);
      }
    }
    if (this.#lazyProbes()) {
      this.#env.probe()?.rearmLazy(info.seq);
      this.#env.int3()?.rearmLazy(info.seq);
    }
  }
}
