/**
 * `@tsvm/core` — assemble a monitored virtual machine from parts.
 *
 * - {@link Machine}: memory regions, one or more vCPUs, PIO/MMIO {@link Bus}es, hooks, and a
 *   time-sliced `run()` that returns a {@link Stop} (why it stopped) instead of throwing.
 * - {@link GuestMemory}: every guest-physical access is bounds-checked in one place.
 * - {@link Device}: the register-file contract devices implement; {@link yieldSlice} lets a
 *   device that hands work to another machine end the running slice so that machine runs now.
 * - {@link DeviceMemory} / {@link DmaGate}: devices reach guest RAM through a device-scoped
 *   accessor whose writes (DMA) pass one hook point, so a monitor mediates them like guest stores.
 * - {@link VcpuExit}: exits as a discriminated union; {@link handleExit} is the pure exit path
 *   (mediate hooks → device → observe hooks → deny by default).
 * - {@link Backend}: what Machine needs from a hypervisor; {@link KvmBackend} is the real one,
 *   `@tsvm/core/testing` has a `MockBackend`.
 * - Loaders ({@link loadElf}, {@link loadMultiboot}, {@link loadLinux}, {@link loadPvh}) place an
 *   image and return an entry state that {@link Machine.enter} applies.
 * - {@link Snapshot}: `machine.snapshot()`, `Machine.restore()`, `Machine.fork()` (copy-on-write
 *   RAM) and `machine.reset()` (re-copies dirty pages only).
 * - Record/replay: {@link record} a machine created on a {@link tappable} backend, then
 *   {@link replay} the {@link Recording} without its devices, under another monitor;
 *   {@link ReplayDivergence} names the first exit that differs.
 * - CPU models ({@link CPU_MODELS}, `Machine.create({ cpu: 'qemu64' })`): named CPUID templates
 *   intersected with the host's, so a test pins the features a guest sees.
 * - Errors: one hierarchy rooted at {@link TsvmError}.
 * @module
 */
export { Machine, MAX_VCPUS, type MachineOptions, type RegionOptions, type LoadFlatOptions, type RunOptions, type MachineEvents, type MachineLayout } from './machine.js';
export { yieldSlice } from './machine/run-loop.js';
export { Vcpu } from './vcpu.js';
export { GuestMemory, checkRegionSize, type HostMemory, type MemoryRegion, type IntWidth } from './memory.js';
export { DmaGate, DeviceMemory, DmaDeniedError, type DmaWrite, type DmaDecision, type DmaHook } from './dma.js';
export { gpa, hex, MAX_GUEST_PHYS, type GuestAddress } from './address.js';
export { Bus, type BusEntry, type BusRange, type RangeSpec } from './bus.js';
export type { Device, Access, AccessSize, DeviceStopRequest, IrqLine, DeviceMapping } from './device.js';
export { EXIT_KINDS, describeExit, exitValue, emulationFailure, INTERNAL_ERROR_EMULATION, EMULATION_FLAG_INSTRUCTION_BYTES } from './exits.js';
export type { VcpuExit, ExitKind, IoExit, MmioExit, HltExit, ShutdownExit, DebugExit, HypercallExit, MsrExit, IntrExit, FailEntryExit, InternalErrorExit, SystemEventExit, ExceptionExit, UnsupportedExit } from './exits.js';
export { handleExit, checkDecision, type ExitContext, type MsrAccess, type ExitOutcome } from './handle-exit.js';
export type { ExitHook, HookDecision, HookInfo, HookStats, DenyEffect } from './hooks.js';
export type { Stop, StopCommon, StopReason, StopRequest } from './stop.js';
export { ExitCounters, type ExitStats, type ExitKindStats } from './stats.js';
export type { Backend, BackendVm, BackendVcpu, BackendRunners, BackendVmOptions, EntryPrelude, HostCapabilities, NmiWakeState, VirtFlavour, Regs, Sregs, Segment, DTable, CpuidEntry, MsrEntry, CoalescedEntry } from './backend.js';
export { KvmBackend, kvmBackend } from './backend/kvm.js';
export {
  Snapshot, parseManifest, SNAPSHOT_FORMAT, SNAPSHOT_VERSION, TSVM_VERSION, measureDirtyTracking, cheaperDirtyTracking,
  type PrewarmOptions, type DirtyTracking, type DirtyTrackingPrices, type RestoreOptions, type ResetResult, type ResetOptions, type SnapshotManifest, type SnapshotRegion, type SnapshotVcpu, type SnapshotHost,
} from './snapshot/index.js';
export * from './loaders/index.js';
export { EXCEPTION_PORT, SYSTEM_AREA_SIZE, SEL, type CpuMode } from './cpu/x86.js';
export { bitnessOf, linearRip, translateVirtual, codeAt } from './cpu/paging.js';
export { RESERVED_PORTS, PROBE_PORT, HYPERCALL_PORT, type ReservedPorts } from './reserved.js';
export {
  accessingInstruction, decodeIoInstruction, movesRip, IO_INSTRUCTION_CLASSES, RIP_ON_INSTRUCTION,
  type IoInstruction, type IoInstructionClass, type IoRipBehaviour, type IoRipRule, type IoCpuView,
} from './cpu/io-rip.js';
export { instructionRipOf, readCodeBytes } from './cpu/exit-rip.js';
export {
  CPU_MODELS,
  CPU_FEATURES,
  CPU_FEATURE_REGISTERS,
  CpuModelError,
  applyCpuModel,
  cpuFeatureWords,
  cpuHasFeature,
  recordedCpuModel,
  resolveCpuModel,
  type AppliedCpuModel,
  type CpuFeature,
  type CpuFeatureRegister,
  type CpuFeatureWords,
  type CpuModel,
  type CpuModelName,
  type CpuModelSpec,
} from './cpu/models.js';
export { probeCpuidControl, type CpuidControl } from './cpu/cpuid-probe.js';
export { probeIoRip, type IoRipProbeResult } from './backend/io-rip-probe.js';
export {
  TsvmError, KvmError, KvmUnavailableError, errnoName, InvalidArgumentError, GuestMemoryError, StateError,
  SnapshotFormatError, ImageFormatError, MonitorViolation, HookFailure, WorkerExitedError,
} from './errors.js';
export {
  tappable, countsAsGuestExit, record, startRecording, rdtscTrapped, Recorder, replay, ReplayDivergence,
  parseLog, encodeLog, snapshotDigest, REPLAY_FORMAT, REPLAY_VERSION,
  type RecordOptions, type Recording, type ReplayOptions, type ReplayResult,
  type ReplayLog, type LoggedExit, type LoggedDma, type LoggedIrq, type LoggedStop,
} from './replay/index.js';
