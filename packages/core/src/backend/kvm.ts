/**
 * The real backend: `Backend` implemented on `@tsvm/kvm-backend`. This is where policy that
 * the raw layer must not have lives: capability discovery, the preemption signal mask, which
 * completion an exit's answer goes to, and how a fault is injected. Decoding `kvm_run` is
 * kvm-backend's: its `KvmExit` has exactly the shape of {@link VcpuExit}, so `run()` passes
 * the decoded object through with no second copy (the compiler checks the shapes agree).
 * @module
 */
import { readFileSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';
import {
  KVM_CAP, KVM_CONST, KVM_EXIT, KvmSystem, MemfdMapping, VcpuRunners, armSlice, disarmSlice,
  consumeSliceSignal, runSignalMask, threadCpuNs, KvmError, VCPU_EVENTS_OFFSETS as EV, IOAPIC_REDIRTBL_OFFSET,
  type KvmVcpu, type KvmVm, type CpuidEntry,
} from '@tsvm/kvm-backend';
import type { Backend, BackendRunners, BackendVcpu, BackendVm, BackendVmOptions, EntryPrelude, HostCapabilities, NmiWakeState, Regs, Sregs, VirtFlavour } from '../backend.js';
import type { HostMemory } from '../memory.js';
import type { VcpuExit } from '../exits.js';
import { RIP_ON_INSTRUCTION } from '../cpu/io-rip.js';
import { probeIoRip, type IoRipProbeResult } from './io-rip-probe.js';
import { probeCpuidControl, type CpuidControl } from '../cpu/cpuid-probe.js';
import { capturePowerOn, wipeVcpu, type PowerOnImage } from './kvm-wipe.js';

function detectFlavour(): VirtFlavour {
  try {
    const mods = readFileSync('/proc/modules', 'utf8');
    if (/^kvm_pvm /m.test(mods)) return 'pvm';
    if (/^kvm_intel /m.test(mods)) return 'vmx';
    if (/^kvm_amd /m.test(mods)) return 'svm';
  } catch { /* /proc/modules may be absent in containers */ }
  try {
    const dirs = ['kvm_pvm', 'kvm_intel', 'kvm_amd'] as const;
    const map: Record<(typeof dirs)[number], VirtFlavour> = { kvm_pvm: 'pvm', kvm_intel: 'vmx', kvm_amd: 'svm' };
    for (const d of dirs) {
      try { readFileSync(`/sys/module/${d}/parameters/${d === 'kvm_pvm' ? 'force' : 'nested'}`); return map[d]; } catch { /* next */ }
    }
  } catch { /* ignore */ }
  return 'unknown';
}

/** The KVM backend. Opening it opens `/dev/kvm` once; VMs share that fd. */
export class KvmBackend implements Backend {
  /** Always `'kvm'`. */
  readonly name = 'kvm';
  /** What this host's KVM offers. */
  readonly capabilities: HostCapabilities;
  /** The open `/dev/kvm`. */
  readonly system: KvmSystem;
  /** `KVM_CAP_SYNC_REGS` offers the general-purpose registers (`KVM_SYNC_X86_REGS`). */
  readonly syncRegs: boolean;
  /** `KVM_CAP_SYNC_REGS` also offers the special registers (`KVM_SYNC_X86_SREGS`). */
  readonly syncSregs: boolean;
  /** `KVM_CAP_SYNC_REGS` also offers the vCPU events (`KVM_SYNC_X86_EVENTS`): with all three, a reset loads them at no ioctl. */
  readonly syncEvents: boolean;
  /**
   * A VM of this backend found its dirty ring overflowed (see `BackendVm.dirtyTracking`): rings
   * are not chosen by price any more in this process (`cheaperDirtyTracking`).
   */
  ringOverflowSeen = false;
  /** What the I/O-exit RIP probe found when this backend opened (`capabilities.ioExitRip`). */
  readonly ioRipProbe: IoRipProbeResult;
  #cpuid: CpuidEntry[] | undefined;
  #msrs: readonly number[] | undefined;
  readonly #tss: boolean;
  /**
   * Up to {@link SPARES} VMs (with vCPU 0) made ahead per irqchip kind, so `Machine.create` does
   * not wait for the kernel's VM creation (~0.3–0.6 ms on PVM): prepared one after another with
   * async ioctls on libuv's thread pool after each take, off the event loop (two, so a loop that
   * creates back to back still finds one). `TSVM_SPARE_VM=0` turns it off.
   */
  readonly #spares = new Map<boolean, Array<{ vm: KvmVm; vcpu: KvmVcpu }>>();
  readonly #preparing = new Map<boolean, Promise<void>>();
  #spareOn = false; // on once the constructor's probe VM is made (it needs no spare)
  #closed = false;
  /**
   * Closed plain machines' VMs (with vCPU 0 and guest RAM at slot 0), wiped, for the next plain
   * `createVm(…, true)`: at most {@link KEPT_VMS}. Each is fresh to its next guest (vCPU back to
   * {@link #powerOn}, RAM a new zero-filled memfd) and reached by no handle of its old machine.
   * `TSVM_RECYCLE_VM=0` turns it off.
   */
  readonly #kept: KeptVm[] = [];
  /** What a brand-new vCPU looks like: `undefined` until the first plain vCPU, `null` where it cannot be captured (nothing is kept then). */
  #powerOn: PowerOnImage | null | undefined;
  readonly #keepOn = process.env['TSVM_RECYCLE_VM'] !== '0';
  /** How many VMs {@link createVm} took from closed machines (diagnostics and tests). */
  recycledVms = 0;

  /** Opens `/dev/kvm` (throws `KvmUnavailableError` with a reason). */
  constructor(path = '/dev/kvm') {
    this.system = KvmSystem.open(path);
    const s = this.system;
    const sync = process.env['TSVM_NO_SYNC_REGS'] === '1' ? 0 : s.checkExtension(KVM_CAP.SYNC_REGS);
    this.syncRegs = (sync & KVM_CONST.SYNC_X86_REGS) !== 0;
    this.syncSregs = this.syncRegs && (sync & KVM_CONST.SYNC_X86_SREGS) !== 0;
    this.syncEvents = this.syncRegs && (sync & KVM_CONST.SYNC_X86_EVENTS) !== 0;
    this.capabilities = {
      flavour: detectFlavour(),
      readonlyMemory: s.has('READONLY_MEM'),
      coalescedMmio: s.has('COALESCED_MMIO'),
      coalescedPio: s.has('COALESCED_PIO'),
      irqchip: s.has('IRQCHIP'),
      userSpaceMsr: s.has('X86_USER_SPACE_MSR') && s.has('X86_MSR_FILTER'),
      guestDebug: s.has('SET_GUEST_DEBUG'),
      dirtyLogRing: s.has('DIRTY_LOG_RING_ACQ_REL'),
      immediateExit: s.has('IMMEDIATE_EXIT'),
      eventfds: s.has('IOEVENTFD') && s.has('IRQFD'),
      maxMemslots: s.has('NR_MEMSLOTS') ? s.checkExtension(KVM_CAP.NR_MEMSLOTS) : 32,
      ioExitRip: RIP_ON_INSTRUCTION,
    };
    this.#tss = s.has('SET_TSS_ADDR');
    // Learned, not assumed: the probe VM runs on this very backend (it needs only createVm).
    this.ioRipProbe = probeIoRip(this);
    this.capabilities = { ...this.capabilities, ioExitRip: this.ioRipProbe.behaviour };
    // Only on the main thread: koffi's async calls complete through the thread's event loop, and
    // a worker terminated with one in flight aborts the whole process (napi_throw during the
    // worker's teardown, seen when a MachineWorker was terminated mid-spin).
    this.#spareOn = isMainThread && process.env['TSVM_SPARE_VM'] !== '0';
  }

  /**
   * The CPUID table a new vCPU gets: what this host's KVM supports, plus the "running under a
   * hypervisor" bit (leaf 1, ECX bit 31) that `KVM_GET_SUPPORTED_CPUID` leaves clear and every
   * VMM sets. Without it Linux never looks at KVM's leaves (0x40000000+), so it gets no
   * kvm-clock and must calibrate the TSC against the PIT, which fails on slow hosts. Cached.
   */
  supportedCpuid(): CpuidEntry[] {
    this.#cpuid ??= withHypervisorBit(this.system.supportedCpuid());
    return this.#cpuid;
  }

  /** Which CPUID bits ring-0 code cannot be kept from seeing here: a probe VM, run once, on first use. */
  cpuidControl(): CpuidControl {
    return probeCpuidControl(this);
  }

  /** The MSRs KVM saves and restores (`KVM_GET_MSR_INDEX_LIST`), asked once. */
  msrIndexList(): readonly number[] {
    this.#msrs ??= Object.freeze(this.system.msrIndexList());
    return this.#msrs;
  }

  /** `CLOCK_THREAD_CPUTIME_ID` of the calling thread (see `threadCpuNs` in kvm-backend for what PVM leaves out). */
  threadCpuNs(): number {
    return threadCpuNs();
  }

  /** A memfd mapped shared, of no VM (a snapshot's image). */
  allocateMemory(size: number, name: string): HostMemory {
    return MemfdMapping.create(size, name);
  }

  /** Creates a VM: the spare one made ahead when there is one, and starts making the next. */
  createVm(options: BackendVmOptions): BackendVm {
    return this.#createVm(options, false);
  }

  /**
   * {@link createVm} for a plain machine (`Machine.create` with one vCPU on this thread, no
   * irqchip, no CPU model: its vCPU keeps the default CPUID, which is what lets a wipe check
   * it): a closed plain machine's wiped VM comes first, and this VM may be kept, wiped, when its
   * machine closes (see {@link keptVms}).
   */
  createPlainVm(): BackendVm {
    return this.#createVm({ irqchip: false }, true);
  }

  #createVm(options: BackendVmOptions, plain: boolean): BackendVm {
    // A dirty ring must be enabled before the first vCPU exists, which a spare already has.
    if (options.dirtyRing !== undefined && this.capabilities.dirtyLogRing) return this.#createVmNow(options);
    const reuse = plain && !options.irqchip && options.dirtyRing === undefined;
    const kept = reuse ? this.#kept.shift() : undefined;
    if (kept) {
      this.recycledVms++;
      return new KvmBackendVm(kept.vm, this, false, kept.vcpu, undefined, { memory: kept.memory });
    }
    const spare = this.#spares.get(options.irqchip)?.shift();
    if (spare) {
      this.#refill(options.irqchip);
      return new KvmBackendVm(spare.vm, this, options.irqchip, spare.vcpu, undefined, reuse ? {} : undefined);
    }
    const made = this.#createVmNow(options, reuse);
    this.#refill(options.irqchip);
    return made;
  }

  /** How many closed machines' VMs are kept, wiped, for the next plain create. */
  keptVms(): number {
    return this.#kept.length;
  }

  /**
   * Destroys the kept VMs (see {@link createVm}); resolves when the kernel has released them.
   * Later plain machines are kept again as they close.
   */
  async dropKeptVms(): Promise<void> {
    await Promise.all(this.#kept.splice(0).map((k) => closeKept(k)));
  }

  /**
   * @internal The first plain vCPU, brand new (never run): its state becomes the power-on
   * image wipes restore. Once per backend; a host where it cannot be captured keeps no VMs.
   */
  notePowerOn(v: KvmVcpu, vm: KvmVm): void {
    if (this.#powerOn !== undefined || !this.#keepOn) return;
    try { this.#powerOn = capturePowerOn(v, this.msrIndexList(), (x) => vm.vcpuCpuidBytes(x)); } catch { this.#powerOn = null; }
  }

  /**
   * @internal Takes a closed plain machine's VM if there is room: wipes its vCPU (throws, and
   * takes nothing, when that fails) and keeps the result. `false`: not taken, destroy it.
   */
  keep(take: () => KeptVm | undefined): boolean {
    const image = this.#powerOn;
    if (!this.#keepOn || this.#closed || !image || this.#kept.length >= KEPT_VMS) return false;
    const k = take();
    if (!k) return false;
    this.#kept.push(k);
    return true;
  }

  /** @internal Puts a used vCPU back to the power-on image (see `kvm-wipe.ts`). */
  wipe(v: KvmVcpu, vm: KvmVm): void {
    if (!this.#powerOn) throw new KvmError('wipe', 22, 'no power-on image on this host');
    wipeVcpu(v, this.#powerOn, (x) => vm.vcpuCpuidBytes(x));
  }

  /** How many spare VMs of this irqchip kind are ready now (diagnostics). */
  sparesReady(irqchip: boolean): number {
    return this.#spares.get(irqchip)?.length ?? 0;
  }

  /** Resolves when no spare VM is being prepared (a test counting fds waits for it). */
  async settled(): Promise<void> {
    while (this.#preparing.size > 0) await Promise.all([...this.#preparing.values()]);
  }

  #refill(irqchip: boolean): void {
    const ready = this.#spares.get(irqchip) ?? [];
    this.#spares.set(irqchip, ready);
    if (!this.#spareOn || this.#closed || ready.length >= SPARES || this.#preparing.has(irqchip)) return;
    let ok = false;
    const p = this.#prepareSpare(irqchip).then(
      (s) => { if (this.#closed || ready.length >= SPARES) { s.vcpu.close(); s.vm.close(); } else { ready.push(s); ok = true; } },
      () => { /* no spare this time: the next create makes its VM itself */ },
    ).finally(() => {
      this.#preparing.delete(irqchip);
      if (ok) this.#refill(irqchip); // the next one, until SPARES are ready
    });
    this.#preparing.set(irqchip, p);
  }

  async #prepareSpare(irqchip: boolean): Promise<{ vm: KvmVm; vcpu: KvmVcpu }> {
    // Every step on the thread pool: nothing of it runs on the event loop (measured: doing the
    // small ioctls in a continuation here put ~0.2 ms into whatever awaited next, e.g. close()).
    const vm = await this.system.createVmAsync();
    try {
      const vcpu = await vm.prepareAsync({
        ...(this.#tss ? { tssAddress: 0xfffbd000 } : {}),
        ...(irqchip ? { pitFlags: KVM_CONST.PIT_SPEAKER_DUMMY } : {}),
        cpuid: this.supportedCpuid(),
        signalMask: runSignalMask(), // this (the calling) thread's mask: the one that runs it
      });
      return { vm, vcpu };
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  #createVmNow(options: BackendVmOptions, plain = false): BackendVm {
    const vm = retryInterrupted(() => this.system.createVm());
    try {
      // Intel needs a TSS and identity map page for real mode; harmless elsewhere. Placed in
      // the 3 pages below 4 GiB that firmware traditionally reserves (never guest RAM here).
      if (this.#tss) vm.setTssAddr(0xfffbd000);
      if (options.irqchip) {
        vm.createIrqchip();
        // Without SPEAKER_DUMMY KVM leaves port 0x61 (PIT channel 2 gate/output, which Linux
        // reads to calibrate the TSC) to userspace; with it the kernel answers like a PC.
        vm.createPit2(KVM_CONST.PIT_SPEAKER_DUMMY);
      }
    } catch (e) {
      vm.close();
      throw e;
    }
    let ring: number | undefined;
    if (options.dirtyRing !== undefined && this.capabilities.dirtyLogRing) {
      const max = this.system.checkExtension(KVM_CAP.DIRTY_LOG_RING_ACQ_REL);
      // A power of two of whole pages, within what the host allows; the bitmap where it refuses.
      let bytes = 4096;
      while (bytes * 2 <= Math.min(options.dirtyRing, max)) bytes *= 2;
      try { vm.enableDirtyRing(bytes); ring = bytes; } catch { ring = undefined; }
    }
    return new KvmBackendVm(vm, this, options.irqchip, undefined, ring, plain && ring === undefined ? {} : undefined);
  }

  /** Closes the spare and kept VMs and `/dev/kvm`. */
  close(): void {
    this.#closed = true;
    for (const list of this.#spares.values()) for (const { vm, vcpu } of list.splice(0)) { vcpu.close(); vm.close(); }
    for (const k of this.#kept.splice(0)) { k.vcpu.close(); k.memory.close(); k.vm.close(); }
    this.system.close();
  }
}

/** @internal The KVM backend's VM (exported for `restore.ts`'s use of {@link KvmBackendVm.detachForFork}). */
export class KvmBackendVm implements BackendVm {
  readonly #vm: KvmVm;
  readonly #backend: KvmBackend;
  readonly #dirtyBufs = new Map<number, MemfdMapping>();
  #msrFilterEnabled = false;

  readonly #irqchip: boolean;
  /** vCPU 0, made ahead with the VM (a spare), until `createVcpu(0)` takes it. */
  #ready0: KvmVcpu | undefined;
  /** Bytes of each vCPU's dirty ring, when the VM tracks dirty pages with rings. */
  readonly #ringBytes: number | undefined;
  /** The vCPUs whose rings are harvested (all of them). */
  readonly #ringVcpus: KvmVcpu[] = [];
  /** Pages (indices in their slot) harvested from the rings and not yet named by a report, per memslot. */
  readonly #ringPages = new Map<number, Set<number>>();
  /**
   * Pages `dirtyPagesForReset` named and left writable (not write-protected again), per memslot:
   * writes to them leave no ring entry, so every later report names them until the rings are
   * reset (`#reprotect`), which moves them into `#ringPages`.
   */
  readonly #sticky = new Map<number, Set<number>>();
  /** Pages in `#sticky`. */
  #stickyPages = 0;
  /** Ring entries taken since the last `KVM_RESET_DIRTY_RINGS` (they hold ring slots until it). */
  #unreset = 0;
  /** `'ring'` when this VM's dirty pages come from per-vCPU rings. */
  readonly dirtyTracking: 'log' | 'ring';
  /**
   * A plain VM (see `KvmBackend.createVm`): kept, wiped, when its machine closes. Anything a
   * wipe does not undo (another memslot or flag, coalesced zones, MSR filters, irq lines, VM
   * state, more vCPUs, runner threads, RAM mapped from another file) makes it not plain.
   */
  #plain: boolean;
  /** vCPU 0 came from a kept VM (used before: not a power-on sample). */
  readonly #reused: boolean;
  /** A kept VM's RAM, registered at slot 0 from guest address 0, until a region takes it. */
  #premade: MemfdMapping | undefined;
  #premadeGiven = false;
  /** The RAM at slot 0 from guest address 0 with no flags: a plain VM's one region. */
  #slot0: MemfdMapping | undefined;
  /**
   * Something was set that {@link detachForFork} could not undo (coalesced zones, MSR filters,
   * irq lines, VM state beyond the clock, more vCPUs, runner threads, a memslot deleted).
   */
  #tainted = false;
  /** The memslots registered, as registered (a ring entry past its slot's end is ignored). */
  readonly #slots = new Map<number, { readonly start: bigint; readonly size: number; readonly readonly: boolean; readonly logDirty: boolean; readonly hostAddress: bigint }>();

  constructor(vm: KvmVm, backend: KvmBackend, irqchip: boolean, vcpu0?: KvmVcpu, ringBytes?: number, plain?: { readonly memory?: MemfdMapping }) {
    this.#vm = vm;
    this.#backend = backend;
    this.#irqchip = irqchip;
    this.#ready0 = vcpu0;
    this.#ringBytes = ringBytes;
    this.dirtyTracking = ringBytes === undefined ? 'log' : 'ring';
    this.#plain = plain !== undefined && !irqchip && ringBytes === undefined;
    this.#reused = plain?.memory !== undefined;
    this.#premade = plain?.memory;
  }

  #notPlain(): void {
    this.#plain = false;
    this.#dropPremade();
  }

  /** Something neither a plain VM's wipe nor {@link detachForFork} can undo was set: neither keeps this VM. */
  #taint(): void {
    this.#notPlain();
    this.#tainted = true;
  }

  /** Deletes a kept VM's slot 0 before any other layout (KVM refuses overlapping slots). */
  #dropPremade(): void {
    const p = this.#premade;
    if (!p) return;
    this.#premade = undefined;
    this.#vm.setUserMemoryRegion(0, 0n, 0, 0n);
    if (!this.#premadeGiven) p.close();
  }

  /**
   * @internal `teardown`: hands this VM with its one vCPU and region to the backend to keep
   * (wiped; see `KvmBackend.createVm`). `true` when taken: the handles given here are closed
   * then (closing them again is a no-op) and reach nothing of the kept VM.
   */
  recycle(vcpus: readonly BackendVcpu[], hosts: readonly HostMemory[]): boolean {
    const v = vcpus[0];
    const slot0 = this.#slot0;
    if (!this.#plain || this.#ready0 || this.#vm.fd < 0 || vcpus.length !== 1 || hosts.length !== 1 || !slot0 || hosts[0] !== slot0 || !(v instanceof KvmBackendVcpu)) return false;
    return this.#backend.keep(() => {
      const raw = v.kvm;
      if (raw.fd < 0 || raw.id !== 0) return undefined;
      try { this.#backend.wipe(raw, this.#vm); } catch { return undefined; }
      let vcpu: KvmVcpu;
      try { vcpu = this.#vm.rewrapVcpu(raw); } catch { return undefined; }
      let memory: MemfdMapping;
      try { memory = slot0.renew(); } catch { vcpu.close(); return undefined; }
      this.#slot0 = undefined;
      this.#releaseOwned();
      return { vm: this.#vm.rewrap(), vcpu, memory };
    });
  }

  /**
   * @internal `teardown` of a machine restored or forked from a snapshot: this VM, its one vCPU
   * wiped to power-on state (as a kept plain VM's, see `kvm-wipe.ts`), its memslots as they are
   * and their dirty logs emptied, moved to new handles for the snapshot's next fork; `remap`
   * puts fresh RAM (the snapshot's image, copy-on-write) under region `i`'s host range. The
   * handles given here are closed then and reach nothing of the VM. Undefined (nothing moved:
   * destroy it) unless the VM has exactly `regions` as memslots, all logging dirty pages, no
   * irqchip, no dirty ring, and nothing set that a wipe cannot undo.
   */
  detachForFork(vcpus: readonly BackendVcpu[], hosts: readonly HostMemory[], regions: readonly { readonly slot: number; readonly start: bigint; readonly size: number; readonly readonly: boolean }[], remap: (i: number, host: MemfdMapping) => MemfdMapping): { vm: BackendVm; vcpu: BackendVcpu; memory: MemfdMapping[] } | undefined {
    const v = vcpus[0];
    if (this.#tainted || this.#plain || this.#irqchip || this.#ringBytes !== undefined || this.#ready0 || this.#vm.fd < 0 || vcpus.length !== 1 || !(v instanceof KvmBackendVcpu)) return undefined;
    if (this.#slots.size !== regions.length || hosts.length !== regions.length) return undefined;
    const old: MemfdMapping[] = [];
    for (const r of regions) {
      const s = this.#slots.get(r.slot);
      if (!s || s.start !== r.start || s.size !== r.size || s.readonly !== r.readonly || !s.logDirty) return undefined;
      const h = hosts.find((x) => x.hostAddress === s.hostAddress);
      if (!(h instanceof MemfdMapping) || h.size !== r.size) return undefined;
      old.push(h);
    }
    const raw = v.kvm;
    if (raw.fd < 0 || raw.id !== 0) return undefined;
    try { this.#backend.wipe(raw, this.#vm); } catch { return undefined; }
    const memory: MemfdMapping[] = [];
    try {
      old.forEach((h, i) => { memory.push(remap(i, h)); });
      // After the wipe (finishing a pending string `in` may still have written guest RAM): the
      // next fork's first reset must see only what its own guest wrote.
      for (const r of regions) this.dirtyLog(r.slot, r.size);
    } catch {
      for (const m of memory) m.close();
      return undefined;
    }
    let vcpu: KvmVcpu;
    try { vcpu = this.#vm.rewrapVcpu(raw); } catch { for (const m of memory) m.close(); return undefined; }
    this.#releaseOwned();
    const next = new KvmBackendVm(this.#vm.rewrap(), this.#backend, false, vcpu);
    for (const [slot, s] of this.#slots) next.#slots.set(slot, s);
    this.#slots.clear();
    this.#tainted = true; // (these handles are spent)
    return { vm: next, vcpu: next.createVcpu(0), memory };
  }

  /**
   * Moves every ring entry into `#ringPages` and lets KVM write-protect those pages again
   * (`KVM_RESET_DIRTY_RINGS`). Called by `dirtyLog` and when a vCPU exits because its ring is
   * full. Never while a vCPU runs: vCPUs run on the calling thread. Returns the entries taken.
   */
  harvestRings(full = false): number {
    const n = this.#collect();
    if (n > 0 || full || this.#stickyPages > 0) this.#reprotect();
    // Full with nothing to take: KVM's ring index ran past what it published (wrapped). The
    // vCPU cannot run on; its run() returns the ring-full exit, which stops the machine visibly.
    if (full && n === 0) this.#ringLost();
    return n;
  }

  /** Notes one ring entry (slot field, page offset) in `#ringPages`; made once (a reset harvests each time). */
  readonly #mark = (slotField: number, page: number): void => {
    const slot = slotField & 0xffff;
    const size = this.#slots.get(slot)?.size;
    if (size === undefined || page * 4096 >= size) return;
    let set = this.#ringPages.get(slot);
    if (!set) { set = new Set(); this.#ringPages.set(slot, set); }
    set.add(page);
  };

  /** Moves the rings' new entries into `#ringPages` (no ioctl). Returns the entries taken. */
  #collect(): number {
    let n = 0;
    const entries = (this.#ringBytes ?? 0) / 16;
    for (const v of this.#ringVcpus) {
      const got = v.harvestDirtyRing(this.#mark);
      // KVM stops a vCPU well before its ring fills (a soft limit 64+ entries short of it); a
      // ring found entirely full may have wrapped over entries not yet harvested (seen on PVM,
      // whose emulator can run a burst of ring-0 stores without checking): pages may be missing.
      if (got >= entries) this.#ringLost();
      n += got;
    }
    this.#unreset += n;
    return n;
  }

  /**
   * `KVM_RESET_DIRTY_RINGS`: KVM write-protects every page taken from the rings again, so the
   * next write to one is a new entry. Sticky pages may have been written until now: they join
   * `#ringPages`, to be named once more.
   */
  #reprotect(): void {
    this.#vm.resetDirtyRings();
    this.#unreset = 0;
    for (const [slot, pages] of this.#sticky) {
      const fresh = this.#ringPages.get(slot);
      if (fresh) for (const p of pages) fresh.add(p);
      else this.#ringPages.set(slot, pages);
    }
    this.#sticky.clear();
    this.#stickyPages = 0;
  }

  dirtyPagesForReset(slot: number, size: number, exact: readonly number[]): number[] {
    this.#notPlain();
    if (this.#ringBytes === undefined || this.#ringOverflowed) return pagesOf(this.dirtyLog(slot, size));
    this.#collect();
    const fresh = this.#ringPages.get(slot);
    const sticky = this.#sticky.get(slot);
    this.#ringPages.delete(slot);
    const out: number[] = sticky ? [...sticky] : [];
    if (fresh) for (const p of fresh) if (!sticky?.has(p)) out.push(p);
    const added = out.length - (sticky?.size ?? 0);
    let exactNamed = false;
    for (const p of exact) if (fresh?.has(p) === true || sticky?.has(p) === true) exactNamed = true;
    if (exactNamed || this.#stickyPages + added > STICKY_PAGES || this.#unreset > this.#ringBytes / 16 / 2) {
      // Named now and write-protected again: nothing of this slot stays sticky.
      this.#reprotect();
      this.#ringPages.delete(slot);
      return out;
    }
    // Named now, left writable: sticky from here on.
    if (fresh && added > 0) {
      if (sticky) for (const p of fresh) sticky.add(p);
      else this.#sticky.set(slot, fresh);
      this.#stickyPages += added;
    }
    return out;
  }

  /**
   * The rings lost entries: from now on `dirtyLog` reports every page of every slot dirty (a
   * reset then copies all of RAM: slower, still exact), and the backend stops choosing rings.
   */
  #ringLost(): void {
    this.#ringOverflowed = true;
    this.#backend.ringOverflowSeen = true;
  }

  #ringOverflowed = false;

  allocateMemory(size: number, name: string): HostMemory {
    const p = this.#premade;
    if (p && !this.#premadeGiven && p.size === size) { this.#premadeGiven = true; return p; }
    return MemfdMapping.create(size, name);
  }

  allocateMemoryFrom(source: HostMemory, offset: number, size: number): HostMemory {
    this.#notPlain();
    if (source.fd < 0) throw new KvmError('mmap(MAP_PRIVATE)', 9, 'the source memory has no file to map');
    return MemfdMapping.mapPrivate(source.fd, offset, size);
  }

  getState(): Record<string, Uint8Array> {
    const vm = this.#vm;
    const out: Record<string, Uint8Array> = {};
    if (this.#irqchip) {
      out['pic-master'] = vm.getIrqchip(KVM_CONST.IRQCHIP_PIC_MASTER);
      out['pic-slave'] = vm.getIrqchip(KVM_CONST.IRQCHIP_PIC_SLAVE);
      out['ioapic'] = vm.getIrqchip(KVM_CONST.IRQCHIP_IOAPIC);
      out['pit2'] = vm.getPit2();
    }
    out['clock'] = vm.getClock();
    return out;
  }

  setState(state: Readonly<Record<string, Uint8Array>>): void {
    if (Object.keys(state).some((k) => k !== 'clock')) this.#taint(); else this.#notPlain();
    for (const [k, b] of Object.entries(state)) {
      switch (k) {
        case 'pic-master': case 'pic-slave': case 'ioapic': this.#vm.setIrqchip(b); break;
        case 'pit2': this.#vm.setPit2(b); break;
        // KVM_SET_CLOCK takes only `clock` (and flags); the realtime/host_tsc fields are outputs.
        case 'clock': { const c = b.slice(); new DataView(c.buffer).setUint32(8, 0, true); this.#vm.setClock(c); break; }
        default: throw new KvmError('KVM_SET_*', 22, `unknown VM state blob '${k}'`);
      }
    }
  }

  mapMemory(slot: number, start: bigint, host: HostMemory, size: number, flags: { readonly: boolean; logDirty: boolean }): void {
    const first = this.#plain && slot === 0 && start === 0n && !flags.readonly && !flags.logDirty && this.#slot0 === undefined
      && this.#slots.size === 0 && host instanceof MemfdMapping && host.fd >= 0 && host.size === size;
    const entry = { start, size, readonly: flags.readonly, logDirty: flags.logDirty, hostAddress: host.hostAddress };
    if (first && host === this.#premade) { // a kept VM's RAM: registered so already
      this.#premade = undefined;
      this.#slot0 = host;
      this.#slots.set(slot, entry);
      return;
    }
    if (first) this.#dropPremade(); else this.#notPlain();
    if (first) this.#slot0 = host as MemfdMapping;
    if (this.#ringBytes !== undefined) { this.harvestRings(); this.#ringPages.delete(slot); }
    this.#vm.setUserMemoryRegion(slot, start, size, host.hostAddress, flags);
    this.#slots.set(slot, entry);
  }

  unmapMemory(slot: number): void {
    this.#taint();
    this.#slots.delete(slot);
    if (this.#ringBytes !== undefined) { this.harvestRings(); this.#ringPages.delete(slot); }
    this.#vm.setUserMemoryRegion(slot, 0n, 0, 0n);
    this.#dirtyBufs.get(slot)?.close();
    this.#dirtyBufs.delete(slot);
  }

  dirtyLog(slot: number, size: number): Uint8Array {
    this.#notPlain();
    const bytes = Math.ceil(size / 4096 / 64) * 8;
    if (this.#ringBytes !== undefined) {
      this.harvestRings();
      const named = this.#ringPages.get(slot);
      this.#ringPages.delete(slot);
      const out = new Uint8Array(bytes);
      if (this.#ringOverflowed) {
        const pages = Math.ceil(size / 4096);
        out.fill(0xff, 0, pages >> 3);
        if (pages & 7) out[pages >> 3] = (1 << (pages & 7)) - 1;
      } else if (named) for (const p of named) out[p >> 3] = (out[p >> 3] as number) | (1 << (p & 7));
      return out;
    }
    let buf = this.#dirtyBufs.get(slot);
    if (!buf || buf.size < bytes) {
      buf?.close();
      // KVM writes the bitmap through a user pointer, so it needs a stable native address.
      buf = MemfdMapping.create(Math.max(4096, Math.ceil(bytes / 4096) * 4096), 'tsvm-dirty');
      this.#dirtyBufs.set(slot, buf);
    }
    this.#vm.getDirtyLog(slot, buf.hostAddress);
    return buf.bytes.slice(0, bytes);
  }

  irqLine(irq: number, level: boolean): void {
    this.#taint();
    this.#vm.irqLine(irq, level);
  }

  registerCoalesced(address: bigint, size: number, pio: boolean): void {
    this.#taint();
    this.#vm.registerCoalesced(address, size, pio);
  }

  unregisterCoalesced(address: bigint, size: number, pio: boolean): void {
    this.#taint();
    this.#vm.unregisterCoalesced(address, size, pio);
  }

  setMsrIntercepts(reads: readonly number[], writes: readonly number[]): void {
    this.#taint();
    if (!this.#msrFilterEnabled) {
      this.#vm.enableCap(KVM_CAP.X86_USER_SPACE_MSR, [BigInt(KVM_CONST.MSR_EXIT_REASON_FILTER | KVM_CONST.MSR_EXIT_REASON_UNKNOWN)]);
      this.#msrFilterEnabled = true;
    }
    // One range per intercepted MSR: its single bitmap bit is 0 ("deny" → exit to userspace).
    const ranges: Array<{ flags: number; base: number; nmsrs: number; bitmapAddress: bigint }> = [];
    const zero = MemfdMapping.create(4096, 'tsvm-msr-bitmap');
    try {
      for (const ix of reads) ranges.push({ flags: KVM_CONST.MSR_FILTER_READ, base: ix, nmsrs: 1, bitmapAddress: zero.hostAddress });
      for (const ix of writes) ranges.push({ flags: KVM_CONST.MSR_FILTER_WRITE, base: ix, nmsrs: 1, bitmapAddress: zero.hostAddress });
      if (ranges.length > 16) throw new KvmError('KVM_X86_SET_MSR_FILTER', 7, 'at most 16 intercepted MSRs');
      this.#vm.setMsrFilter(false, ranges);
    } finally {
      zero.close();
    }
  }

  createVcpu(id: number): BackendVcpu {
    if (id !== 0) this.#taint();
    const ready = id === 0 ? this.#ready0 : undefined;
    if (ready) {
      this.#ready0 = undefined;
      if (this.#plain && !this.#reused) this.#backend.notePowerOn(ready, this.#vm);
      return new KvmBackendVcpu(ready, this.#backend.supportedCpuid(), this.#vm, this.#backend);
    }
    const vcpu = this.#vm.createVcpu(id);
    try {
      const cpuid = this.#backend.supportedCpuid();
      vcpu.setCpuid(cpuid);
      vcpu.setSignalMask(runSignalMask());
      if (this.#plain) this.#backend.notePowerOn(vcpu, this.#vm);
      if (this.#ringBytes !== undefined) {
        vcpu.mapDirtyRing(this.#ringBytes);
        this.#ringVcpus.push(vcpu);
        return new KvmBackendVcpu(vcpu, cpuid, this.#vm, this.#backend, () => this.harvestRings(true));
      }
      return new KvmBackendVcpu(vcpu, cpuid, this.#vm, this.#backend);
    } catch (e) {
      vcpu.close();
      throw e;
    }
  }

  async startRunners(vcpus: readonly BackendVcpu[]): Promise<BackendRunners> {
    this.#taint();
    const own = vcpus.map((v) => {
      if (!(v instanceof KvmBackendVcpu)) throw new KvmError('startRunners', 22, 'not a vCPU of this backend');
      return v;
    });
    return new KvmRunners(await VcpuRunners.start(own.map((v) => v.kvm)), own);
  }

  close(): void {
    this.#releaseOwned();
    this.#vm.close();
  }

  closeInBackground(): Promise<void> {
    this.#releaseOwned();
    // Main thread only (as the spare VMs): a worker terminated while koffi's async close is in
    // flight aborts the process (the completion reaches a torn-down environment).
    if (!isMainThread) { this.#vm.close(); return Promise.resolve(); }
    return this.#vm.closeInBackground();
  }

  /** The dirty-log buffers, an untaken vCPU 0 and kept RAM no region took: what this VM owns besides its fd. */
  #releaseOwned(): void {
    this.#plain = false;
    if (this.#premade && !this.#premadeGiven) this.#premade.close();
    this.#premade = undefined;
    this.#ringVcpus.length = 0;
    for (const b of this.#dirtyBufs.values()) b.close();
    this.#dirtyBufs.clear();
    this.#ready0?.close();
    this.#ready0 = undefined;
  }
}

/** {@link BackendRunners} on kvm-backend's {@link VcpuRunners}: the exits decoded here, as `run()` does. */
class KvmRunners implements BackendRunners {
  readonly #r: VcpuRunners;
  readonly #vcpus: readonly KvmBackendVcpu[];
  constructor(r: VcpuRunners, vcpus: readonly KvmBackendVcpu[]) {
    this.#r = r;
    this.#vcpus = vcpus;
  }
  start(i: number, sliceNs: number): void {
    (this.#vcpus[i] as KvmBackendVcpu).prepareRun();
    this.#r.go(i, sliceNs);
  }
  wait(timeoutMs: number): number { return this.#r.next(timeoutMs); }
  exit(i: number): VcpuExit { return (this.#vcpus[i] as KvmBackendVcpu).finishRun(this.#r.result(i)); }
  interrupt(i: number): void { this.#r.interrupt(i); }
  busy(i: number): boolean { return this.#r.busy(i); }
  close(): void { this.#r.close(); }
}

const VCPU_BLOBS = new Set(['fpu', 'xsave', 'xcrs', 'lapic', 'events', 'debugregs', 'mp-state']);

/** Stands for "no exit waiting for an answer". */
const NO_EXIT: VcpuExit = Object.freeze({ kind: 'intr' });

class KvmBackendVcpu implements BackendVcpu {
  readonly id: number;
  readonly #v: KvmVcpu;
  readonly #cpuid: CpuidEntry[];
  /** The exit `run()` last returned, until it is answered. */
  #last: VcpuExit = NO_EXIT;
  readonly #vm: KvmVm;
  /**
   * Registers as last read or written, until the vCPU runs again. Consumers of one exit (the
   * RIP helper, probes, the audit line, deny messages) each ask for RIP or CR3; on PVM each
   * KVM_GET_REGS / KVM_GET_SREGS costs 17–76 µs, so the first one pays and the rest share it.
   */
  #regs: Regs | undefined;
  #sregs: Sregs | undefined;
  /**
   * `KVM_CAP_SYNC_REGS`: KVM stores the registers into `kvm_run` at every exit and loads
   * changed ones at the next entry, so reading and writing them costs no ioctl.
   */
  readonly #sync: boolean;
  /**
   * `KVM_SYNC_X86_SREGS` is offered, and whether it is on. It is switched on the first time a
   * consumer reads special registers at an exit (a monitor's probe translates addresses at every
   * hit; each KVM_GET_SREGS costs ~6 µs on PVM), so a machine that never asks pays nothing.
   */
  readonly #syncSregsOffered: boolean;
  #syncSregsOn = false;
  /** `kvm_run`'s special-register copy is what KVM stored at the last real exit (nothing set since). */
  #sregsFresh = false;
  /** The host is SVM (see `setSregs`). */
  readonly #svm: boolean;
  /** `kvm_run`'s register copy is what KVM stored at the last real exit. */
  #syncFresh = false;
  /** Registers written to `kvm_run` that KVM has not loaded yet. */
  #syncDirty = false;

  readonly #backend: KvmBackend;
  /**
   * `KVM_SYNC_X86_SREGS` / `KVM_SYNC_X86_EVENTS` bits {@link loadState} wrote into `kvm_run`
   * that KVM has not loaded yet (the registers are `#syncDirty`). While set, `kvm_run` holds the
   * vCPU's real special registers / events: reads come from there, and any ioctl that reads or
   * changes them goes through `#flushPending` first.
   */
  #pendingSync = 0;
  /**
   * This host's `out` exits need no completion: `capabilities.ioExitRip` shows RIP already past
   * both non-string forms, which only KVM's emulator does (the VMX/SVM fast path leaves RIP on
   * the instruction and skips it in a completion callback), and KVM emulates every string form
   * anyway; the emulator finishes an `out` before it exits and leaves no callback.
   */
  readonly #outDoneAtExit: boolean;

  /** Harvests the VM's dirty rings (ring VMs only): a vCPU whose ring is full exits until that is done. */
  readonly #harvest: (() => number) | undefined;

  constructor(v: KvmVcpu, cpuid: CpuidEntry[], vm: KvmVm, backend: KvmBackend, harvest?: () => number) {
    this.#harvest = harvest;
    this.#v = v;
    this.#vm = vm;
    this.#backend = backend;
    this.id = v.id;
    this.#cpuid = cpuid;
    this.#sync = backend.syncRegs;
    this.#syncSregsOffered = backend.syncSregs;
    this.#svm = backend.capabilities.flavour === 'svm';
    const rip = backend.capabilities.ioExitRip;
    this.#outDoneAtExit = rip['out-imm'] === 'after' && rip['out-dx'] === 'after';
    if (this.#sync) v.setSyncRegs(true);
  }

  run(): VcpuExit {
    this.#regs = this.#sregs = undefined;
    let exit = this.#v.run();
    // A full dirty ring is the backend's business, not an exit of the guest: empty it, go on.
    // Each round frees the ring, so the guest makes progress; the slice timer still ends the
    // run. A full ring with nothing to harvest is a real error, reported as this exit.
    while (this.#harvest && exit.kind === 'unsupported' && exit.reason === KVM_EXIT.DIRTY_RING_FULL && this.#harvest() > 0) {
      exit = this.#v.run();
    }
    return this.#ran(exit);
  }

  /** The raw vCPU, for its runner thread (which issues `KVM_RUN` on its fd). */
  get kvm(): KvmVcpu { return this.#v; }

  /** Before a runner thread enters the guest: what `run()` does before its ioctl. */
  prepareRun(): void {
    this.#regs = this.#sregs = undefined;
  }

  /**
   * After a runner's `KVM_RUN` returned `result` (or `-errno`): what `run()` does after its ioctl.
   * (Runner VMs never use a dirty ring: rings are only enabled on `Snapshot.prewarm` VMs.)
   */
  finishRun(result: number): VcpuExit {
    return this.#ran(this.#v.decodeRun(result));
  }

  #ran(exit: VcpuExit): VcpuExit {
    this.#syncDirty = false;
    if (this.#pendingSync !== 0) this.#pendingSync &= this.#v.syncDirtyBits();
    // An interrupted KVM_RUN may not have stored the registers: ask KVM then.
    this.#syncFresh = this.#sync && exit.kind !== 'intr';
    this.#sregsFresh = this.#syncSregsOn && this.#syncFresh;
    this.#last = exit;
    if (this.#prelude) this.#preludeRan(exit);
    return exit;
  }

  /**
   * The prelude (see {@link EntryPrelude}) after a `KVM_RUN`: an interrupted run that left RIP
   * on the stub never entered it (it stays pending); one that stopped inside it (the `jmp`
   * still to go) has RIP put on the guest's instruction; otherwise it ran.
   */
  #preludeRan(exit: VcpuExit): void {
    const p = this.#prelude as PendingPrelude;
    const regs = this.#syncFresh ? this.#v.syncedRegs() : this.#v.getRegs();
    if (exit.kind === 'intr' && regs.rip === p.at) return;
    this.#prelude = undefined;
    if (regs.rip > p.at && regs.rip < p.at + BigInt(p.length)) this.setRegs({ ...regs, rip: p.rip });
    p.done();
  }

  /** Does a pending prelude's work by ioctl (its blob; RIP onto the guest's instruction). */
  #cancelPrelude(): void {
    const p = this.#prelude;
    if (!p) return;
    this.#prelude = undefined;
    this.#v.setBlob(p.blob as 'xsave', p.bytes);
    const regs = { ...(this.#regs ?? (this.#syncFresh ? this.#v.syncedRegs() : this.#v.getRegs())), rip: p.rip };
    this.setRegs(regs);
    p.done();
  }

  /** A prelude loaded by {@link loadState} whose stub has not run yet; `rip`: the guest's next instruction. */
  #prelude: PendingPrelude | undefined;

  /** Loads registers still waiting in `kvm_run` now (KVM's deferred load would drop a queued exception). */
  #flushRegs(): void {
    if (!this.#syncDirty || !this.#regs) return;
    this.#v.setRegs(this.#regs);
    this.#v.dropSyncedRegs();
    this.#syncDirty = false;
  }

  completeRead(data: Uint8Array): void {
    const e = this.#last;
    if (e.kind === 'io' && e.direction === 'in') this.#v.completeIoIn(data);
    else if (e.kind === 'mmio' && !e.isWrite) this.#v.completeMmioRead(data);
    this.#last = NO_EXIT;
  }

  faultInstruction(vector: number, errorCode: number | undefined, rip: bigint): void {
    // KVM finishes (and skips) a pending I/O or MMIO access inside the next KVM_RUN (on PVM it
    // has already finished an `out`, so RIP is past it). Let it finish without running
    // anything else (an unanswered `in` reads all-ones), then put every register back — RIP
    // onto the accessing instruction (which the caller derived for this flavour), RAX as
    // before an `in` — and queue the exception, so the guest sees a fault *on* the access and
    // the access had no effect.
    this.#flushPending();
    const regs = { ...this.getRegs(), rip };
    this.#last = NO_EXIT;
    this.#regs = this.#sregs = undefined;
    this.#syncDirty = false;
    this.#v.dropSyncedRegs();
    this.#v.completePendingExit();
    this.#syncFresh = this.#sregsFresh = false;
    // KVM_SET_REGS now, not the deferred load: that would drop the exception queued next.
    this.#v.setRegs(regs);
    this.#regs = { ...regs };
    this.#v.injectException(vector, errorCode);
  }

  completeMsr(data: bigint, error: boolean): void {
    if (this.#last.kind !== 'msr') return;
    this.#v.completeMsr(data, error);
    this.#last = NO_EXIT;
  }

  beginSlice(ns: number): void { armSlice(ns); }
  endSlice(): void { disarmSlice(); consumeSliceSignal(); }
  getRegs(): Regs {
    this.#regs ??= this.#syncFresh ? this.#v.syncedRegs() : this.#v.getRegs();
    const r = { ...this.#regs };
    if (this.#prelude) r.rip = this.#prelude.rip;
    return r;
  }
  setRegs(regs: Regs): void {
    const p = this.#prelude;
    if (p) {
      // The stub still runs first and jumps to the new RIP.
      if (regs.rip !== p.rip) { p.retarget(regs.rip); p.rip = regs.rip; }
      regs = { ...regs, rip: p.at };
    }
    this.#regs = undefined;
    if (this.#sync && this.#syncFresh) {
      this.#v.setSyncedRegs(regs);
      this.#syncDirty = true;
    } else {
      this.#v.setRegs(regs);
    }
    this.#regs = { ...regs };
  }
  getSregs(): Sregs {
    this.#sregs ??= this.#sregsFresh || (this.#pendingSync & KVM_CONST.SYNC_X86_SREGS) !== 0 ? this.#v.syncedSregs() : this.#readSregs();
    return cloneSregs(this.#sregs);
  }
  #readSregs(): Sregs {
    const s = this.#v.getSregs();
    // Asked at an exit: from now on KVM stores them into kvm_run at every exit (no ioctl).
    if (this.#syncSregsOffered && !this.#syncSregsOn && this.#syncFresh) {
      this.#v.setSyncRegs(true, true);
      this.#syncSregsOn = true;
    }
    return s;
  }
  setSregs(s: Sregs): void {
    this.#stateVersion++;
    this.#sregs = undefined;
    this.#sregsFresh = false;
    if ((this.#pendingSync & KVM_CONST.SYNC_X86_SREGS) !== 0) { // these win over the ones waiting in kvm_run
      this.#v.dropSynced(KVM_CONST.SYNC_X86_SREGS);
      this.#pendingSync &= ~KVM_CONST.SYNC_X86_SREGS;
    }
    // KVM on SVM reports TR busy (type 11) whatever was set, and QEMU's emulated AMD honours the
    // TSS I/O bitmap only for a TR loaded as available (type 9): a get → set round trip (a
    // snapshot, CR4.TSD for recording) would otherwise make ring-3 port I/O #GP there.
    this.#v.setSregs(this.#svm && s.tr.type === 11 ? { ...s, tr: { ...s.tr, type: 9 } } : s);
  }
  setCpuid(entries: readonly CpuidEntry[]) { this.#stateVersion++; this.#v.setCpuid(entries); }
  supportedCpuid() { return this.#cpuid.slice(); }
  getMsrs(indices: readonly number[]) { return this.#v.getMsrs(indices); }
  // An MSR write can change special registers (EFER, APIC base): the cached copy goes.
  setMsrs(entries: Parameters<BackendVcpu['setMsrs']>[0]) { this.#stateVersion++; this.#sregs = undefined; this.#sregsFresh = false; this.#v.setMsrs(entries); }
  isHalted() { return this.#v.getMpState() === KVM_CONST.MP_STATE_HALTED; }
  waitingForSipi() { const m = this.#v.getMpState(); return m === KVM_CONST.MP_STATE_UNINITIALIZED || m === KVM_CONST.MP_STATE_INIT_RECEIVED; }

  nmiWakeState(): NmiWakeState {
    this.#flushPending();
    const ev = this.#v.getBlob('events');
    return {
      pending: ev[EV.nmi_pending] !== 0 || ev[EV.nmi_injected] !== 0,
      masked: ev[EV.nmi_masked] !== 0,
      source: this.#nmiSource(),
    };
  }

  /** The first configured NMI source (LAPIC LVT or IOAPIC entry in NMI mode, unmasked), if any. */
  #nmiSource(): string | undefined {
    const nmiMode = (lo: number): boolean => ((lo >>> 8) & 7) === 4 && (lo & 0x1_0000) === 0;
    try {
      const lapic = new DataView(this.#v.getBlob('lapic').buffer);
      for (const [name, off] of [['LAPIC LINT0', 0x350], ['LAPIC perf-counter LVT', 0x340]] as const) {
        if (nmiMode(lapic.getUint32(off, true))) return name;
      }
    } catch { /* no in-kernel LAPIC: nothing routes NMIs */ }
    try {
      const io = this.#vm.getIrqchip(KVM_CONST.IRQCHIP_IOAPIC); // the whole struct kvm_irqchip: the chip union is at 8
      const v = new DataView(io.buffer, io.byteOffset + 8 + IOAPIC_REDIRTBL_OFFSET);
      for (let pin = 0; pin < 24; pin++) if (nmiMode(v.getUint32(pin * 8, true))) return `IOAPIC pin ${pin}`;
    } catch { /* no in-kernel IOAPIC */ }
    return undefined;
  }
  // KVM_SET_GUEST_DEBUG edits RFLAGS (TF): registers waiting in kvm_run would undo that.
  setGuestDebug(control: number, debugreg: readonly bigint[] = []) {
    this.#flushPending();
    this.#v.setGuestDebug(control, debugreg);
    this.#debugging = (control & 1) !== 0;
    this.#stateVersion++;
  }
  #debugging = false;
  guestDebugging(): boolean { return this.#debugging; }
  #stateVersion = 0;
  stateVersion(): number { return this.#stateVersion; }
  drainCoalesced() { return this.#v.drainCoalesced(); }

  completePendingExit(): void {
    if (this.#last === NO_EXIT) return;
    this.#last = NO_EXIT;
    this.#flushRegs();
    this.#regs = this.#sregs = undefined;
    this.#syncFresh = this.#sregsFresh = false;
    this.#v.completePendingExit();
  }

  msrIndexList(): readonly number[] { return this.#backend.msrIndexList(); }

  settlePrelude(): void {
    this.#cancelPrelude();
  }

  settlePendingExit(): void {
    const e = this.#last;
    if (e.kind === 'io' && e.direction === 'out' && this.#outDoneAtExit) {
      // Nothing for KVM to finish: kvm_run (and the register caches) already hold the state
      // after the `out`, and registers written into kvm_run stay queued for the next entry.
      this.#last = NO_EXIT;
      return;
    }
    this.completePendingExit();
  }

  loadState(image: { readonly regs: Regs; readonly sregs: Sregs; readonly blobs: Readonly<Record<string, Uint8Array>> }, prelude?: EntryPrelude): boolean {
    const b = image.blobs;
    const events = b['events'];
    const mp = b['mp-state'];
    if (!this.#sync || !this.#syncSregsOffered || !this.#backend.syncEvents || this.#last !== NO_EXIT) return false;
    // An in-kernel LAPIC: KVM_SET_SREGS may change the APIC base, which resets LAPIC state, so the
    // documented order (special registers, then the LAPIC blob) is kept through ioctls.
    if (b['lapic'] || !events) return false;
    // Without an in-kernel LAPIC KVM keeps every vCPU RUNNABLE (it refuses any other MP state and
    // nothing else changes it), so `mp-state` RUNNABLE needs no ioctl; anything else goes the slow way.
    if (mp && (mp.length !== 4 || new DataView(mp.buffer, mp.byteOffset, 4).getUint32(0, true) !== KVM_CONST.MP_STATE_RUNNABLE)) return false;
    for (const k of Object.keys(b)) {
      if (!VCPU_BLOBS.has(k)) throw new KvmError('KVM_SET_*', 22, `unknown vCPU state blob '${k}'`);
    }
    if (prelude && !VCPU_BLOBS.has(prelude.blob)) throw new KvmError('KVM_SET_*', 22, `unknown vCPU state blob '${prelude.blob}'`);
    if (this.#prelude) { const p = this.#prelude; this.#prelude = undefined; p.done(); } // superseded by this image
    this.#flushPending();
    this.#flushRegs();
    prelude?.arm();
    // No sync area for these: one ioctl each, XCRs before XSAVE (XCR0 decides what XSAVE loads).
    for (const k of ['xcrs', 'xsave', 'debugregs'] as const) { const x = b[k]; if (x) this.#v.setBlob(k, x); }
    const fpu = b['fpu'];
    if (fpu && !b['xsave']) this.#v.setBlob('fpu', fpu);
    // KVM's sync_regs loads these in this order at the next KVM_RUN (before the guest runs):
    // registers (which also drop a queued exception), special registers, then events.
    const regs = prelude ? this.#enteringAt(image.regs, prelude.at) : image.regs;
    this.#v.setSyncedRegs(regs);
    this.#v.setSyncedSregs(this.#svm && image.sregs.tr.type === 11 ? this.#svmTr(image.sregs) : image.sregs);
    this.#v.setSyncedEvents(events);
    this.#regs = { ...regs };
    if (prelude) this.#prelude = { ...prelude, rip: image.regs.rip };
    this.#sregs = undefined; // read back from kvm_run while pending
    this.#syncFresh = true; // kvm_run's register copy is the vCPU's
    this.#sregsFresh = false;
    this.#syncDirty = true;
    this.#pendingSync = KVM_CONST.SYNC_X86_SREGS | KVM_CONST.SYNC_X86_EVENTS;
    return true;
  }

  readonly #entering = new WeakMap<Regs, Regs>();
  /** `r` with RIP at `at`, the same frozen copy for the same frozen `r` (so its encoding is kept, see `setSyncedRegs`). */
  #enteringAt(r: Regs, at: bigint): Regs {
    let e = this.#entering.get(r);
    if (!e || e.rip !== at) {
      e = Object.freeze({ ...r, rip: at });
      if (Object.isFrozen(r)) this.#entering.set(r, e);
    }
    return e;
  }

  readonly #trFixed = new WeakMap<Sregs, Sregs>();
  /** `s` with TR available (see `setSregs`), the same frozen copy for the same `s` (its encoding is kept). */
  #svmTr(s: Sregs): Sregs {
    let f = this.#trFixed.get(s);
    if (!f) {
      f = Object.freeze({ ...s, tr: Object.freeze({ ...s.tr, type: 9 }) });
      if (Object.isFrozen(s)) this.#trFixed.set(s, f);
    }
    return f;
  }

  /** Loads what {@link loadState} left in kvm_run through ioctls now, in sync_regs' order (a prelude's work too). */
  #flushPending(): void {
    this.#cancelPrelude();
    if (this.#pendingSync === 0) return;
    const bits = this.#pendingSync & this.#v.syncDirtyBits();
    this.#pendingSync = 0;
    this.#flushRegs();
    if ((bits & KVM_CONST.SYNC_X86_SREGS) !== 0) this.#v.setSregs(this.#v.syncedSregs());
    if ((bits & KVM_CONST.SYNC_X86_EVENTS) !== 0) this.#v.setBlob('events', this.#v.syncedEvents());
    this.#v.dropSynced(KVM_CONST.SYNC_X86_SREGS | KVM_CONST.SYNC_X86_EVENTS);
    this.#sregs = undefined;
    this.#sregsFresh = false;
  }

  getState(): Record<string, Uint8Array> {
    this.#flushPending();
    const out: Record<string, Uint8Array> = {};
    for (const k of ['fpu', 'xsave', 'xcrs', 'lapic', 'events', 'debugregs'] as const) {
      try { out[k] = this.#v.getBlob(k); } catch { /* lapic without irqchip, xsave on old hosts */ }
    }
    const mp = new Uint8Array(4);
    new DataView(mp.buffer).setUint32(0, this.#v.getMpState(), true);
    out['mp-state'] = mp;
    return out;
  }

  setState(state: Record<string, Uint8Array>): void {
    this.#stateVersion++;
    this.#flushPending();
    this.#flushRegs();
    this.#regs = this.#sregs = undefined;
    this.#syncFresh = this.#sregsFresh = false;
    // Firecracker's order: XCRs before XSAVE (XCR0 decides which XSAVE components load), the
    // LAPIC before events and MP state (a pending interrupt refers to it).
    for (const k of ['fpu', 'xcrs', 'xsave', 'debugregs', 'lapic', 'mp-state', 'events'] as const) {
      const b = state[k];
      if (!b) continue;
      // XSAVE's legacy region is the FPU/SSE state: with XSAVE, KVM_SET_FPU would be a second
      // write of the same registers (one ioctl less per restore and reset, as QEMU does).
      if (k === 'fpu' && state['xsave']) continue;
      if (k === 'mp-state') {
        if (b.length !== 4) throw new KvmError('KVM_SET_MP_STATE', 22, 'blob must be 4 bytes');
        this.#v.setMpState(new DataView(b.buffer, b.byteOffset, 4).getUint32(0, true));
      } else this.#v.setBlob(k, b);
    }
    for (const k of Object.keys(state)) {
      if (!VCPU_BLOBS.has(k)) throw new KvmError('KVM_SET_*', 22, `unknown vCPU state blob '${k}'`);
    }
  }

  close(): void {
    this.#v.close();
    // Nothing cached outlives the vCPU: a stale handle's reads go to the closed fd and throw.
    this.#regs = undefined;
    this.#sregs = undefined;
    this.#prelude = undefined;
  }
}

/** A prelude waiting for its stub to run, with the guest's next instruction. */
interface PendingPrelude extends EntryPrelude { rip: bigint }

/** A deep copy of `s` (callers may modify what they get; structuredClone costs ~30 µs here). */
function cloneSregs(s: Sregs): Sregs {
  return {
    cs: { ...s.cs }, ds: { ...s.ds }, es: { ...s.es }, fs: { ...s.fs }, gs: { ...s.gs }, ss: { ...s.ss }, tr: { ...s.tr }, ldt: { ...s.ldt },
    gdt: { ...s.gdt }, idt: { ...s.idt },
    cr0: s.cr0, cr2: s.cr2, cr3: s.cr3, cr4: s.cr4, cr8: s.cr8, efer: s.efer, apic_base: s.apic_base,
    interrupt_bitmap: [...s.interrupt_bitmap],
  };
}

const EINTR = 4;

/**
 * Runs a creation ioctl again when a signal interrupted it (`KVM_CREATE_VM` returns EINTR when
 * any signal arrives — a profiler's, a timer's). The raw layer never retries on its own; here
 * it is safe because nothing was created. At most a few tries, then the error stands.
 */
function retryInterrupted<T>(create: () => T): T {
  for (let attempt = 1; ; attempt++) {
    try {
      return create();
    } catch (e) {
      if (!(e instanceof KvmError) || e.errno !== EINTR || attempt >= 5) throw e;
    }
  }
}

/** Sets CPUID.1:ECX.HYPERVISOR (bit 31) in a copy of `entries`. */
export function withHypervisorBit(entries: readonly CpuidEntry[]): CpuidEntry[] {
  return entries.map((e) => (e.function === 1 ? { ...e, ecx: (e.ecx | 0x8000_0000) >>> 0 } : e));
}

let shared: KvmBackend | undefined;

/** The process-wide KVM backend (opened on first use). Throws `KvmUnavailableError`. */
export function kvmBackend(): KvmBackend {
  shared ??= new KvmBackend();
  return shared;
}

/**
 * @internal Closes this thread's shared backend if one was opened (its `/dev/kvm` fd, spare and
 * kept VMs): a machine worker's end. A later {@link kvmBackend} opens a new one.
 */
export function closeSharedBackend(): void {
  const b = shared;
  shared = undefined;
  b?.close();
}

/** Spare VMs kept ready per irqchip kind (see `KvmBackend`). */
const SPARES = 2;

/** Closed plain machines' VMs kept for reuse (see `KvmBackend.createVm`): each holds 3 fds and a few pages of the kernel's. */
const KEPT_VMS = 2;

/** @internal A closed plain machine's VM, wiped: vCPU 0 at power-on, RAM a new zero-filled memfd still registered at slot 0 from 0. */
export interface KeptVm {
  readonly vm: KvmVm;
  readonly vcpu: KvmVcpu;
  readonly memory: MemfdMapping;
}

function closeKept(k: KeptVm): Promise<void> {
  k.vcpu.close();
  k.memory.close();
  if (!isMainThread) { k.vm.close(); return Promise.resolve(); }
  return k.vm.closeInBackground();
}

/**
 * @internal `teardown`: offers a closing machine's VM to its backend to keep (a plain KVM VM
 * with room in the backend's pool; see `KvmBackend.createVm`). `true` when it was taken.
 */
export function recycleVm(vm: BackendVm, vcpus: readonly BackendVcpu[], hosts: readonly HostMemory[]): boolean {
  return vm instanceof KvmBackendVm && vm.recycle(vcpus, hosts);
}

/** @internal Resolves when the shared backend (if one was opened) prepares no spare VM. */
export function sharedBackendSettled(): Promise<void> {
  return shared ? shared.settled() : Promise.resolve();
}

/**
 * Sticky pages a ring VM's reset report may carry before the rings are reset again: each costs
 * a 4 KiB copy per reset (~0.3–1 µs here), `KVM_RESET_DIRTY_RINGS` one ioctl (~5–10 µs on PVM).
 */
const STICKY_PAGES = 16;

/** The page indices a dirty bitmap names, in order. */
export function pagesOf(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  // 32 pages at a time where the bitmap allows (KVM's are whole 64-bit words): most are zero.
  const words = bitmap.byteOffset % 4 === 0 && bitmap.length % 4 === 0 ? new Uint32Array(bitmap.buffer, bitmap.byteOffset, bitmap.length / 4) : undefined;
  const unit = words ? 32 : 8;
  const n = words ? words.length : bitmap.length;
  for (let i = 0; i < n; i++) {
    let bits = (words ? words[i] : bitmap[i]) as number;
    while (bits !== 0) {
      const low = bits & -bits;
      out.push(i * unit + 31 - Math.clz32(low));
      bits = (bits ^ low) >>> 0;
    }
  }
  return out;
}
