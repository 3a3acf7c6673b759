/**
 * The vocabulary of a mediate hook: `allow()`, `deny({ effect, reason })`, `emulate(value)`,
 * and the context every hook function receives.
 * @module
 */
import { InvalidArgumentError, type DenyEffect, type HookDecision, type Machine, type VcpuExit } from '@tsvm/core';
import type { MonitorEvent } from './events.js';

/** A decision a mediate hook returns (core's `HookDecision` without `undefined`). */
export type Decision = Exclude<HookDecision, undefined>;

/** Let the access proceed to the device (or the guest continue). */
export function allow(): Decision {
  return ALLOW;
}
const ALLOW: Decision = Object.freeze({ verdict: 'allow' });

/**
 * Refuse the event. `effect`: `'stop'` (default) stops the machine with a `MonitorViolation`;
 * `'ignore'` makes reads return all ones and drops writes; `'gp'` raises `#GP(0)` in the guest on
 * the accessing instruction (port I/O, MMIO, write-watch, MSRs; other events stop).
 */
export function deny(options: { effect?: DenyEffect; reason?: string } = {}): Decision {
  if (!options || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  if (options.effect !== undefined && !['stop', 'ignore', 'gp'].includes(options.effect)) throw new InvalidArgumentError('options.effect', `must be 'stop', 'ignore' or 'gp', got ${String(options.effect)}`);
  return { verdict: 'deny', ...(options.effect ? { effect: options.effect } : {}), ...(options.reason ? { reason: options.reason } : {}) };
}

/**
 * Complete the access with `value` instead of the device (reads) or instead of the write. For a
 * string I/O exit the value is supplied for every element. Whether `value` fits the access (a
 * 1-byte `in`: 0..0xff, an MSR: 64 bits) is checked when the decision is applied; a misfit stops
 * the machine with this hook's `hook-error`.
 * @throws InvalidArgumentError when `value` is not an integer `number` or a `bigint`.
 */
export function emulate(value: number | bigint): Decision {
  if (typeof value !== 'bigint' && !Number.isInteger(value)) throw new InvalidArgumentError('value', `emulate() needs an integer number or a bigint, got ${String(value)}`);
  return { verdict: 'emulate', value };
}

/** What a hook function receives besides the event. */
export interface HookContext {
  /** The machine the event happened on. */
  readonly machine: Machine;
  /** vCPU index. */
  readonly vcpu: number;
  /** Exit sequence number in the machine's life. */
  readonly seq: number;
  /** The exit that carried the event (undefined for sampled observe events such as dirty pages). */
  readonly exit: VcpuExit | undefined;
  /**
   * Reads the guest RIP (one ioctl: call only when needed): the accessing instruction's for an
   * exit, where the vCPU is now for a sampled event. A sampled event on a machine with runner
   * threads (`vcpuThreads: 'parallel'`) whose vCPU is in the guest at that moment has no RIP to
   * read: `StateError`.
   */
  rip(): bigint;
}

/** A mediate hook: decides. May return a Promise (the run loop awaits it, bounded by the run's timeout). */
export type MediateFn = (event: MonitorEvent, ctx: HookContext) => Decision | undefined | Promise<Decision | undefined>;
/** An observe hook: sees, cannot change the outcome; may be called late and in batches. */
export type ObserveFn = (event: MonitorEvent, ctx: HookContext) => void;
