/**
 * Hook points on the exit path. Core knows no policy: it runs, for each exit, the *mediate*
 * hooks (in registration order; the first deny wins, an emulate supplies the value), then the
 * device, then the *observe* hooks. `@tsvm/monitor` builds its reference monitor on this.
 * @module
 */
import type { VcpuExit } from './exits.js';

/** How a deny takes effect. */
export type DenyEffect =
  /** Stop the machine with a `MonitorViolation`. */
  | 'stop'
  /** Reads return all ones, writes are dropped; the guest continues. */
  | 'ignore'
  /**
   * Raise `#GP(0)` in the guest on the instruction that made the access (port I/O, MMIO, MSR),
   * as hardware does for an I/O-bitmap or MSR violation; the guest's own handler decides what
   * happens next. Other events are stopped.
   */
  | 'gp';

/** What a mediate hook decided. `undefined` means allow. */
export type HookDecision =
  | { readonly verdict: 'allow' }
  | { readonly verdict: 'deny'; readonly effect?: DenyEffect; readonly reason?: string }
  | { readonly verdict: 'emulate'; readonly value: number | bigint }
  | undefined;

/** Facts about the exit a hook may want besides the exit itself. */
export interface HookInfo {
  /** Index of the vCPU whose exit this is (every vCPU's exits pass through the same hooks). */
  readonly vcpu: number;
  /** Sequence number of this exit in the machine's life. */
  readonly seq: number;
  /** Reads the guest's RIP register now (one ioctl; call only when needed). */
  rip(): bigint;
  /**
   * The address of the instruction that caused this exit, on every KVM flavour: for port I/O
   * RIP may already be past an `out` (PVM), so it is derived from the host's learned
   * `capabilities.ioExitRip` and the guest's code bytes; for other exits it is `rip()`.
   * A few ioctls; call only when needed.
   */
  instructionRip(): bigint;
}

/** A hook on the exit path. */
export interface ExitHook {
  /** Name used in reports, audit lines and errors. */
  readonly name: string;
  /** `mediate` runs before the device and can change the outcome; `observe` runs after and cannot. */
  readonly mode: 'mediate' | 'observe';
  /** Cheap filter: does this hook care about this exit? */
  matches(exit: VcpuExit): boolean;
  /** Mediate hooks decide; observe hooks return nothing. May return a Promise (the loop awaits). */
  handle(exit: VcpuExit, info: HookInfo): HookDecision | Promise<HookDecision> | void;
}

/** Per-hook counters kept by the run loop. */
export interface HookStats {
  /** Times the hook ran (once per exit). */
  calls: number;
  /**
   * Elements those calls covered: a string I/O exit (`rep insb`/`outsb`, `IoExit.count`) is one
   * call for up to 1024 elements, and the hook's decision applies to each of them.
   */
  elements: number;
  /**
   * Nanoseconds spent inside the hook: measured on one call in 8 (the first, the ninth, …) and
   * scaled to all calls, because two clock reads per hook per exit would cost more than many
   * hooks do. `timedCalls` and `timedNs` are the sample itself.
   */
  ns: number;
  /** Calls that were timed. */
  timedCalls: number;
  /** Nanoseconds of the timed calls. */
  timedNs: number;
}
