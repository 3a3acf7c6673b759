/**
 * The `Backend` contract: everything `Machine` needs from a hypervisor. `@tsvm/kvm-backend`
 * implements it through `kvmBackend()`; `@tsvm/core/testing` has a `MockBackend` that replays
 * scripted exits, so the whole exit path is testable without `/dev/kvm`.
 * @module
 */
import type { CoalescedEntry, CpuidEntry, MsrEntry, Regs, Sregs } from '@tsvm/kvm-backend';
import type { HostMemory } from './memory.js';
import type { VcpuExit } from './exits.js';
import type { IoRipBehaviour } from './cpu/io-rip.js';
import type { CpuidControl } from './cpu/cpuid-probe.js';

export type { Regs, Sregs, Segment, DTable, CpuidEntry, MsrEntry, CoalescedEntry } from '@tsvm/kvm-backend';

/** Which hardware virtualization KVM uses on this host. */
export type VirtFlavour = 'vmx' | 'svm' | 'pvm' | 'mock' | 'unknown';

/** What the host's KVM offers, discovered at open time (never assumed). */
export interface HostCapabilities {
  /** Detected virtualization flavour. */
  readonly flavour: VirtFlavour;
  /** Read-only memslots (`KVM_CAP_READONLY_MEM`). */
  readonly readonlyMemory: boolean;
  /** Coalesced MMIO ring. */
  readonly coalescedMmio: boolean;
  /** Coalesced PIO (`KVM_CAP_COALESCED_PIO`). */
  readonly coalescedPio: boolean;
  /** In-kernel irqchip. */
  readonly irqchip: boolean;
  /** User-space MSR exits and MSR filtering. */
  readonly userSpaceMsr: boolean;
  /** `KVM_SET_GUEST_DEBUG` accepted (whether it *works* per CPL is for calibration to find out). */
  readonly guestDebug: boolean;
  /** Dirty-page ring (acquire/release). */
  readonly dirtyLogRing: boolean;
  /** `KVM_CAP_IMMEDIATE_EXIT`. */
  readonly immediateExit: boolean;
  /** ioeventfd / irqfd. */
  readonly eventfds: boolean;
  /** Maximum number of memslots. */
  readonly maxMemslots: number;
  /**
   * Where RIP is at a port-I/O exit, per instruction form: learned by running each form once
   * when the backend opens (see `probeIoRip`), because flavours differ (PVM completes an `out`
   * before exiting, VMX/SVM do not) and `kvm_run` does not say.
   */
  readonly ioExitRip: IoRipBehaviour;
}

/** Options for creating a VM. */
export interface BackendVmOptions {
  /** Create the in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT. */
  readonly irqchip: boolean;
  /**
   * Optional: track dirty pages with a ring of this many bytes per vCPU instead of a bitmap per
   * memslot (KVM: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`). {@link BackendVm.dirtyLog} keeps its meaning.
   * A backend that cannot falls back to the bitmap: {@link BackendVm.dirtyTracking} says which it
   * used.
   */
  readonly dirtyRing?: number;
}

/** A hypervisor. */
export interface Backend {
  /** `'kvm'`, `'mock'`, ... */
  readonly name: string;
  /** What this host supports. */
  readonly capabilities: HostCapabilities;
  /** Creates an empty VM. */
  createVm(options: BackendVmOptions): BackendVm;
  /**
   * CPU time of the calling thread in nanoseconds, guest time inside `KVM_RUN` included as the
   * kernel accounts it; absent where the backend cannot tell (then `Stop.cpuMs` is absent).
   */
  threadCpuNs?(): number;
  /**
   * Which CPUID feature bits this host can hide from ring-0 code (learned once, on first use).
   * A backend without it controls every bit (a mock, or a restore's wrapper).
   */
  cpuidControl?(): CpuidControl;
  /**
   * Optional: memory that belongs to no VM, as {@link BackendVm.allocateMemory} makes it (a
   * snapshot's image). Without it a snapshot makes a VM to allocate from (KVM: creating and
   * destroying one costs ~1–4 ms on PVM).
   */
  allocateMemory?(size: number, name: string): HostMemory;
}

/** A VM as the backend sees it. */
export interface BackendVm {
  /** Allocates host memory suitable for a memslot. */
  allocateMemory(size: number, name: string): HostMemory;
  /**
   * Maps `size` bytes of `source` (memory from {@link allocateMemory}, e.g. a snapshot's image)
   * from `offset` copy-on-write: the result starts with `source`'s contents, shares its pages
   * until written, and writes through it never reach `source` or other such mappings (fork).
   */
  allocateMemoryFrom(source: HostMemory, offset: number, size: number, name: string): HostMemory;
  /**
   * VM-wide state blobs for snapshots: the in-kernel irqchip (`pic-master`, `pic-slave`,
   * `ioapic`) and PIT (`pit2`) when the VM has them, and the clock (`clock`).
   */
  getState(): Record<string, Uint8Array>;
  /** Restores blobs from {@link getState}; unknown names are rejected, not ignored. */
  setState(state: Readonly<Record<string, Uint8Array>>): void;
  /** Installs (or replaces) memslot `slot`. */
  mapMemory(slot: number, start: bigint, host: HostMemory, size: number, flags: { readonly: boolean; logDirty: boolean }): void;
  /** Deletes memslot `slot`. */
  unmapMemory(slot: number): void;
  /** Returns and clears the dirty bitmap of `slot` (one bit per 4 KiB page). */
  dirtyLog(slot: number, size: number): Uint8Array;
  /**
   * Optional: {@link dirtyLog} for a reset, as page indices in the slot. A reset copies the
   * snapshot's bytes back over every page named, so it may be told more pages than were
   * written: a superset of the pages written since the last call, possibly cheaper to learn
   * (KVM's rings: pages named once may stay writable instead of being write-protected again by
   * an ioctl, and are named at each later call). A page of `exact` is never named without
   * having been written: when one is dirty, the VM write-protects again.
   */
  dirtyPagesForReset?(slot: number, size: number, exact: readonly number[]): readonly number[];
  /**
   * Optional: how {@link dirtyLog} learns what was written: `'log'`, the kernel's bitmap per
   * memslot (absent means this), or `'ring'`, per-vCPU rings harvested into bitmaps.
   */
  readonly dirtyTracking?: 'log' | 'ring';
  /** Drives an interrupt line of the in-kernel irqchip. */
  irqLine(irq: number, level: boolean): void;
  /** Routes accesses in a range to the coalesced ring instead of exiting. */
  registerCoalesced(address: bigint, size: number, pio: boolean): void;
  /** Undoes {@link registerCoalesced}. */
  unregisterCoalesced(address: bigint, size: number, pio: boolean): void;
  /** Enables user-space MSR exits for the given filter (indices that exit). */
  setMsrIntercepts(reads: readonly number[], writes: readonly number[]): void;
  /** Creates vCPU `id`. */
  createVcpu(id: number): BackendVcpu;
  /**
   * Optional: threads that run these vCPUs (all of this VM's, in order) in parallel, for
   * `vcpuThreads: 'parallel'`. Started once per machine; closed before the vCPUs are.
   */
  startRunners?(vcpus: readonly BackendVcpu[]): Promise<BackendRunners>;
  /** Releases the VM. vCPUs and memory are closed first by the caller. */
  close(): void;
  /**
   * Optional: like {@link close}, with the kernel's teardown on another thread; resolves when
   * the kernel has released the VM. The VM is unusable as soon as this returns.
   */
  closeInBackground?(): Promise<void>;
}

/**
 * One thread per vCPU that enters the guest for it, so the vCPUs of one machine run at the same
 * time. The thread that owns the machine starts each run, learns when any run ended, and decodes
 * and answers every exit itself, one at a time: hooks and devices never run on a runner.
 * Between {@link start} of vCPU `i` and {@link wait} returning `i`, nothing may touch vCPU `i`.
 */
export interface BackendRunners {
  /**
   * Starts vCPU `i`'s next run (returns at once). With `sliceNs > 0` a new time slice starts:
   * that run, or a later one started without a new slice, returns an `intr` exit at most
   * `sliceNs` later.
   */
  start(i: number, sliceNs: number): void;
  /**
   * Blocks the calling thread up to `timeoutMs` until a started run ends; returns its vCPU
   * index (read the exit with {@link exit}) or -1 when none ended in time.
   */
  wait(timeoutMs: number): number;
  /** The exit of vCPU `i`'s run that {@link wait} just returned, as `BackendVcpu.run()` would return it (and throw). */
  exit(i: number): VcpuExit;
  /** Makes vCPU `i`'s started run end soon (an `intr` exit, unless a real one came first). */
  interrupt(i: number): void;
  /** Whether vCPU `i`'s run was started and not yet returned by {@link wait}. */
  busy(i: number): boolean;
  /** Ends the threads; a run still in flight is interrupted and its exit dropped. Idempotent. */
  close(): void;
}

/**
 * A host-written stub the vCPU runs first at its next entry, instead of a state ioctl: reset's
 * way to load the snapshot's x87/SSE registers (an `fxrstor` at CPL3, ~0.1 µs, where the
 * `KVM_SET_XSAVE` it replaces loads the vCPU, ~7 µs on PVM), then `jmp` through a cell in guest
 * RAM to the guest's next instruction. Until the stub has run, RIP reads as that instruction,
 * a RIP written goes to the cell, and any other state access through KVM first does the stub's
 * work by ioctl (so the host never sees the stub in the vCPU's state).
 */
export interface EntryPrelude {
  /** Guest address of the stub's first instruction. */
  readonly at: bigint;
  /** The stub's length in bytes. */
  readonly length: number;
  /** The state blob the stub loads, for the ioctl that replaces it when it cannot run. */
  readonly blob: string;
  /** That blob's bytes. */
  readonly bytes: Uint8Array;
  /** Rewrites the cell the stub jumps through (RIP changed before the stub ran). */
  retarget(rip: bigint): void;
  /**
   * Called when the vCPU takes the prelude (after `done` of one it supersedes, which may share
   * the stub's place): the caller puts the stub in place.
   */
  arm(): void;
  /** Called once, when the stub has run or its work was done by ioctl: the caller takes the stub away. */
  done(): void;
}

/**
 * What could still wake a vCPU that is halted with `IF=0`: an NMI (and, with several vCPUs,
 * an INIT or NMI IPI from another vCPU, which the run loop checks for itself). Read from `KVM_GET_VCPU_EVENTS`, the LAPIC registers and the IOAPIC.
 */
export interface NmiWakeState {
  /** An NMI is pending or being injected (`nmi.pending` / `nmi.injected`). */
  readonly pending: boolean;
  /** NMIs are blocked until the next `iret` (`nmi.masked`: the vCPU halted inside an NMI handler). */
  readonly masked: boolean;
  /**
   * Some source is configured to deliver an NMI: an unmasked LAPIC LINT0 (the PIT's NMI-watchdog
   * path) or performance-counter LVT in NMI delivery mode, or an unmasked IOAPIC redirection entry
   * in NMI delivery mode. LINT1 is not counted: only a host `KVM_NMI` drives it, which tsvm never
   * issues. Names the first source found, for diagnostics.
   */
  readonly source: string | undefined;
}

/** A vCPU as the backend sees it. */
export interface BackendVcpu {
  /** vCPU index. */
  readonly id: number;
  /** Runs until the next exit and decodes it (data copied out). */
  run(): VcpuExit;
  /** Supplies the data of an `in` or MMIO read before the next `run()`. */
  completeRead(data: Uint8Array): void;
  /**
   * Abandons the pending I/O or MMIO exit and raises exception `vector` (with `errorCode`) on
   * the instruction that caused it, at `rip` (the caller derives it: on some flavours RIP has
   * already moved past an `out`): the access has no effect and the guest's handler sees the
   * faulting RIP.
   */
  faultInstruction(vector: number, errorCode: number | undefined, rip: bigint): void;
  /** Supplies the result of an MSR exit before the next `run()`. */
  completeMsr(data: bigint, error: boolean): void;
  /** Starts a time slice: `run()` returns an `intr` exit at most `ns` later. */
  beginSlice(ns: number): void;
  /** Ends the slice (disarms preemption). */
  endSlice(): void;
  /** General-purpose registers. */
  getRegs(): Regs;
  /** Sets general-purpose registers. */
  setRegs(regs: Regs): void;
  /** Special registers. */
  getSregs(): Sregs;
  /** Sets special registers. */
  setSregs(sregs: Sregs): void;
  /** Sets the CPUID table the guest sees. */
  setCpuid(entries: readonly CpuidEntry[]): void;
  /** CPUID leaves the host supports (the default table). */
  supportedCpuid(): CpuidEntry[];
  /** Reads MSRs. */
  getMsrs(indices: readonly number[]): MsrEntry[];
  /** Writes MSRs. */
  setMsrs(entries: readonly MsrEntry[]): void;
  /** Whether the vCPU is halted in the kernel (in-kernel irqchip). */
  isHalted(): boolean;
  /**
   * Whether the vCPU waits for INIT/SIPI (an application processor not yet started, or one an
   * INIT stopped): `KVM_RUN` would only sleep until another vCPU's IPI or the slice timer.
   * Always false without an in-kernel irqchip.
   */
  waitingForSipi(): boolean;
  /** Whether an NMI could still wake it (see {@link NmiWakeState}); only meaningful with an in-kernel irqchip. */
  nmiWakeState(): NmiWakeState;
  /** Configures guest debug (`KVM_GUESTDBG_*` control flags, debug registers). */
  setGuestDebug(control: number, debugreg?: readonly bigint[]): void;
  /** Drains the coalesced ring. */
  drainCoalesced(): CoalescedEntry[];
  /**
   * Finishes the exit `run()` last returned without running further guest code, as KVM
   * requires before state is saved (an `in`/`out` or MMIO access completes on the next
   * `KVM_RUN`). An unanswered read reads all-ones. A no-op when nothing is pending.
   */
  completePendingExit(): void;
  /**
   * Optional: {@link completePendingExit} without entering the kernel when the pending exit has
   * nothing left to complete (KVM: an `out` on a host whose emulator finished it before exiting,
   * which `capabilities.ioExitRip` shows as RIP already past it). Same result, one ioctl less.
   */
  settlePendingExit?(): void;
  /**
   * Optional: does the work of an entry prelude {@link loadState} left pending (its stub has not
   * run) now, by ioctl; the prelude's `done` runs. A no-op without one.
   */
  settlePrelude?(): void;
  /**
   * Optional: puts `image` (registers, special registers and the blobs of {@link getState}) into the vCPU at the least cost this host allows, for a reset —
   * the KVM backend writes registers, special registers and vCPU events into `kvm_run`
   * (`KVM_CAP_SYNC_REGS`), which the next `KVM_RUN` loads without an ioctl each, and the other
   * blobs with one ioctl each; reading any of that state back before the next run sees the new
   * values. Returns `false`, having changed nothing, where it cannot (no sync area for all
   * three, an exit still pending, an in-kernel LAPIC, a vCPU not runnable): the caller then uses
   * {@link setRegs}, {@link setSregs} and {@link setState}. MSRs are not part of it.
   * With `prelude`, the vCPU enters at the prelude's stub, which loads one blob in the guest
   * and jumps to `image.regs.rip` (see {@link EntryPrelude}).
   */
  loadState?(image: { readonly regs: Regs; readonly sregs: Sregs; readonly blobs: Readonly<Record<string, Uint8Array>> }, prelude?: EntryPrelude): boolean;
  /**
   * Optional: whether KVM guest debugging is on (the last {@link setGuestDebug} set
   * `KVM_GUESTDBG_ENABLE`). A backend without it is taken to be debugging.
   */
  guestDebugging?(): boolean;
  /**
   * Optional: counts the writes of special registers, MSRs, state blobs, CPUID and guest-debug
   * settings through this vCPU (not of registers, not {@link loadState}). Reset compares it to
   * see whether the host changed state a CPL3 guest cannot (then it puts everything back).
   */
  stateVersion?(): number;
  /** The MSRs KVM saves and restores for a vCPU (`KVM_GET_MSR_INDEX_LIST`). */
  msrIndexList(): readonly number[];
  /**
   * Opaque state blobs for snapshots (`fpu`, `xsave`, `xcrs`, `lapic`, `events`, `debugregs`,
   * `mp-state`; each only where the host has it).
   */
  getState(): Record<string, Uint8Array>;
  /** Restores blobs from {@link getState}. */
  setState(state: Record<string, Uint8Array>): void;
  /** Releases the vCPU. */
  close(): void;
}
