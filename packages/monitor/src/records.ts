/**
 * A registered hook as the monitor keeps it, and the decision pipeline every mediate call goes
 * through: time the function, accept sync or async results, validate the decision, audit it,
 * publish it on `diagnostics_channel`, and explain denies (RIP + disassembly).
 * @module
 */
import { HookFailure, checkDecision as checkCoreDecision, type HookDecision, type HookInfo, type Machine, type VcpuExit } from '@tsvm/core';
import { decisionChannel, type AuditLog } from './audit.js';
import type { Decision, HookContext, MediateFn, ObserveFn } from './decisions.js';
import { formatInstruction, formatInstructionAt } from './decode.js';
import type { MonitorEvent, NormalSpec } from './events.js';
import type { Selection } from './mechanisms.js';
import type { Cpl } from './calibration/table.js';
import { bitnessOf, linearRip, translateVirtual } from '@tsvm/core';

/** A hook registered with a monitor. */
export interface HookRecord {
  /** Registration number. */
  readonly id: number;
  /** Name (reports, audit lines, errors). */
  readonly name: string;
  /** Mediate or observe. */
  readonly mode: 'mediate' | 'observe';
  /** The event it wants. */
  readonly spec: NormalSpec;
  /** The user function. */
  readonly fn: MediateFn | ObserveFn;
  /** CPL the mechanism was chosen for. */
  readonly cpl: Cpl;
  /** Chosen mechanism (observe pio/mmio may change when hooks or devices change). */
  selection: Selection;
  /** Events delivered. */
  events: number;
  /** Elements those events covered (string I/O: the exit's `count`). */
  elements: number;
  /** Nanoseconds inside the user function: timed on one call in 8 and scaled to all calls. */
  handlerNs: number;
  /** Calls that were timed. */
  timedCalls: number;
  /** Nanoseconds of the timed calls. */
  timedNs: number;
  /** Mediate decisions by verdict (tells the cost report whether observing would have done). */
  readonly verdicts: { allow: number; deny: number; emulate: number };
  /** Hardware breakpoint slot, for exec hooks on debug registers. */
  hwSlot?: number;
}

/** What the pipeline needs from the monitor. */
export interface PipelineEnv {
  /** The machine. */
  readonly machine: Machine;
  /** The audit log, if any. */
  readonly audit: AuditLog | undefined;
}

const ALLOW: Decision = { verdict: 'allow' };

/** The context handed to hook functions (a class, not a literal with a closure: one per exit). */
class ExitHookContext implements HookContext {
  readonly vcpu: number;
  readonly seq: number;
  constructor(readonly machine: Machine, readonly exit: VcpuExit | undefined, readonly info: HookInfo | undefined) {
    this.vcpu = info?.vcpu ?? 0;
    this.seq = info?.seq ?? 0;
  }

  rip(): bigint {
    return this.info ? this.info.instructionRip() : this.machine.vcpu(this.vcpu).getRegs().rip;
  }
}

/** Builds the context handed to hook functions. */
export function hookContext(machine: Machine, exit: VcpuExit | undefined, info: HookInfo | undefined): HookContext {
  return new ExitHookContext(machine, exit, info);
}

// Sampled events have no exit; their emulate value (if any) is checked as a 64-bit one.
const NO_EXIT: VcpuExit = { kind: 'unsupported', reason: 0 };

/** Core's check (shape, verdict, effect, value range for this exit): throws InvalidArgumentError. */
function checkDecision(d: unknown, exit: VcpuExit | undefined): Decision {
  return checkCoreDecision(exit ?? NO_EXIT, d) ?? ALLOW;
}

function eventAddress(ev: MonitorEvent): bigint | number | undefined {
  switch (ev.event) {
    case 'pio': return ev.port;
    case 'mmio': case 'write-watch': case 'exec': return ev.address;
    case 'msr': return ev.index;
    case 'hypercall': return ev.port;
    case 'step': return ev.rip;
    default: return undefined;
  }
}

/** Where the guest is, with the instruction, for deny messages: `RIP 0x1004: out dx,al [ee]`. */
export function whereIs(machine: Machine, info: HookInfo | undefined, at?: bigint, code?: Uint8Array): string {
  try {
    const vcpu = machine.vcpu(info?.vcpu ?? 0);
    // Exec events know their instruction (RIP may already point at a probe trampoline); any
    // other exit's instruction comes from core's helper, right on every flavour.
    const rip = at ?? (info ? info.instructionRip() : vcpu.getRegs().rip);
    const sregs = vcpu.getSregs();
    const bits = bitnessOf(sregs);
    // An exec event brings its instruction's bytes: guest RAM there may hold the probe's trap.
    if (code !== undefined) return `RIP ${formatInstruction(code, rip, bits)}`;
    const pa = translateVirtual(machine.memory, sregs, linearRip(sregs, rip));
    if (pa === undefined) return `RIP 0x${rip.toString(16)} (code not mapped)`;
    return `RIP ${formatInstructionAt(machine.memory, rip, bits, { physical: pa })}`;
  } catch {
    return 'RIP unavailable';
  }
}

/**
 * Finishes one mediate decision: validates, explains a deny, audits and publishes it.
 * @returns the decision for core.
 */
export function settle(env: PipelineEnv, rec: HookRecord, ev: MonitorEvent, raw: unknown, exit: VcpuExit | undefined, info: HookInfo | undefined): Decision {
  let d: Decision;
  try {
    d = checkDecision(raw, exit);
  } catch (e) {
    throw new HookFailure(rec.name, e);
  }
  rec.verdicts[d.verdict]++;
  if (d.verdict === 'deny') d = { ...d, reason: `${d.reason ?? 'denied'} — ${whereIs(env.machine, info, ev.event === 'exec' ? ev.rip : undefined, ev.event === 'exec' ? ev.code : undefined)}` };
  if (env.audit || decisionChannel.hasSubscribers) {
    const addr = eventAddress(ev);
    const entry = {
      machine: env.machine.name, vcpu: info?.vcpu ?? 0, rip: `0x${(info ? (ev.event === 'exec' ? ev.rip : info.instructionRip()) : 0n).toString(16)}`, event: ev.event,
      address: addr === undefined ? null : `0x${addr.toString(16)}`, hook: rec.name, decision: d.verdict,
      ...(d.verdict === 'deny' ? { effect: d.effect ?? 'stop', ...(d.reason ? { reason: d.reason } : {}) } : {}),
      ...(d.verdict === 'emulate' ? { value: `0x${BigInt(d.value).toString(16)}` } : {}),
      ...(ev.event === 'pio' && ev.count > 1 ? { count: ev.count } : {}),
      exit: info?.seq ?? 0,
      ...(ev.event === 'write-watch' && ev.source === 'dma' ? { source: 'dma' as const, ...(ev.device === undefined ? {} : { device: ev.device }), length: ev.size } : {}),
    };
    env.audit?.append(entry);
    if (decisionChannel.hasSubscribers) decisionChannel.publish(entry);
  }
  return d;
}

/**
 * Calls one mediate function with timing; returns its raw result (maybe a Promise, whose
 * rejection becomes a {@link HookFailure} naming the hook). A throw becomes one too, so core's
 * `hook-error` stop names the user's hook rather than the monitor's dispatcher.
 */
function callMediate(rec: HookRecord, ev: MonitorEvent, ctx: HookContext): unknown {
  const timed = startCall(rec, ev);
  const t0 = timed ? performance.now() : 0;
  try {
    const raw = (rec.fn as MediateFn)(ev, ctx);
    return raw instanceof Promise ? raw.catch((e: unknown) => { throw new HookFailure(rec.name, e); }) : raw;
  } catch (e) {
    throw new HookFailure(rec.name, e);
  } finally {
    if (timed) endTimedCall(rec, t0);
  }
}

/** One call in this many is timed: two clock reads per event would cost more than many hooks. */
const TIME_EVERY = 8;

/** Counts a call; says whether to time it (the first, the ninth, …). */
function startCall(rec: HookRecord, ev: MonitorEvent): boolean {
  rec.elements += ev.event === 'pio' ? ev.count : 1;
  const timed = rec.events % TIME_EVERY === 0;
  rec.events++;
  if (!timed && rec.timedCalls > 0) rec.handlerNs = (rec.timedNs * rec.events) / rec.timedCalls;
  return timed;
}

function endTimedCall(rec: HookRecord, t0: number): void {
  rec.timedCalls++;
  rec.timedNs += (performance.now() - t0) * 1e6;
  rec.handlerNs = (rec.timedNs * rec.events) / rec.timedCalls;
}

/** Calls one observe function with timing; a throw becomes a {@link HookFailure} naming the hook. */
export function callObserve(rec: HookRecord, ev: MonitorEvent, ctx: HookContext): void {
  const timed = startCall(rec, ev);
  const t0 = timed ? performance.now() : 0;
  try {
    (rec.fn as ObserveFn)(ev, ctx);
  } catch (e) {
    throw new HookFailure(rec.name, e);
  } finally {
    if (timed) endTimedCall(rec, t0);
  }
}

/**
 * Runs mediate hooks in order: the first non-allow decision wins. Synchronous unless a hook
 * returns a Promise, then the rest run after it settles. Throws propagate (core turns them
 * into a `hook-error` stop with the error as cause).
 */
export function runMediators(env: PipelineEnv, recs: readonly HookRecord[], ev: MonitorEvent | readonly MonitorEvent[], exit: VcpuExit | undefined, info: HookInfo | undefined, from = 0): Decision | Promise<Decision> {
  const ctx = hookContext(env.machine, exit, info);
  for (let i = from; i < recs.length; i++) {
    const rec = recs[i] as HookRecord;
    // One event for all, or one per hook (an exit can be a `pio` and a `hypercall` event).
    const e = Array.isArray(ev) ? (ev[i] as MonitorEvent) : (ev as MonitorEvent);
    const raw = callMediate(rec, e, ctx);
    if (raw instanceof Promise) {
      return raw.then((r) => {
        const d = settle(env, rec, e, r, exit, info);
        return d.verdict !== 'allow' ? d : runMediators(env, recs, ev, exit, info, i + 1);
      });
    }
    const d = settle(env, rec, e, raw, exit, info);
    if (d.verdict !== 'allow') return d;
  }
  return ALLOW;
}

/** Applies `f` to a maybe-async decision. */
export function thenDecision(d: Decision | Promise<Decision>, f: (d: Decision) => HookDecision): HookDecision | Promise<HookDecision> {
  return d instanceof Promise ? d.then(f) : f(d);
}
