/**
 * `@tsvm/kvm-backend` — raw, typed bindings to the Linux KVM API through koffi, in the spirit
 * of rust-vmm's `kvm-ioctls`: one wrapper method per ioctl, typed values in and out, errors
 * that name the ioctl and errno, and no policy, retries or event loops.
 *
 * - {@link KvmSystem} (`/dev/kvm`) → {@link KvmVm} → {@link KvmVcpu}
 * - {@link KvmExit}: what {@link KvmVcpu.run} returns, copied out of `kvm_run` (whose mapping
 *   stays private to the vCPU); answers go back through `completeIoIn` / `completeMmioRead` /
 *   `completeMsr` / `completePendingExit`
 * - {@link MemfdMapping}: guest RAM on a memfd
 * - {@link threadCpuNs}: the calling thread's CPU clock; {@link setThreadIdle}: `SCHED_IDLE` for it
 * - {@link VcpuRunners}: one thread per vCPU issuing `KVM_RUN`, for vCPUs that run in parallel
 * - slice preemption: {@link armSlice} / {@link consumeSliceSignal} / {@link runSignalMask}
 * - `raw`: struct layouts, ioctl numbers, libc
 *
 * Importing this module loads no native code: koffi is loaded by the first libc call
 * (`KvmSystem.open`, `MemfdMapping.create`, the slice timer).
 * @module
 */
export { TsvmError, KvmError, KvmUnavailableError, errnoName } from './errors.js';
export { KvmSystem } from './system.js';
export { KvmVm, type MemslotFlags } from './vm.js';
export { KvmVcpu, type KvmStateBlob } from './vcpu.js';
export type {
  KvmExit, KvmIoExit, KvmMmioExit, KvmHltExit, KvmShutdownExit, KvmIntrExit, KvmDebugExit, KvmHypercallExit,
  KvmMsrExit, KvmFailEntryExit, KvmInternalErrorExit, KvmSystemEventExit, KvmExceptionExit, KvmUnsupportedExit,
} from './exit.js';
export { MemfdMapping } from './memfd.js';
export { createLedger, attachLedger, releaseLedger, type LedgerRelease } from './ledger.js';
export { threadCpuNs } from './clock.js';
export { setThreadIdle, yieldThread } from './sched.js';
export { VcpuRunners } from './runner.js';
export { armSlice, disarmSlice, consumeSliceSignal, runSignalMask, sliceSignal } from './timer.js';
export type { Regs, Sregs, Segment, DTable, CpuidEntry, MsrEntry, CoalescedEntry } from './types.js';
export { REG_NAMES } from './types.js';
export { encodeRegs, decodeRegs, encodeSregs, decodeSregs, encodeCpuid, decodeCpuid } from './raw/codec.js';
export { KVM, KVM_CAP, KVM_EXIT, KVM_CONST, type KvmIoctl } from './raw/ioctls.js';
export { VCPU_EVENTS_OFFSETS, IOAPIC_REDIRTBL_OFFSET } from './raw/structs.js';
export { libc, errno as lastErrno, type Libc, type NativePointer } from './raw/libc.js';
