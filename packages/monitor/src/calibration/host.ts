/**
 * The identity a calibration table is keyed by: kernel release, CPU model and KVM flavour.
 * @module
 */
import { readFileSync } from 'node:fs';
import { release } from 'node:os';
import type { VirtFlavour } from '@tsvm/core';
import type { HostIdentity } from './table.js';

/** The CPU model from `/proc/cpuinfo` (`unknown` when unreadable). */
export function cpuModel(): string {
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    return m?.[1]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/** This host's identity for a KVM flavour. */
export function hostIdentity(flavour: VirtFlavour): HostIdentity {
  return { kernel: release(), cpu: cpuModel(), flavour };
}

/** A stable string key for a host identity. */
export function hostKey(h: HostIdentity): string {
  return `${h.flavour}|${h.kernel}|${h.cpu}`;
}
