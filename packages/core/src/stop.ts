/**
 * Why `Machine.run()` returned. Normal endings are values, not exceptions: `run()` throws only
 * for bugs and misuse.
 * @module
 */
import type { VcpuExit } from './exits.js';
import type { MonitorViolation, TsvmError } from './errors.js';

/** Fields every {@link Stop} has. */
export interface StopCommon {
  /**
   * Where the guest stopped: for a stop an exit caused, the address of the instruction behind
   * that exit, on every KVM flavour (an `out` itself, although PVM has already moved RIP past
   * it); for `timeout` and `aborted`, RIP at that moment.
   */
  readonly rip: bigint;
  /**
   * The vCPU that stopped: whose exit (or whose halt) ended the run. With several vCPUs any
   * one's stop stops the machine; for `timeout` and `aborted` it is the vCPU that ran last.
   */
  readonly vcpu: number;
  /** Exits handled during this `run()`. */
  readonly exits: number;
  /** Wall time of this `run()` in milliseconds. */
  readonly elapsedMs: number;
  /**
   * CPU time the calling thread spent in this `run()`, in milliseconds: the exits' host work,
   * guest time as the kernel accounts it (on PVM part of a guest's CPL3 time is not counted),
   * and whatever else ran on the thread between slices. Unlike {@link StopCommon.elapsedMs} it
   * does not grow when other processes take the CPU, which makes it the figure to compare runs
   * by on a busy host. Absent when the backend has no thread clock (the mock backend), and with
   * `vcpuThreads: 'parallel'` (the guest's time is then its runner threads', not this thread's).
   */
  readonly cpuMs?: number;
}

/** Why the machine stopped. Switch on `reason`. */
export type Stop = StopCommon & (
  | { readonly reason: 'halt' }
  | { readonly reason: 'shutdown' }
  | { readonly reason: 'reset' }
  | { readonly reason: 'debug-exit'; readonly code: number }
  /**
   * The guest powered off through ACPI: it wrote SLP_EN with the S5 (soft-off) sleep type to
   * PM1_CNT (`AcpiPm` in `@tsvm/devices`). A clean end, like `halt`; the machine is not resumable
   * (`run()` again would continue after the write, which real hardware never does).
   */
  | { readonly reason: 'poweroff' }
  /**
   * The guest entered ACPI S3 (suspend to RAM): it wrote SLP_EN with the S3 sleep type to PM1_CNT.
   * Resume it with `run()` again: the vCPU continues at the instruction after that write, with
   * PM1_STS.WAK_STS set, CPU context, RAM and device state all kept (a suspend in which nothing
   * lost power). `wakingVector` is what the guest left in the FACS (`0` if nothing, or no FACS
   * was given to the device), for a host that prefers to re-enter the guest there instead.
   */
  | { readonly reason: 'suspend'; readonly wakingVector: bigint }
  /**
   * The time ran out (or the signal fired). `halted`: the vCPU sat in `hlt` waiting for an
   * interrupt (in-kernel irqchip) rather than running — a guest waiting for an event that never
   * came, not one spinning. With several vCPUs: every one halted or waiting for INIT/SIPI.
   * `run()` always sets it.
   */
  | { readonly reason: 'timeout'; readonly halted?: boolean }
  | { readonly reason: 'aborted'; readonly halted?: boolean }
  | { readonly reason: 'exception'; readonly vector: number; readonly errorCode: number | undefined; readonly faultRip: bigint; readonly cr2: bigint }
  | { readonly reason: 'unhandled-exit'; readonly kind: VcpuExit['kind']; readonly address: bigint | undefined; readonly exit: VcpuExit; readonly message: string }
  | { readonly reason: 'violation'; readonly violation: MonitorViolation }
  | { readonly reason: 'hook-error'; readonly hook: string; readonly error: unknown }
  | { readonly reason: 'device-error'; readonly device: string; readonly error: unknown }
  /**
   * KVM gave up (`KVM_EXIT_INTERNAL_ERROR`). `data` is every word KVM reported with it
   * (`internal.data[0..ndata)`). For an emulation failure (suberror 1) whose `data[0]` flags say
   * so, `instruction` holds the bytes KVM tried to emulate (`insn_bytes[0..insn_size)`). `code` is
   * what core read at RIP through the guest's page tables (up to 15 bytes; empty when unreadable),
   * and `bitness` the mode to decode either in.
   */
  | {
    readonly reason: 'internal-error'; readonly suberror: number; readonly message: string; readonly data: readonly bigint[];
    readonly instruction: Uint8Array | undefined; readonly code: Uint8Array; readonly bitness: 16 | 32 | 64;
  }
  | { readonly reason: 'fail-entry'; readonly hardwareReason: bigint }
  | { readonly reason: 'backend-error'; readonly error: TsvmError }
);

/** The `reason` tags of {@link Stop}. */
export type StopReason = Stop['reason'];

/** A stop before the run loop adds the common fields. */
export type StopRequest = Stop extends infer S ? S extends StopCommon ? Omit<S, keyof StopCommon> : never : never;
