/**
 * What `KVM_RUN` reported, as a discriminated union on `kind` (rust-vmm's `VcpuExit`). Every
 * payload is copied out of `kvm_run` at decode time, so an exit value never aliases the
 * mapping and stays valid after the next `KVM_RUN` or after `close()`. A reason this package
 * does not decode is `'unsupported'` with the raw number, never silently dropped.
 *
 * The shapes are exactly `@tsvm/core`'s `VcpuExit`: core's adapter returns these objects
 * unchanged (the compiler checks that they fit), so one exit costs one decode and one object.
 * @module
 */
import { KVM_CONST, KVM_EXIT } from './raw/ioctls.js';
import { KVM_RUN_OFFSETS as O } from './raw/structs.js';

/** `KVM_EXIT_IO`. For `out`, `data` holds the `size * count` bytes the guest wrote. */
export interface KvmIoExit {
  /** Discriminant. */
  readonly kind: 'io';
  /** `in` waits for {@link KvmVcpu.completeIoIn} before the next `KVM_RUN`. */
  readonly direction: 'in' | 'out';
  /** I/O port. */
  readonly port: number;
  /** Access width in bytes. */
  readonly size: 1 | 2 | 4;
  /** Repetitions (`rep ins/outs`); usually 1. */
  readonly count: number;
  /** Bytes written by the guest (empty for `in`). */
  readonly data: Uint8Array;
}

/** `KVM_EXIT_MMIO`: an access to guest-physical memory with no RAM behind it (or a read-only slot write). */
export interface KvmMmioExit {
  /** Discriminant. */
  readonly kind: 'mmio';
  /** Guest-physical address. */
  readonly address: bigint;
  /** A read waits for {@link KvmVcpu.completeMmioRead} before the next `KVM_RUN`. */
  readonly isWrite: boolean;
  /** 1, 2, 4 or 8. */
  readonly size: number;
  /** Bytes written by the guest (empty for reads). */
  readonly data: Uint8Array;
}

/** `KVM_EXIT_HLT`. */
export interface KvmHltExit { /** Discriminant. */ readonly kind: 'hlt' }
/** `KVM_EXIT_SHUTDOWN` (triple fault or similar). */
export interface KvmShutdownExit { /** Discriminant. */ readonly kind: 'shutdown' }
/** `KVM_RUN` failed with `EINTR`/`EAGAIN` (a signal, or `immediate_exit`). */
export interface KvmIntrExit { /** Discriminant. */ readonly kind: 'intr' }

/** `KVM_EXIT_DEBUG` (x86 `debug.arch`). */
export interface KvmDebugExit {
  /** Discriminant. */
  readonly kind: 'debug';
  /** Exception vector (1 = #DB, 3 = #BP). */
  readonly exception: number;
  /** Guest RIP. */
  readonly pc: bigint;
  /** DR6 at the exit. */
  readonly dr6: bigint;
  /** DR7 at the exit. */
  readonly dr7: bigint;
}

/** `KVM_EXIT_HYPERCALL`. */
export interface KvmHypercallExit {
  /** Discriminant. */
  readonly kind: 'hypercall';
  /** Hypercall number. */
  readonly nr: bigint;
  /** The six arguments. */
  readonly args: readonly bigint[];
}

/** `KVM_EXIT_X86_RDMSR` / `KVM_EXIT_X86_WRMSR`; both wait for {@link KvmVcpu.completeMsr}. */
export interface KvmMsrExit {
  /** Discriminant. */
  readonly kind: 'msr';
  /** `rdmsr` or `wrmsr`. */
  readonly direction: 'read' | 'write';
  /** MSR index (ECX). */
  readonly index: number;
  /** The value written (`write`); 0 for `read`. */
  readonly data: bigint;
  /** `KVM_MSR_EXIT_REASON_*`: why the access came to userspace. */
  readonly reason: number;
}

/** `KVM_EXIT_FAIL_ENTRY`. */
export interface KvmFailEntryExit {
  /** Discriminant. */
  readonly kind: 'fail-entry';
  /** `hardware_entry_failure_reason` (vendor specific). */
  readonly reason: bigint;
  /** Host CPU the entry failed on. */
  readonly cpu: number;
}

/** `KVM_EXIT_INTERNAL_ERROR`: KVM could not handle something (often instruction emulation). */
export interface KvmInternalErrorExit {
  /** Discriminant. */
  readonly kind: 'internal-error';
  /** `KVM_INTERNAL_ERROR_*` (1 = emulation, 2 = exception while delivering one, 3 = delivery, 4 = unexpected exit). */
  readonly suberror: number;
  /** `ndata` as KVM reported it (may exceed the 16 words `kvm_run` has room for). */
  readonly ndata: number;
  /** `data[0 .. min(ndata, 16))`. For an emulation failure these words include `flags` and the instruction bytes. */
  readonly data: readonly bigint[];
  /**
   * The instruction the emulator failed on (`emulation_failure.insn_bytes[0 .. insn_size)`):
   * present only for suberror `KVM_INTERNAL_ERROR_EMULATION` with
   * `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES` set.
   */
  readonly instructionBytes?: Uint8Array;
}

/** `KVM_EXIT_SYSTEM_EVENT` (shutdown, reset, crash). */
export interface KvmSystemEventExit {
  /** Discriminant. */
  readonly kind: 'system-event';
  /** `KVM_SYSTEM_EVENT_*`. */
  readonly type: number;
  /** `data[0 .. min(ndata, 16))`. */
  readonly data: readonly bigint[];
}

/** `KVM_EXIT_EXCEPTION`. */
export interface KvmExceptionExit {
  /** Discriminant. */
  readonly kind: 'exception';
  /** Exception vector. */
  readonly vector: number;
  /** Error code (0 when the exception has none). */
  readonly errorCode: number;
}

/** An exit reason this package does not decode. */
export interface KvmUnsupportedExit {
  /** Discriminant. */
  readonly kind: 'unsupported';
  /** The raw `KVM_EXIT_*` number. */
  readonly reason: number;
}

/** Every exit {@link KvmVcpu.run} can return. */
export type KvmExit =
  | KvmIoExit | KvmMmioExit | KvmHltExit | KvmShutdownExit | KvmDebugExit | KvmHypercallExit | KvmMsrExit
  | KvmIntrExit | KvmFailEntryExit | KvmInternalErrorExit | KvmSystemEventExit | KvmExceptionExit | KvmUnsupportedExit;

const EMPTY = new Uint8Array(0);
// Exits without payload are shared frozen values: no allocation for them.
const HLT: KvmHltExit = Object.freeze({ kind: 'hlt' });
const SHUTDOWN: KvmShutdownExit = Object.freeze({ kind: 'shutdown' });
/** The exit for an interrupted `KVM_RUN`. @internal */
export const INTR: KvmIntrExit = Object.freeze({ kind: 'intr' });

/**
 * `bytes.slice(at, at + n)`. The usual `out` (1 to 4 bytes) is copied by hand into a new array:
 * `slice` goes through the species lookup of a generic typed-array builtin, and costs about
 * twice a small `new Uint8Array` plus a loop (both are V8 on-heap arrays at this size).
 */
function copyOut(bytes: Uint8Array, at: number, n: number): Uint8Array {
  if (n > 8) return bytes.slice(at, at + n);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = bytes[at + i] as number;
  return out;
}

function words(r: DataView, at: number, n: number): bigint[] {
  const out = new Array<bigint>(n);
  for (let i = 0; i < n; i++) out[i] = r.getBigUint64(at + i * 8, true);
  return out;
}

function internalError(r: DataView, bytes: Uint8Array): KvmInternalErrorExit {
  const suberror = r.getUint32(O.internal_suberror, true);
  const ndata = r.getUint32(O.internal_ndata, true);
  const data = words(r, O.internal_data, Math.min(ndata, 16));
  // emulation_failure is ABI only for this suberror, and its flags word is data[0].
  if (suberror === KVM_CONST.INTERNAL_ERROR_EMULATION && ndata >= 1
    && (r.getBigUint64(O.emulation_flags, true) & BigInt(KVM_CONST.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) !== 0n) {
    const n = Math.min(r.getUint8(O.emulation_insn_size), 15);
    return { kind: 'internal-error', suberror, ndata, data, instructionBytes: bytes.slice(O.emulation_insn_bytes, O.emulation_insn_bytes + n) };
  }
  return { kind: 'internal-error', suberror, ndata, data };
}

/** What the decoded exit still waits for before the next `KVM_RUN` (`complete*`). @internal */
export const Pending = { None: 0, IoIn: 1, MmioRead: 2, Msr: 3 } as const;
/** One of {@link Pending}'s values. @internal */
export type Pending = (typeof Pending)[keyof typeof Pending];

/**
 * Where the answer to an exit goes: filled in by {@link decodeExit} so the hot path reads each
 * `kvm_run` field once. One per vCPU, reused. @internal
 */
export interface PendingAnswer {
  /** What is pending. */
  pending: Pending;
  /** For `IoIn`: offset of the data in the mapping (`io.data_offset`) and its length. */
  ioOffset: number;
  /** See `ioOffset`. */
  ioLength: number;
}

/**
 * Decodes the exit `reason` from a `kvm_run` view, copying every payload out, and records in
 * `answer` what the exit waits for. `r` and `bytes` view the same mapping; both are borrowed
 * for this call only.
 * @internal
 */
export function decodeExit(reason: number, r: DataView, bytes: Uint8Array, answer: PendingAnswer): KvmExit {
  switch (reason) {
    case KVM_EXIT.IO: {
      const port = r.getUint16(O.io_port, true);
      const size = r.getUint8(O.io_size) as 1 | 2 | 4;
      const count = r.getUint32(O.io_count, true);
      // data_offset is a __u64 but an offset into the few-page vCPU mapping: the low half is it
      // (and reading it as a number spares a BigInt per exit).
      const off = r.getUint32(O.io_data_offset, true);
      if (r.getUint8(O.io_direction) !== KVM_CONST.EXIT_IO_OUT) {
        answer.pending = Pending.IoIn;
        answer.ioOffset = off;
        answer.ioLength = size * count;
        return { kind: 'io', direction: 'in', port, size, count, data: EMPTY };
      }
      return { kind: 'io', direction: 'out', port, size, count, data: copyOut(bytes, off, size * count) };
    }
    case KVM_EXIT.MMIO: {
      const isWrite = r.getUint8(O.mmio_is_write) !== 0;
      const size = r.getUint32(O.mmio_len, true);
      if (!isWrite) answer.pending = Pending.MmioRead;
      return {
        kind: 'mmio', address: r.getBigUint64(O.mmio_phys_addr, true), isWrite, size,
        data: isWrite ? bytes.slice(O.mmio_data, O.mmio_data + Math.min(size, 8)) : EMPTY,
      };
    }
    case KVM_EXIT.HLT: return HLT;
    case KVM_EXIT.SHUTDOWN: return SHUTDOWN;
    case KVM_EXIT.INTR: return INTR;
    case KVM_EXIT.DEBUG:
      return { kind: 'debug', exception: r.getUint32(O.debug_exception, true), pc: r.getBigUint64(O.debug_pc, true), dr6: r.getBigUint64(O.debug_dr6, true), dr7: r.getBigUint64(O.debug_dr7, true) };
    case KVM_EXIT.HYPERCALL:
      return { kind: 'hypercall', nr: r.getBigUint64(O.hypercall_nr, true), args: words(r, O.hypercall_args, 6) };
    case KVM_EXIT.X86_RDMSR: case KVM_EXIT.X86_WRMSR:
      answer.pending = Pending.Msr;
      return { kind: 'msr', direction: reason === KVM_EXIT.X86_RDMSR ? 'read' : 'write', index: r.getUint32(O.msr_index, true), data: r.getBigUint64(O.msr_data, true), reason: r.getUint32(O.msr_reason, true) };
    case KVM_EXIT.FAIL_ENTRY:
      return { kind: 'fail-entry', reason: r.getBigUint64(O.fail_entry_reason, true), cpu: r.getUint32(O.fail_entry_cpu, true) };
    case KVM_EXIT.INTERNAL_ERROR:
      return internalError(r, bytes);
    case KVM_EXIT.SYSTEM_EVENT:
      return { kind: 'system-event', type: r.getUint32(O.system_event_type, true), data: words(r, O.system_event_data, Math.min(r.getUint32(O.system_event_ndata, true), 16)) };
    case KVM_EXIT.EXCEPTION:
      return { kind: 'exception', vector: r.getUint32(O.ex_exception, true), errorCode: r.getUint32(O.ex_error_code, true) };
    default:
      return { kind: 'unsupported', reason };
  }
}
