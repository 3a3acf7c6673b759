/**
 * How much work one guest request may cause inside the host before the rest waits for the next
 * turn of the event loop. A notify is one MMIO exit; without a bound, one kick whose ring describes
 * guest RAM many times over makes the host copy gigabytes inside that exit, stalling the vCPU's run
 * deadline and every other machine in the process. The transport spends at most one budget per
 * notify (and per deferred continuation); what is left runs from `setImmediate`, i.e. between
 * the run loop's slices, so a hostile guest cannot hold the event loop.
 * @module
 */
import { InvalidArgumentError } from '@tsvm/core';

/** Limits on the work of one notify (or one deferred continuation) of one queue. */
export interface VirtioBudget {
  /**
   * Guest-RAM bytes moved (read and written, rings included) after which no further chain is
   * started. One chain in progress is finished, so the bound is this plus one chain's work:
   * devices cap their per-chain work (e.g. `maxRequestBytes`, `maxTransmitBytes`). Default 1 MiB.
   */
  readonly bytes?: number;
  /** Chains handled. Default 64. */
  readonly chains?: number;
  /** Descriptors read while walking chains (each chain is at most the queue size, or 1024 indirect). Default 1024: a walk costs ~2.5 µs per descriptor (measured), so 4096 made one notify ~10 ms of host work. */
  readonly descriptors?: number;
}

/** Budget defaults: about a millisecond of host work per turn. */
export const DEFAULT_VIRTIO_BUDGET: Required<VirtioBudget> = { bytes: 1 << 20, chains: 64, descriptors: 1024 };

/** Fills in defaults and validates (positive safe integers). Throws `InvalidArgumentError`. */
export function resolveBudget(budget: VirtioBudget | undefined, argument = 'budget'): Required<VirtioBudget> {
  if (budget === undefined) return DEFAULT_VIRTIO_BUDGET;
  if (budget === null || typeof budget !== 'object') throw new InvalidArgumentError(argument, 'must be an object');
  const out = { ...DEFAULT_VIRTIO_BUDGET };
  for (const k of ['bytes', 'chains', 'descriptors'] as const) {
    const v = budget[k];
    if (v === undefined) continue;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new InvalidArgumentError(`${argument}.${k}`, `must be a positive integer, got ${String(v)}`);
    out[k] = v;
  }
  return out;
}

/** Validates a positive integer option of a device (per-chain caps). */
export function positiveInt(value: number | undefined, fallback: number, argument: string, min = 1): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) throw new InvalidArgumentError(argument, `must be an integer ≥ ${min}, got ${String(value)}`);
  return value;
}
