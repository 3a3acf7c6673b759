/**
 * Errors of `@tsvm/monitor`. All extend core's `TsvmError` and carry a stable `code`.
 * @module
 */
import { TsvmError } from '@tsvm/core';

/**
 * No mechanism on this host can deliver the event a hook asked for (e.g. single-step at CPL3
 * on PVM, or a mediate hook on CPUID, which never exits on KVM). Thrown at registration, so a
 * hook is never silently dropped.
 */
export class MechanismUnavailableError extends TsvmError {
  /** The event that was asked for, e.g. `step`. */
  readonly event: string;
  /** Privilege level the hook targets, when it matters. */
  readonly cpl: 0 | 3 | undefined;
  /** Events or mechanisms that do work here, as short human hints. */
  readonly alternatives: readonly string[];

  /**
   * @param event - the requested event.
   * @param message - why it cannot be delivered.
   * @param details - CPL and what works instead.
   */
  constructor(event: string, message: string, details: { cpl?: 0 | 3; alternatives?: readonly string[] } = {}) {
    const alt = details.alternatives ?? [];
    super('TSVM_MECHANISM_UNAVAILABLE', `${event}: ${message}${alt.length ? `; what works here: ${alt.join('; ')}` : ''}`);
    this.event = event;
    this.cpl = details.cpl;
    this.alternatives = alt;
  }
}

/** A policy document is malformed. `path` names the offending field, e.g. `rules[3].ports`. */
export class PolicyError extends TsvmError {
  /** JSON path of the offending value. */
  readonly path: string;

  /**
   * @param path - JSON path of the offending value.
   * @param message - what is wrong with it.
   */
  constructor(path: string, message: string) {
    super('TSVM_POLICY', `${path}: ${message}`);
    this.path = path;
  }
}

/** Two rules (or two hooks) overlap in a way that makes the outcome ambiguous. Names both. */
export class PolicyConflictError extends TsvmError {
  /** Id (or name) of the earlier rule. */
  readonly first: string;
  /** Id (or name) of the later rule. */
  readonly second: string;

  /**
   * @param first - earlier rule id.
   * @param second - later rule id.
   * @param message - what overlaps.
   */
  constructor(first: string, second: string, message: string) {
    super('TSVM_POLICY_CONFLICT', `rules '${first}' and '${second}' conflict: ${message}`);
    this.first = first;
    this.second = second;
  }
}

/**
 * The complete-mediation guard saw an access to a mediated range that did not pass through
 * the mediate hooks (e.g. a coalesced zone someone registered behind the monitor's back).
 */
export class MediationBypassError extends TsvmError {
  /** @param message - which access bypassed which hook. */
  constructor(message: string) {
    super('TSVM_MEDIATION_BYPASS', message);
  }
}
