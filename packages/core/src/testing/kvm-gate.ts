/**
 * Whether tests that need `/dev/kvm` can run here, and a loud explanation when they cannot.
 * @module
 */
import { KvmBackend } from '../backend/kvm.js';

/** Result of probing KVM once per process. */
export interface KvmAvailability {
  /** Whether `/dev/kvm` opened and answered. */
  readonly available: boolean;
  /** Why not (empty when available). */
  readonly reason: string;
}

let cached: KvmAvailability | undefined;

/**
 * Probes `/dev/kvm` once. When it is unusable, prints a banner to stderr so a skipped KVM
 * suite is never mistaken for a passing one.
 */
export function kvmAvailability(): KvmAvailability {
  if (cached) return cached;
  try {
    new KvmBackend().close();
    cached = { available: true, reason: '' };
  } catch (e) {
    const reason = (e as { reason?: string }).reason ?? (e as Error).message;
    cached = { available: false, reason };
    process.stderr.write(`\n[tsvm] ***** SKIPPING KVM TESTS: ${reason} *****\n\n`);
  }
  return cached;
}
