/**
 * The data path of one exit, as a pure function of its inputs so tests can call it with
 * fabricated exits: mediate hooks → device (only if no hook denied or emulated) → observe hooks
 * → deny by default. Guest-controlled data never throws out of here: device and hook failures
 * become stop requests.
 * @module
 */
import type { Bus, BusEntry } from './bus.js';
import type { Access, AccessSize, DeviceStopRequest } from './device.js';
import { describeExit, emulationFailure, exitValue, type InternalErrorExit, type IoExit, type MmioExit, type VcpuExit } from './exits.js';
import type { ExitHook, HookDecision, HookInfo, HookStats } from './hooks.js';
import { HookFailure, InvalidArgumentError, MonitorViolation, TsvmError } from './errors.js';
import { show } from './check.js';
import type { StopRequest } from './stop.js';
import type { GuestMemory } from './memory.js';

/** The vCPU's MSRs, as core's MSR pass-through reaches them. */
export interface MsrAccess {
  /** Reads MSR `index` (`KVM_GET_MSRS`). */
  read(index: number): bigint;
  /** Writes MSR `index` (`KVM_SET_MSRS`). */
  write(index: number, data: bigint): void;
}

/** Everything {@link handleExit} needs. */
export interface ExitContext {
  /** Port-I/O bus. */
  readonly pio: Bus;
  /** MMIO bus. */
  readonly mmio: Bus;
  /** Mediate hooks in registration order. */
  readonly mediate: readonly ExitHook[];
  /** Observe hooks. */
  readonly observe: readonly ExitHook[];
  /** Per-hook counters (updated in place). */
  readonly hookStats?: Map<ExitHook, HookStats>;
  /** Facts for hooks. */
  readonly info: HookInfo;
  /** Guest RAM: an allowed store to a read-only region (a write-watched page) is written through. */
  readonly memory?: GuestMemory;
  /** The vCPU's MSRs: an allowed intercepted `rdmsr`/`wrmsr` passes through to them. */
  readonly msrs?: MsrAccess;
  /** Adds an explanation (e.g. the instruction at RIP) to an unhandled-exit stop. */
  readonly explain?: (exit: VcpuExit, info: HookInfo) => string | undefined;
}

/** What the run loop must do after an exit. */
export type ExitOutcome =
  /** Resume the guest; `read` completes an `in`/MMIO read, `msr` an MSR exit. */
  | { readonly action: 'resume'; readonly read?: Uint8Array; readonly msr?: { readonly data: bigint; readonly error: boolean } }
  /** Stop the machine. */
  | { readonly action: 'stop'; readonly stop: StopRequest }
  /** Abandon the access and raise exception `vector` on the instruction that made it (`#GP` for a denied port or MMIO access). */
  | { readonly action: 'fault'; readonly vector: number; readonly errorCode?: number }
  /** A mediate hook returned a Promise: await this for the real outcome. */
  | { readonly action: 'async'; readonly outcome: Promise<ExitOutcome> };

const now = (): number => performance.now();

/** The outcome of most exits (a write a device took): one shared frozen object, not one per exit. */
const RESUME: ExitOutcome = Object.freeze({ action: 'resume' });

/** A `hook-error` stop; a {@link HookFailure} names the user hook behind a dispatcher. */
function hookError(hook: ExitHook, error: unknown): ExitOutcome {
  return error instanceof HookFailure
    ? { action: 'stop', stop: { reason: 'hook-error', hook: error.hook, error: error.cause } }
    : { action: 'stop', stop: { reason: 'hook-error', hook: hook.name, error } };
}

/** One call in this many is timed (see `HookStats.ns`). */
const TIME_EVERY = 8;

function timed(hook: ExitHook, ctx: ExitContext, exit: VcpuExit): HookDecision | Promise<HookDecision> | void {
  const st = ctx.hookStats;
  if (!st) return hook.handle(exit, ctx.info);
  let s = st.get(hook);
  if (s === undefined) { s = { calls: 0, elements: 0, ns: 0, timedCalls: 0, timedNs: 0 }; st.set(hook, s); }
  s.elements += exit.kind === 'io' ? exit.count : 1;
  if (s.calls++ % TIME_EVERY !== 0) {
    s.ns = (s.timedNs * s.calls) / s.timedCalls;
    return hook.handle(exit, ctx.info);
  }
  const t0 = now();
  try {
    return hook.handle(exit, ctx.info);
  } finally {
    s.timedCalls++;
    s.timedNs += (now() - t0) * 1e6;
    s.ns = (s.timedNs * s.calls) / s.timedCalls;
  }
}

function exitAddress(exit: VcpuExit): bigint | undefined {
  switch (exit.kind) {
    case 'io': return BigInt(exit.port);
    case 'mmio': return exit.address;
    case 'msr': return BigInt(exit.index);
    case 'debug': return exit.pc;
    default: return undefined;
  }
}

function ones(size: number, count = 1): Uint8Array {
  return new Uint8Array(size * count).fill(0xff);
}

function le(value: number | bigint, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let v = BigInt.asUintN(64, BigInt(value));
  for (let i = 0; i < bytes; i++) { out[i] = Number(v & 0xffn); v >>= 8n; }
  return out;
}

/**
 * Handles one exit. Returns what the loop must do; never throws for guest-controlled input.
 */
export function handleExit(exit: VcpuExit, ctx: ExitContext): ExitOutcome {
  return handleFrom(exit, ctx, false);
}

/** {@link handleExit} after some mediate hooks already ran (`allowed`: one of them explicitly allowed). */
function handleFrom(exit: VcpuExit, ctx: ExitContext, allowed: boolean): ExitOutcome {
  // 1. Mediate hooks, in order. First deny wins; emulate supplies the value; an explicit
  //    allow lets core's defaults (MSR pass-through, write-through to watched RAM) apply.
  for (let i = 0; i < ctx.mediate.length; i++) {
    const hook = ctx.mediate[i] as ExitHook;
    let d: HookDecision | Promise<HookDecision> | void;
    try {
      if (!hook.matches(exit)) continue;
      d = timed(hook, ctx, exit);
    } catch (error) {
      return hookError(hook, error);
    }
    // The two common answers skip the generic path below (thenable test, validation, applying):
    // no decision, and a plain allow (an object with a `then` method is a thenable, never this).
    if (d === undefined) continue;
    if (typeof d === 'object' && d !== null && (d as { verdict?: unknown }).verdict === 'allow' && typeof (d as { then?: unknown }).then !== 'function') {
      allowed = true;
      continue;
    }
    if (isThenable(d)) {
      const rest = ctx.mediate.slice(i + 1);
      return {
        action: 'async',
        outcome: Promise.resolve(d).then(
          (dec) => {
            const out = decide(exit, ctx, hook, dec);
            if (out) return out;
            // A later async hook yields another 'async' outcome: flatten it so the loop
            // never receives one it would mistake for "resume".
            const next = handleFrom(exit, { ...ctx, mediate: rest }, allowed || (dec as HookDecision)?.verdict === 'allow');
            return next.action === 'async' ? next.outcome : next;
          },
          (error: unknown) => hookError(hook, error),
        ),
      };
    }
    const out = decide(exit, ctx, hook, d);
    if (out) return out;
    if (d?.verdict === 'allow') allowed = true;
  }
  // 2. The device / default handling.
  const out = dispatch(exit, ctx, allowed);
  // 3. Observe hooks: they cannot change the outcome, but a throwing observer stops the machine.
  return observe(exit, ctx, out);
}

function observe(exit: VcpuExit, ctx: ExitContext, out: ExitOutcome): ExitOutcome {
  for (const hook of ctx.observe) {
    try {
      if (!hook.matches(exit)) continue;
      timed(hook, ctx, exit);
    } catch (error) {
      return hookError(hook, error);
    }
  }
  return out;
}

/** A Promise, or any thenable (another realm's Promise, a library's): awaited the same way. */
function isThenable(d: unknown): d is PromiseLike<HookDecision> {
  return d instanceof Promise || (typeof d === 'object' && d !== null && typeof (d as { then?: unknown }).then === 'function');
}

/** Validates a hook's decision, then applies it; a malformed one becomes that hook's `hook-error`. */
function decide(exit: VcpuExit, ctx: ExitContext, hook: ExitHook, d: unknown): ExitOutcome | undefined {
  let checked: HookDecision;
  try {
    checked = checkDecision(exit, d);
  } catch (error) {
    return hookError(hook, error);
  }
  return applyDecision(exit, ctx, hook, checked);
}

const EFFECTS: readonly unknown[] = ['stop', 'ignore', 'gp'];

/** Width in bits of the value an `emulate` decision supplies for `exit`. */
function emulateBits(exit: VcpuExit): number {
  switch (exit.kind) {
    case 'io': return exit.size * 8;
    case 'mmio': return Math.min(exit.size, 8) * 8;
    default: return 64; // MSRs; other kinds ignore the value but it must still be a valid u64
  }
}

/**
 * Checks that `d` is a well-formed {@link HookDecision} for `exit`: a known verdict, a known deny
 * effect, and an `emulate` value that is an integer fitting the access (`in` of 1 byte: 0..0xff,
 * MSR: 64 bits). Out-of-range values are refused rather than silently truncated.
 * @throws InvalidArgumentError naming the offending field.
 */
export function checkDecision(exit: VcpuExit, d: unknown): HookDecision {
  if (d === undefined || d === null) return undefined;
  if (typeof d !== 'object') throw new InvalidArgumentError('decision', `must be allow(), deny() or emulate(value), got ${typeof d}`);
  const verdict = (d as { verdict?: unknown }).verdict;
  if (verdict === 'allow') return d as HookDecision;
  if (verdict === 'deny') {
    const { effect, reason } = d as { effect?: unknown; reason?: unknown };
    if (effect !== undefined && !EFFECTS.includes(effect)) throw new InvalidArgumentError('decision.effect', `must be 'stop', 'ignore' or 'gp', got ${show(effect)}`);
    if (reason !== undefined && typeof reason !== 'string') throw new InvalidArgumentError('decision.reason', `must be a string, got ${typeof reason}`);
    return d as HookDecision;
  }
  if (verdict !== 'emulate') throw new InvalidArgumentError('decision.verdict', `must be 'allow', 'deny' or 'emulate', got ${show(verdict)}`);
  const value = (d as { value?: unknown }).value;
  const bits = emulateBits(exit);
  const max = (1n << BigInt(bits)) - 1n;
  let v: bigint;
  if (typeof value === 'bigint') v = value;
  else if (typeof value === 'number' && Number.isInteger(value)) v = BigInt(value);
  else throw new InvalidArgumentError('decision.value', `emulate() for ${describeExit(exit)} needs an integer, got ${show(value)}`);
  if (v < 0n || v > max) throw new InvalidArgumentError('decision.value', `emulate(${show(value)}) for ${describeExit(exit)} is outside 0..0x${max.toString(16)}`);
  return d as HookDecision;
}


function applyDecision(exit: VcpuExit, ctx: ExitContext, hook: ExitHook, d: HookDecision): ExitOutcome | undefined {
  if (!d || d.verdict === 'allow') return undefined;
  if (d.verdict === 'deny') {
    const effect = d.effect ?? 'stop';
    if (effect === 'ignore' && (exit.kind === 'io' || exit.kind === 'mmio')) {
      return observe(exit, ctx, exit.kind === 'io'
        ? { action: 'resume', ...(exit.direction === 'in' ? { read: ones(exit.size, exit.count) } : {}) }
        : { action: 'resume', ...(!exit.isWrite ? { read: ones(exit.size) } : {}) });
    }
    if (effect === 'gp' && (exit.kind === 'io' || exit.kind === 'mmio')) {
      return observe(exit, ctx, { action: 'fault', vector: 13, errorCode: 0 });
    }
    if ((effect === 'gp' || effect === 'ignore') && exit.kind === 'msr') {
      return observe(exit, ctx, { action: 'resume', msr: { data: effect === 'ignore' ? 0n : 0n, error: effect === 'gp' } });
    }
    const address = exitAddress(exit);
    let rip: bigint | undefined;
    try { rip = ctx.info.instructionRip(); } catch { /* registers unavailable: leave it out */ }
    const violation = new MonitorViolation(exit.kind, `${describeExit(exit)} denied by hook '${hook.name}'${d.reason ? `: ${d.reason}` : ''}`, {
      ...(address !== undefined ? { address } : {}),
      ...(rip !== undefined ? { rip } : {}),
    });
    return { action: 'stop', stop: { reason: 'violation', violation } };
  }
  // emulate
  switch (exit.kind) {
    case 'io': return observe(exit, ctx, { action: 'resume', ...(exit.direction === 'in' ? { read: repeat(le(d.value, exit.size), exit.count) } : {}) });
    case 'mmio': return observe(exit, ctx, { action: 'resume', ...(!exit.isWrite ? { read: le(d.value, 8) } : {}) });
    case 'msr': return observe(exit, ctx, { action: 'resume', msr: { data: BigInt(d.value), error: false } });
    default: return observe(exit, ctx, { action: 'resume' });
  }
}

function repeat(unit: Uint8Array, count: number): Uint8Array {
  if (count === 1) return unit;
  const out = new Uint8Array(unit.length * count);
  for (let i = 0; i < count; i++) out.set(unit, i * unit.length);
  return out;
}

function unhandled(exit: VcpuExit, why: string, ctx?: ExitContext): ExitOutcome {
  let extra: string | undefined;
  try { extra = ctx?.explain?.(exit, ctx.info); } catch { /* an explanation is optional */ }
  return { action: 'stop', stop: { reason: 'unhandled-exit', kind: exit.kind, address: exitAddress(exit), exit, message: `${describeExit(exit)}: ${why}${extra ? ` — ${extra}` : ''}` } };
}

/** An intercepted MSR access a mediate hook explicitly allowed: it happens on the vCPU. */
function passMsr(exit: Extract<VcpuExit, { kind: 'msr' }>, ctx: ExitContext): ExitOutcome {
  const msrs = ctx.msrs;
  if (!msrs) return unhandled(exit, 'allowed, but this context cannot reach the vCPU\'s MSRs', ctx);
  try {
    if (exit.direction === 'write') { msrs.write(exit.index, exit.data); return { action: 'resume', msr: { data: 0n, error: false } }; }
    return { action: 'resume', msr: { data: msrs.read(exit.index), error: false } };
  } catch {
    // KVM refused the MSR: what hardware does for an MSR it does not have.
    return { action: 'resume', msr: { data: 0n, error: true } };
  }
}

/** A guest store to read-only RAM (a write-watched page) that a mediate hook explicitly allowed. */
function writeThrough(exit: MmioExit, ctx: ExitContext): ExitOutcome | undefined {
  const mem = ctx.memory;
  if (!exit.isWrite || !mem || !mem.contains(exit.address, exit.size)) return undefined;
  mem.write(exit.address, exit.data.subarray(0, exit.size));
  return { action: 'resume' };
}

function dispatch(exit: VcpuExit, ctx: ExitContext, allowed: boolean): ExitOutcome {
  switch (exit.kind) {
    case 'io': return dispatchIo(exit, ctx);
    case 'mmio': return (allowed ? writeThrough(exit, ctx) : undefined) ?? dispatchMmio(exit, ctx);
    case 'hlt': return { action: 'stop', stop: { reason: 'halt' } };
    case 'shutdown': return { action: 'stop', stop: { reason: 'shutdown' } };
    case 'system-event':
      return { action: 'stop', stop: exit.type === 2 ? { reason: 'reset' } : { reason: 'shutdown' } };
    case 'internal-error': return internalError(exit);
    case 'fail-entry':
      return { action: 'stop', stop: { reason: 'fail-entry', hardwareReason: exit.reason } };
    case 'intr':
      return { action: 'resume' };
    case 'msr':
      return allowed ? passMsr(exit, ctx) : unhandled(exit, 'no hook or device handles it (deny by default)', ctx);
    case 'debug': case 'hypercall': case 'exception': case 'unsupported':
      return unhandled(exit, 'no hook or device handles it (deny by default)', ctx);
    default: {
      const never: never = exit;
      return unhandled(never, 'unknown exit');
    }
  }
}

const hexBytes = (b: Uint8Array): string => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(' ');

/** The stop for `KVM_EXIT_INTERNAL_ERROR`, keeping what KVM said; the run loop adds `code`/`bitness`. */
function internalError(exit: InternalErrorExit): ExitOutcome {
  const instruction = emulationFailure(exit);
  const what = exit.suberror === 1 ? ' (instruction emulation failed' + (instruction ? `: [${hexBytes(instruction)}]` : '') + ')' : '';
  const data = exit.data.length > 0 ? `; data ${exit.data.map((d) => `0x${d.toString(16)}`).join(' ')}` : '';
  return {
    action: 'stop',
    stop: { reason: 'internal-error', suberror: exit.suberror, message: `KVM internal error, suberror ${exit.suberror}${what}${data}`, data: exit.data.slice(), instruction, code: new Uint8Array(0), bitness: 16 },
  };
}

/**
 * The {@link Access} a device call gets. A port is kept as a number and made a bigint only if
 * the device reads `address` (few do): a BigInt allocation per port exit saved.
 */
class AccessState implements Access {
  stop: DeviceStopRequest | undefined;
  readonly #at: number | bigint;
  constructor(at: number | bigint, readonly space: 'pio' | 'mmio', readonly vcpu: number) {
    this.#at = at;
  }
  get address(): bigint {
    const a = this.#at;
    return typeof a === 'bigint' ? a : BigInt(a);
  }
  requestStop(request: DeviceStopRequest): void {
    this.stop ??= request;
  }
}

function deviceStop(req: DeviceStopRequest): StopRequest {
  switch (req.reason) {
    case 'debug-exit': return { reason: 'debug-exit', code: req.code };
    case 'reset': return { reason: 'reset' };
    case 'shutdown': return { reason: 'shutdown' };
    case 'poweroff': return { reason: 'poweroff' };
    case 'suspend': return { reason: 'suspend', wakingVector: req.wakingVector };
    case 'exception': return { reason: 'exception', vector: req.vector, errorCode: undefined, faultRip: 0n, cr2: 0n };
    case 'device-error': return { reason: 'device-error', device: req.device, error: new TsvmError('TSVM_DEVICE', `device '${req.device}': ${req.message}`) };
  }
}

/** A device's read result must be an integer that fits the access; a misfit is that device's error, not a truncation. */
function readValue(device: string, v: unknown, size: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= 2 ** (8 * size)) {
    throw new InvalidArgumentError(`device '${device}' read()`, `returned ${show(v)} for a ${size}-byte read; must be an integer in 0..0x${(2 ** (8 * size) - 1).toString(16)}`);
  }
  return v;
}

function dispatchIo(exit: IoExit, ctx: ExitContext): ExitOutcome {
  const span = ctx.pio.findNumber(exit.port, exit.size);
  if (!span) return unhandled(exit, 'no device at this port (deny by default)', ctx);
  const dev = span.entry.device;
  const offset = exit.port - span.lo;
  const access = new AccessState(exit.port, 'pio', ctx.info.vcpu);
  try {
    if (exit.direction === 'out') {
      if (!dev.write) return unhandled(exit, `device '${dev.name}' does not accept writes`);
      for (let i = 0; i < exit.count; i++) dev.write(offset, exitValue(exit.data, i * exit.size, exit.size), exit.size as AccessSize, access);
      return access.stop ? { action: 'stop', stop: deviceStop(access.stop) } : RESUME;
    }
    if (!dev.read) return unhandled(exit, `device '${dev.name}' does not accept reads`);
    const data = new Uint8Array(exit.size * exit.count);
    for (let i = 0; i < exit.count; i++) data.set(le(readValue(dev.name, dev.read(offset, exit.size as AccessSize, access), exit.size), exit.size), i * exit.size);
    return access.stop ? { action: 'stop', stop: deviceStop(access.stop) } : { action: 'resume', read: data };
  } catch (error) {
    return { action: 'stop', stop: { reason: 'device-error', device: dev.name, error } };
  }
}

function dispatchMmio(exit: MmioExit, ctx: ExitContext): ExitOutcome {
  const size = exit.size;
  // The exit path's lookup in numbers (`Bus.findNumber`): a guest-physical address fits a double
  // exactly (x86: at most 52 bits); one that would not takes `find`, with BigInt arithmetic.
  const at = Number(exit.address);
  let entry: BusEntry | undefined;
  let offset = 0;
  if (at <= Number.MAX_SAFE_INTEGER) {
    const span = ctx.mmio.findNumber(at, size);
    entry = span?.entry;
    if (span) offset = at - span.lo;
  } else {
    entry = ctx.mmio.find(exit.address, size);
    if (entry) offset = Number(exit.address - entry.start);
  }
  if (!entry) return unhandled(exit, 'no RAM and no device at this address (deny by default)', ctx);
  if (size !== 1 && size !== 2 && size !== 4 && size !== 8) return unhandled(exit, `unsupported access size ${size}`);
  const dev = entry.device;
  const access = new AccessState(exit.address, 'mmio', ctx.info.vcpu);
  // 8-byte accesses are split into two 4-byte ones (low first), as QEMU does for devices
  // whose registers are 32 bits wide.
  const part: AccessSize = size === 8 ? 4 : size;
  const parts = size === 8 ? 2 : 1;
  try {
    if (exit.isWrite) {
      if (!dev.write) return unhandled(exit, `device '${dev.name}' does not accept writes`);
      for (let k = 0; k < parts; k++) dev.write(offset + 4 * k, exitValue(exit.data, 4 * k, part), part, access);
      return access.stop ? { action: 'stop', stop: deviceStop(access.stop) } : RESUME;
    }
    if (!dev.read) return unhandled(exit, `device '${dev.name}' does not accept reads`);
    const data = new Uint8Array(8);
    for (let k = 0; k < parts; k++) data.set(le(readValue(dev.name, dev.read(offset + 4 * k, part, access), part), part), 4 * k);
    return access.stop ? { action: 'stop', stop: deviceStop(access.stop) } : { action: 'resume', read: data };
  } catch (error) {
    return { action: 'stop', stop: { reason: 'device-error', device: dev.name, error } };
  }
}
