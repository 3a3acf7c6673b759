/**
 * What a vCPU exit *is*, as a discriminated union on `kind`. Backends decode `kvm_run` into
 * these and copy every payload out at decode time, so an exit value never aliases the
 * mapping. `'unsupported'` carries the raw reason instead of being silently ignored.
 * @module
 */

import type {
  KvmDebugExit, KvmExceptionExit, KvmFailEntryExit, KvmHltExit, KvmHypercallExit, KvmInternalErrorExit, KvmIntrExit,
  KvmIoExit, KvmMmioExit, KvmMsrExit, KvmShutdownExit, KvmSystemEventExit, KvmUnsupportedExit,
} from '@tsvm/kvm-backend';

// The shapes are kvm-backend's (its decoder produces these very objects, no mapping per exit);
// core adds only what the run loop knows: that a coalesced write arrived late.

/** Port I/O exit. For `out`, `data` holds `size * count` bytes written by the guest. */
export interface IoExit extends KvmIoExit {
  /**
   * A write from the coalesced ring, delivered at a later exit or slice end: it already
   * happened, mediate hooks never see it, and it carries no RIP of its own.
   */
  readonly late?: true;
}

/** MMIO exit: an access to guest-physical memory with no RAM behind it (or a read-only slot write). */
export interface MmioExit extends KvmMmioExit {
  /** A write from the coalesced ring, delivered late (see {@link IoExit.late}). */
  readonly late?: true;
}

/** The guest executed `hlt` (without an in-kernel irqchip) or is halted with nothing to wake it. */
export type HltExit = KvmHltExit;
/** Triple fault or similar: the CPU shut down. */
export type ShutdownExit = KvmShutdownExit;
/** Guest-debug exit (breakpoint, single step, debug register hit). */
export type DebugExit = KvmDebugExit;
/** `KVM_EXIT_HYPERCALL` (only where the host routes `vmcall` to userspace). */
export type HypercallExit = KvmHypercallExit;
/** A user-space MSR access (`KVM_EXIT_X86_RDMSR` / `WRMSR`). */
export type MsrExit = KvmMsrExit;
/** `KVM_RUN` was interrupted (our slice timer). */
export type IntrExit = KvmIntrExit;
/** VM entry failed; `reason` is hardware specific. */
export type FailEntryExit = KvmFailEntryExit;
/**
 * KVM could not handle something (often instruction emulation). `data` is `internal.data[0..ndata)`
 * copied verbatim (at most 16 words); for `KVM_INTERNAL_ERROR_EMULATION` that is the
 * `emulation_failure` overlay: `data[0]` = flags, then `insn_size` and `insn_bytes[15]`
 * (see {@link emulationFailure}). `ndata` may be left out by a backend that has no more words.
 */
export interface InternalErrorExit extends Omit<KvmInternalErrorExit, 'ndata'> {
  /** `ndata` as KVM reported it (defaults to `data.length`). */
  readonly ndata?: number;
}
/** A system event (shutdown, reset, crash) requested through the platform. */
export type SystemEventExit = KvmSystemEventExit;
/** `KVM_EXIT_EXCEPTION`: an exception KVM reports to userspace. */
export type ExceptionExit = KvmExceptionExit;
/** Any exit reason tsvm does not decode. */
export type UnsupportedExit = KvmUnsupportedExit;

/** `KVM_INTERNAL_ERROR_EMULATION`: the instruction emulator failed. */
export const INTERNAL_ERROR_EMULATION = 1;
/** `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: `insn_size`/`insn_bytes` are valid. */
export const EMULATION_FLAG_INSTRUCTION_BYTES = 1n;

/**
 * The instruction bytes KVM reports with an emulation failure (`struct emulation_failure` in
 * `<linux/kvm.h>`: `__u64 flags; __u8 insn_size; __u8 insn_bytes[15];`, overlaid on `data`),
 * or undefined when this exit does not carry them.
 */
export function emulationFailure(exit: InternalErrorExit): Uint8Array | undefined {
  if (exit.instructionBytes) return exit.instructionBytes;
  if (exit.suberror !== INTERNAL_ERROR_EMULATION || exit.data.length < 3) return undefined;
  if (((exit.data[0] ?? 0n) & EMULATION_FLAG_INSTRUCTION_BYTES) === 0n) return undefined;
  const raw = new Uint8Array(16);
  const view = new DataView(raw.buffer);
  view.setBigUint64(0, BigInt.asUintN(64, exit.data[1] ?? 0n), true);
  view.setBigUint64(8, BigInt.asUintN(64, exit.data[2] ?? 0n), true);
  const size = Math.min(raw[0] ?? 0, 15);
  return raw.slice(1, 1 + size);
}
/** Every exit a vCPU can produce. */
export type VcpuExit =
  | IoExit | MmioExit | HltExit | ShutdownExit | DebugExit | HypercallExit | MsrExit | IntrExit
  | FailEntryExit | InternalErrorExit | SystemEventExit | ExceptionExit | UnsupportedExit;

/** The `kind` tags of {@link VcpuExit}. */
export type ExitKind = VcpuExit['kind'];

/** All exit kinds, for counters and exhaustive tables. */
export const EXIT_KINDS: readonly ExitKind[] = [
  'io', 'mmio', 'hlt', 'shutdown', 'debug', 'hypercall', 'msr', 'intr', 'fail-entry',
  'internal-error', 'system-event', 'exception', 'unsupported',
];

/** Reads a little-endian unsigned value of up to 4 bytes from exit data. */
export function exitValue(data: Uint8Array, offset = 0, size = data.length): number {
  let v = 0;
  for (let i = Math.min(size, 4) - 1; i >= 0; i--) v = v * 256 + (data[offset + i] ?? 0);
  return v;
}

/** A short human description of an exit, for messages. */
export function describeExit(exit: VcpuExit): string {
  switch (exit.kind) {
    case 'io': return `${exit.direction} port 0x${exit.port.toString(16)} (${exit.size} byte${exit.size > 1 ? 's' : ''}${exit.count > 1 ? ` x${exit.count}` : ''})`;
    case 'mmio': return `MMIO ${exit.isWrite ? 'write' : 'read'} at 0x${exit.address.toString(16)} (${exit.size} bytes)`;
    case 'msr': return `${exit.direction === 'read' ? 'rdmsr' : 'wrmsr'} 0x${exit.index.toString(16)}`;
    case 'debug': return `debug exception ${exit.exception} at 0x${exit.pc.toString(16)}`;
    case 'hypercall': return `hypercall ${exit.nr}`;
    case 'fail-entry': return `VM entry failed (reason 0x${exit.reason.toString(16)})`;
    case 'internal-error': return `KVM internal error (suberror ${exit.suberror})`;
    case 'system-event': return `system event ${exit.type}`;
    case 'exception': return `exception ${exit.vector} (error code ${exit.errorCode})`;
    case 'unsupported': return `unsupported exit reason ${exit.reason}`;
    case 'hlt': case 'shutdown': case 'intr': return exit.kind;
    default: {
      const never: never = exit;
      return String(never);
    }
  }
}
