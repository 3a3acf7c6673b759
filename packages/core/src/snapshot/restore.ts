/**
 * Restore, fork and reset. A restored machine's RAM is the snapshot's image mapped
 * copy-on-write (no copy); restore and fork are the same operation, and every machine made
 * from a snapshot logs dirty pages so `Machine.reset()` re-copies only what the guest wrote.
 * Restore is all or nothing: the new machine is closed again on any failure and the error is a
 * {@link SnapshotFormatError} naming the field, with the backend's error as `cause`.
 * @module
 */
import type { Backend, BackendVcpu, BackendVm, EntryPrelude } from '../backend.js';
import type { DeviceMapping } from '../device.js';
import { InvalidArgumentError, SnapshotFormatError, StateError, TsvmError } from '../errors.js';
import { DmaGate } from '../dma.js';
import type { HostMemory } from '../memory.js';
import type { Machine, MachineOptions } from '../machine.js';
import { KvmBackend, kvmBackend, pagesOf, type KvmBackendVm } from '../backend/kvm.js';
import type { MachineInternals } from './internals.js';
import { PAGE_SIZE, type SnapshotManifest } from './manifest.js';
import { Snapshot, cpuSignature } from './snapshot.js';
import { applyCpl3StateForReset, applyCpuState, applyCpuStateForReset, step } from './apply.js';
import { CONTROL_PAGES, RESET_STUB, SYS, SYSTEM_AREA_SIZE, controlPagesIntact, resetStubPage } from '../cpu/x86.js';
import { MAX_VCPUS } from '../machine/state.js';
import { releasePooled, type PooledVm, type PremappedRegion } from './pool.js';
import { forwarding } from '../forwarding.js';

/** Options of `Machine.restore` / `Machine.fork`. */
export interface RestoreOptions {
  /** The hypervisor; defaults to the process-wide KVM backend. Must match the snapshot's. */
  readonly backend?: Backend;
  /** Name of the new machine (default: the snapshot's, with a suffix). */
  readonly name?: string;
  /** Devices to attach (as `attachDevice` takes them); their state comes from the snapshot by name. */
  readonly devices?: readonly DeviceMapping[];
  /** Called after the machine exists and before state is applied: attach devices, add hooks. */
  readonly setup?: (machine: Machine) => void | Promise<void>;
  /**
   * Where the new machine's vCPUs execute (as `MachineOptions.vcpuThreads`; default `'shared'`):
   * a snapshot records guest state, not the host's threads, so a copy of a parallel machine is
   * parallel only when asked.
   */
  readonly vcpuThreads?: 'shared' | 'parallel';
}

/** What `Machine.reset()` did. */
export interface ResetResult {
  /** Pages copied back from the snapshot (the ones dirtied since it or the last reset). */
  readonly pagesCopied: number;
  /**
   * Which vCPU state went back. `'cpl3'`: the guest can have run nothing at CPL0 but the
   * host's stubs since the snapshot (a long-mode ring-3 snapshot above an intact system area,
   * see `cpu/x86.ts`), so only what CPL3 code can change was put back — registers, special
   * registers, events, x87/SSE/AVX state — and not MSRs, XCRs or debug registers, which it
   * cannot touch (up to five vCPU ioctls fewer; the TSC runs on, see `applyCpl3StateForReset`). `'full'`: everything.
   */
  readonly cpu: 'cpl3' | 'full';
}

/** Options of `machine.reset()`. */
export interface ResetOptions {
  /**
   * Compare every page with the snapshot instead of trusting the dirty log, which sees only
   * the guest's own stores and device DMA: use it after writing guest RAM from the host
   * (`machine.memory.write`). Costs a read of all RAM (~ms per 16 MiB).
   */
  readonly full?: boolean;
}

interface ResetBase {
  readonly snapshot: Snapshot;
  /** Region slots in manifest order (restored slots may be numbered differently). */
  readonly slots: readonly number[];
  /**
   * Pages (guest-physical, 4 KiB aligned) the host wrote since the last reset — device DMA, a
   * monitor's write-through, probe traps, any `memory.write`: KVM's dirty log misses them.
   */
  readonly hostPages: Set<bigint>;
  /** The machine's `debugTraps()` when it was made or last reset: a #DB since changed DR6. */
  debugTraps: number;
  /** vCPU 0's `stateVersion()` then (undefined: the backend does not count): the host changed none of it since. */
  stateVersion: number | undefined;
  /** The CPL3 reset's entry prelude for this machine, made at its first use. */
  prelude?: EntryPrelude;
}

const bases = new WeakMap<Machine, ResetBase>();

/** Where a snapshot's system area is, when a CPL3 reset can apply to its forks. */
interface Cpl3Reset {
  /** Index of the manifest region holding the system area, and the area's offset in it. */
  readonly region: number;
  readonly offset: number;
  /** Guest-physical addresses of the control pages. */
  readonly pages: readonly bigint[];
  /** The control pages as page indices in the region (the dirty bitmap's bits). */
  readonly controlPageIndices: readonly number[];
  /** Whether the snapshot's guest has kvmclock on (then the VM clock is put back too). */
  readonly kvmclock: boolean;
  /**
   * Reset's entry stub, where the snapshot's x87/SSE state is all the FPU state CPL3 code can
   * reach (CR4.OSXSAVE clear, FXSR on, CR0.EM and TS clear): its guest address, its page
   * (`resetStubPage`, its first `RESET_STUB.END` bytes), the snapshot's own bytes there (put back once the stub has run),
   * the XSAVE blob it stands for. Undefined otherwise: XSAVE by ioctl.
   */
  readonly stub: { readonly at: bigint; readonly page: Uint8Array; readonly original: Uint8Array; readonly xsave: Uint8Array } | undefined;
}

const cpl3Resets = new WeakMap<Snapshot, Cpl3Reset | null>();
/** CR4 bits a CPL3 reset allows: VME..LA57 (0-12), FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP. */
const CR4_CPL3_SAFE = 0x1fffn | (1n << 16n) | (1n << 17n) | (1n << 18n) | (1n << 20n) | (1n << 21n);
const MSR = { EFER_SCE: 1n, LSTAR: 0xc000_0082, CSTAR: 0xc000_0083, SYSENTER_CS: 0x174, KVMCLOCK_OLD: 0x12, KVMCLOCK_NEW: 0x4b56_4d01 } as const;

/**
 * Whether forks of `snap` can be reset the CPL3 way: one vCPU, no in-kernel irqchip, long mode
 * at CPL3 with the host's system area, its control pages in the image exactly as the host
 * builds them, the CPU's tables pointing into it, and `syscall` into the host's stub (or off).
 * Then every way to CPL0 from where the snapshot stands leads into host code, as long as the
 * control pages stay unwritten (checked at each reset). Decided once per snapshot.
 */
function cpl3ResetOf(snap: Snapshot): Cpl3Reset | null {
  const known = cpl3Resets.get(snap);
  if (known !== undefined) return known;
  const decide = (): Cpl3Reset | null => {
    const mf = snap.manifest;
    const sys = mf.machine.systemArea;
    const v = mf.vcpus[0];
    if (mf.vcpus.length !== 1 || !v || mf.machine.irqchip || mf.machine.mode !== 'long' || sys === null) return null;
    if (Object.keys(mf.vm).some((k) => k !== 'clock') || v.blobs['lapic']) return null;
    const r = v.sregs;
    const b = BigInt(sys);
    if ((r.cs.selector & 3) !== 3 || r.cs.dpl !== 3 || r.cs.l !== 1 || (r.cr0 & 0x8000_0001n) !== 0x8000_0001n) return null;
    // CR4 features that give CPL3 code state beyond registers, XSAVE and FS/GS base (PKRU with
    // PKE, the user shadow-stack pointer with CET, user-interrupt MSRs with UINTR, ...) rule it out.
    if ((r.cr4 & ~CR4_CPL3_SAFE) !== 0n) return null;
    if (r.cr3 !== b + BigInt(SYS.PML4) || r.idt.base !== b + BigInt(SYS.IDT) || r.gdt.base !== b + BigInt(SYS.GDT) || r.idt.limit !== 32 * 16 - 1 || r.gdt.limit !== 9 * 8 - 1) return null;
    if (r.ldt.unusable === 0 && (r.ldt.base !== b + BigInt(SYS.LDT) || r.ldt.limit > 7)) return null;
    // The TSS decides where an exception from CPL3 pushes its frame (RSP0, ISTs).
    if (r.tr.base !== b + BigInt(SYS.TSS)) return null;
    const msr = new Map(v.msrs.map((e) => [e.index, e.data]));
    const entry = b + BigInt(SYS.SYSCALL_STUB);
    if ((r.efer & MSR.EFER_SCE) !== 0n && (msr.get(MSR.LSTAR) !== entry || (msr.has(MSR.CSTAR) && msr.get(MSR.CSTAR) !== entry))) return null;
    if ((msr.get(MSR.SYSENTER_CS) ?? 0n) !== 0n) return null;
    const region = mf.memory.findIndex((m) => b >= m.start && b + BigInt(SYSTEM_AREA_SIZE) <= m.start + BigInt(m.size));
    const m = mf.memory[region];
    if (!m || m.readonly) return null;
    const offset = Number(b - m.start);
    const image = snap.image().bytes;
    if (!controlPagesIntact(image.subarray(m.offset + offset, m.offset + offset + SYSTEM_AREA_SIZE), sys)) return null;
    const kvmclock = ((msr.get(MSR.KVMCLOCK_OLD) ?? 0n) & 1n) !== 0n || ((msr.get(MSR.KVMCLOCK_NEW) ?? 0n) & 1n) !== 0n;
    const xsave = v.blobs['xsave'];
    const fxsr = (r.cr4 & (1n << 9n)) !== 0n && (r.cr4 & (1n << 18n)) === 0n && (r.cr0 & 0xcn) === 0n; // OSFXSR, !OSXSAVE, !EM, !TS
    let stub: Cpl3Reset['stub'];
    if (fxsr && xsave && xsave.length >= 512) {
      const at = m.offset + offset + SYS.RESET_STUB;
      // Only the bytes a stub uses are written and put back (`RESET_STUB.END`), a quarter page.
      stub = { at: b + BigInt(SYS.RESET_STUB), page: resetStubPage(v.regs.rip, xsave).subarray(0, RESET_STUB.END), original: image.subarray(at, at + RESET_STUB.END), xsave };
    }
    const controlPageIndices = CONTROL_PAGES.map((o) => (offset + o) / PAGE_SIZE);
    return { region, offset, pages: CONTROL_PAGES.map((o) => b + BigInt(o)), controlPageIndices, kvmclock, stub };
  };
  const d = decide();
  cpl3Resets.set(snap, d);
  return d;
}
let forks = 0;
const NO_PAGES: readonly number[] = Object.freeze([]);

/**
 * A BackendVm whose `allocateMemory` hands out the image's regions copy-on-write, in order,
 * and whose `createVcpu(0)` hands out a pooled VM's ready vCPU.
 */
function imageBackedVm(vm: BackendVm, source: { memory: HostMemory; base: number }, manifest: SnapshotManifest, ready?: BackendVcpu, premapped: readonly PremappedRegion[] = []): BackendVm {
  let vcpu0 = ready;
  const createVcpu = (id: number): BackendVcpu => {
    const v = id === 0 ? vcpu0 : undefined;
    vcpu0 = undefined;
    return v ?? vm.createVcpu(id);
  };
  const queue = manifest.memory.map((r) => r);
  // A pooled VM's RAM is mapped and registered already: hand it out, and skip re-registering it.
  const ahead = [...premapped];
  const given = new Set<HostMemory>();
  const allocate = (size: number, name: string): HostMemory => {
    const r = queue.shift();
    const p = ahead.shift();
    if (p && r && p.size === size && p.start === r.start) { given.add(p.host); return p.host; }
    if (p) p.host.close();
    if (!r || r.size !== size) return vm.allocateMemory(size, name);
    return vm.allocateMemoryFrom(source.memory, source.base + r.offset, r.size, name);
  };
  const mapMemory: BackendVm['mapMemory'] = (slot, start, host, size, flags) => {
    const p = premapped.find((x) => x.host === host);
    if (p && given.has(host) && p.slot === slot && p.start === start && p.size === size && p.readonly === flags.readonly && flags.logDirty) {
      given.delete(host); // registered once: a later remap (flag change) goes to KVM
      return;
    }
    vm.mapMemory(slot, start, host, size, flags);
  };
  return forwarding(vm, { allocateMemory: allocate, createVcpu, mapMemory });
}

/**
 * The KVM backend's CPUID table is asked once per process and every vCPU gets it, so its CPU
 * signature is too (computing it costs ~20 µs of a ~150 µs pooled fork); other backends are asked each time.
 */
const signatures = new WeakMap<Backend, string>();
function signatureOf(backend: Backend, vcpu: BackendVcpu): string {
  if (!(backend instanceof KvmBackend)) return cpuSignature(vcpu);
  let s = signatures.get(backend);
  if (s === undefined) { s = cpuSignature(vcpu); signatures.set(backend, s); }
  return s;
}

/** Checks what can be checked before anything is created. */
function checkHost(manifest: SnapshotManifest, backend: Backend): void {
  const h = manifest.host;
  if (h.backend !== backend.name) throw new SnapshotFormatError(`snapshot: host.backend is '${h.backend}', this machine would run on '${backend.name}'`);
  if (h.flavour !== backend.capabilities.flavour) throw new SnapshotFormatError(`snapshot: host.flavour is '${h.flavour}', this host is '${backend.capabilities.flavour}'`);
  if (manifest.machine.irqchip && !backend.capabilities.irqchip) throw new SnapshotFormatError('snapshot: machine.irqchip is set but this host has no in-kernel irqchip');
  const n = manifest.vcpus.length;
  if (n > MAX_VCPUS) throw new SnapshotFormatError(`snapshot: vcpus has ${n} entries; a machine has at most ${MAX_VCPUS}`);
  if (n > 1 && !manifest.machine.irqchip) throw new SnapshotFormatError(`snapshot: vcpus has ${n} entries but machine.irqchip is not set (several vCPUs need the in-kernel irqchip)`);
}

/** How `restore.ts` makes and opens machines: `Machine.create` and `Machine`'s internals, lent by `Machine`. */
export interface MachineMaker {
  /** `Machine.create`. */
  readonly create: (o: MachineOptions) => Promise<Machine>;
  /** The machine's private state as snapshot code may see it. */
  readonly internals: (m: Machine) => MachineInternals;
}

/**
 * Creates a machine in the state of `snap`: RAM mapped copy-on-write from the snapshot's image,
 * vCPU, VM and device state applied. The result can be reset (`Machine.reset()`) to `snap`.
 * Takes a machine `snap.prewarm` built ahead when there is one (see {@link schedulePrebuild}).
 */
export async function restoreMachine(snap: Snapshot, options: RestoreOptions, make: MachineMaker): Promise<Machine> {
  if (!(snap instanceof Snapshot)) throw new InvalidArgumentError('snapshot', 'must be a Snapshot (from Machine.snapshot or Snapshot.load)');
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  if (options.name !== undefined && typeof options.name !== 'string') throw new InvalidArgumentError('name', 'must be a string');
  const manifest = snap.manifest;
  const backend = options.backend ?? kvmBackend();
  checkHost(manifest, backend);
  const name = options.name ?? `${manifest.machine.name}~${++forks}`;
  const ahead = options.vcpuThreads === 'parallel' ? undefined : snap.takePrebuilt(backend);
  let m: Machine;
  if (ahead) {
    m = ahead;
    make.internals(m).rename(name);
    schedulePrebuild(snap, backend, make);
  } else {
    // The pool holds 1-vCPU VMs (see `Snapshot.prewarm`).
    const pooled = snap.manifest.vcpus.length === 1 ? snap.takePooledVm(backend) : undefined;
    m = await buildRestored(snap, backend, name, options.vcpuThreads, make, pooled);
  }
  try {
    const x = make.internals(m);
    if (options.devices) m.attachDevice(options.devices);
    await options.setup?.(m);
    applyDeviceState(m, x, snap);
    // Restoring devices wrote the snapshot's own state: host writes count from here on.
    bases.get(m)?.hostPages.clear();
    return m;
  } catch (e) {
    await m.close().catch(() => undefined);
    if (e instanceof SnapshotFormatError) throw e;
    throw new SnapshotFormatError(`snapshot: restore failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
}

/**
 * A machine of `snap`'s shape with its RAM, VM and vCPU state, CPU set-up and reset base in
 * place: all of a restore but devices, `setup` and device state. Closed again on failure.
 */
async function buildRestored(snap: Snapshot, backend: Backend, name: string, vcpuThreads: RestoreOptions['vcpuThreads'], make: MachineMaker, pooled: PooledVm | undefined): Promise<Machine> {
  const manifest = snap.manifest;
  const source = snap.mapSource();
  // The backend as it is (its clock, its CPUID probe, whatever else it offers) but for the VM it makes.
  const wrapped = forwarding(backend, { createVm: (o) => imageBackedVm(pooled?.vm ?? backend.createVm(o), source, manifest, pooled?.vcpu, pooled?.memory) });
  let m: Machine;
  try {
    m = await make.create({
      memory: manifest.memory.map((r) => ({ start: r.start, size: r.size, readonly: r.readonly, name: r.name, logDirty: true })),
      backend: wrapped,
      irqchip: manifest.machine.irqchip,
      vcpus: manifest.vcpus.length,
      name,
      ...(manifest.machine.cpu ? { cpu: manifest.machine.cpu } : {}),
      ...(vcpuThreads !== undefined ? { vcpuThreads } : {}),
    });
  } catch (e) {
    // Machine.create has already released whatever it made; a pooled vCPU it never took is ours.
    pooled?.vcpu.close();
    for (const r of pooled?.memory ?? []) { try { r.host.close(); } catch { /* may be closed already */ } }
    throw new SnapshotFormatError(`snapshot: memory: a machine of this shape cannot be created: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  try {
    const x = make.internals(m);
    const cpu = signatureOf(backend, m.vcpu(0).backend);
    if (cpu !== manifest.host.cpu) throw new SnapshotFormatError(`snapshot: host.cpu is '${manifest.host.cpu}', this host's CPU is '${cpu}'`);
    const slots = manifest.memory.map((r) => m.memory.regionAt(r.start, r.size).slot);
    if (!pooled?.prepared) applyCpuState(x.vm, m.vcpus.map((v) => v.backend), manifest, snap.rejectedMsrs);
    x.setCpu(manifest.machine.mode, manifest.machine.systemArea ?? undefined);
    // No dirty-log harvest here: a new memslot's log starts clean and applying state writes no
    // guest page, so the first reset sees exactly what the guest wrote (and a fork saves the
    // bitmap allocation and one ioctl).
    // Host writes are tracked from here on (restoring wrote the snapshot's own state).
    const hostPages = m.memory.trackHostWrites();
    hostPages.clear();
    DmaGate.of(m.memory).add({
      name: 'tsvm-reset',
      observe: (w) => { for (let a = w.address & ~0xfffn; a < w.address + BigInt(w.length); a += 4096n) hostPages.add(a); },
    });
    bases.set(m, { snapshot: snap, slots, hostPages, debugTraps: x.debugTraps(), stateVersion: m.vcpus[0]?.backend.stateVersion?.() });
    // KVM's own backend only: a wrapper (record/replay's taps) may have made VMs of its own kind.
    if (manifest.vcpus.length === 1 && !manifest.machine.irqchip && vcpuThreads !== 'parallel' && backend instanceof KvmBackend && backend.createVm === KvmBackend.prototype.createVm) {
      x.setRecycler((vcpus, hosts) => returnToSnapshot(snap, backend, x.vm, slots, vcpus, hosts));
    }
    return m;
  } catch (e) {
    await m.close().catch(() => undefined);
    if (e instanceof SnapshotFormatError) throw e;
    throw new SnapshotFormatError(`snapshot: restore failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
}

/**
 * A closing fork's VM, offered to its snapshot for the next fork (TinyKVM's way: a request's VM
 * serves the next one): the vCPU wiped to power-on state, RAM put back to the image by mapping
 * it afresh over the same host range (the memslots stay; the dirty logs are emptied), the
 * snapshot's vCPU and VM state applied, and the whole moved to new handles, so the closed
 * machine's reach nothing. The next `Machine.fork` / `Machine.restore` of `snap` on `backend`
 * then creates no VM and registers no memslot. `false`: not taken (the VM is destroyed).
 */
function returnToSnapshot(snap: Snapshot, backend: Backend, vm: BackendVm, slots: readonly number[], vcpus: readonly BackendVcpu[], hosts: readonly HostMemory[]): boolean {
  const detach = (vm as Partial<Pick<KvmBackendVm, 'detachForFork'>>).detachForFork;
  if (!snap.wantsReturnedVm() || typeof detach !== 'function') return false;
  const manifest = snap.manifest;
  const source = snap.mapSource();
  const regions = manifest.memory.map((r, i) => ({ slot: slots[i] as number, start: r.start, size: r.size, readonly: r.readonly }));
  const got = detach(vcpus, hosts, regions, (i, host) => host.remapPrivate(source.memory.fd, source.base + (manifest.memory[i]?.offset ?? 0)));
  if (!got) return false;
  const memory: PremappedRegion[] = got.memory.map((host, i) => ({ ...(regions[i] as (typeof regions)[number]), host }));
  let prepared = false;
  try { applyCpuState(got.vm, [got.vcpu], manifest, snap.rejectedMsrs); prepared = true; } catch { /* the fork applies it and reports */ }
  if (!snap.keepReturnedVm(backend, { vm: got.vm, vcpu: got.vcpu, prepared, memory })) releasePooled({ vm: got.vm, vcpu: got.vcpu, prepared, memory });
  return true;
}

/**
 * Builds machines of `snap` ahead on the event loop, one per turn, while `snap.prewarm` wants
 * more on `backend` and its pool has a VM: a fork then takes one and does only its own part
 * (devices, `setup`, device state). A build that fails ends building ahead for that `prewarm`
 * (forks then take pooled VMs and report what fails).
 */
export function schedulePrebuild(snap: Snapshot, backend: Backend, make: MachineMaker): void {
  setImmediate(() => {
    const taken = snap.takeVmToPrebuild(backend);
    if (!taken) return; // none wanted, or none ready yet (the pool calls again when it has one)
    buildRestored(snap, backend, snap.manifest.machine.name, undefined, make, taken.vm).then(
      (m) => {
        if (snap.keepPrebuilt(backend, m, taken.generation)) schedulePrebuild(snap, backend, make);
        else void m.close().catch(() => undefined);
      },
      () => { snap.prebuildFailed(taken.generation); },
    );
  }).unref();
}

/** Applies the snapshot's VM and vCPU state (`apply`) and device state. */
function applyState(m: Machine, x: MachineInternals, snap: Snapshot, apply: typeof applyCpuState): void {
  apply(x.vm, m.vcpus.map((v) => v.backend), snap.manifest, snap.rejectedMsrs);
  applyDeviceState(m, x, snap);
}

/** Restores each attached device's state from the snapshot, by name. */
function applyDeviceState(m: Machine, x: MachineInternals, snap: Snapshot): void {
  const manifest = snap.manifest;
  const states = Object.entries(manifest.devices);
  if (states.length === 0) return;
  const attached = new Map(x.devices().map((d) => [d.name, d]));
  for (const [name, state] of states) {
    const d = attached.get(name);
    if (!d?.restore) throw new SnapshotFormatError(`snapshot: devices.${name}: no attached device of that name can restore state (attach it through options.devices or setup)`);
    step(`devices.${name}`, () => d.restore?.(structuredClone(state)));
  }
}

/**
 * Puts `m` back into the state of the snapshot it came from: re-copies the pages the dirty log
 * names and those the host wrote (see `ResetBase.hostPages`), then vCPU, VM and device state.
 * @throws StateError when `m` was not made by `Machine.restore` / `Machine.fork`, or is running.
 */
export function resetMachine(m: Machine, x: MachineInternals, options: ResetOptions = {}): ResetResult {
  const base = bases.get(m);
  if (!base) throw new StateError(`machine '${m.name}' was not restored or forked from a snapshot; nothing to reset to`);
  if (x.running) throw new StateError('cannot reset a running machine; let run() return first');
  const snap = base.snapshot;
  const image = snap.image().bytes;
  // Before the dirty log is read: finishing an `in`/MMIO read may still write guest RAM (`ins`).
  for (const v of m.vcpus) {
    const b = v.backend;
    if (b.settlePendingExit) b.settlePendingExit(); else b.completePendingExit();
  }
  let pages = 0;
  const full = options.full === true;
  // A full reset compares every page: an entry stub of an earlier reset that never ran goes first.
  if (full) for (const v of m.vcpus) v.backend.settlePrelude?.();
  // CPL3 reset: decided per snapshot; then per reset no control page may have been written
  // since (by the guest: the dirty log; by the host or a device's DMA: hostPages), no #DB taken.
  const cpl3 = cpl3ResetOf(snap);
  // Nor may the host have set special registers, MSRs or other vCPU state (it could have put the
  // guest at CPL0, or pointed syscall at guest code).
  const version = m.vcpus[0]?.backend.stateVersion?.();
  let cpl3Ok = !full && cpl3 !== null && x.debugTraps() === base.debugTraps && version !== undefined && version === base.stateVersion
    && (base.hostPages.size === 0 || !cpl3.pages.some((a) => base.hostPages.has(a)));
  const scratch = full ? new Uint8Array(PAGE_SIZE) : undefined;
  // (Plain loops, no named closures: a loader that names them, as tsx does, makes each cost ~0.6 µs here.)
  for (let i = 0; i < base.slots.length; i++) {
    const slot = base.slots[i] as number;
    const r = snap.manifest.memory[i];
    if (!r) continue;
    const copies: number[] = [];
    // Harvested in both modes, so the next reset starts clean. A superset will do (each page
    // named gets the snapshot's bytes), but not for the control pages: they decide the CPL3 path.
    const exact = cpl3 && i === cpl3.region ? cpl3.controlPageIndices : NO_PAGES;
    const dirty = x.vm.dirtyPagesForReset ? x.vm.dirtyPagesForReset(slot, r.size, exact) : pagesOf(m.dirtyPages(slot));
    for (const p of exact) if (dirty.includes(p)) cpl3Ok = false;
    if (scratch) {
      for (let off = 0; off < r.size; off += PAGE_SIZE) {
        m.memory.readInto(r.start + BigInt(off), scratch);
        if (!Buffer.from(scratch.buffer).equals(image.subarray(r.offset + off, r.offset + off + PAGE_SIZE))) copies.push(off);
      }
    } else {
      for (const p of dirty) if (p * PAGE_SIZE < r.size) copies.push(p * PAGE_SIZE);
      if (base.hostPages.size > 0) { // (the copies, host writes too, join it only at the copy)
        const end = r.start + BigInt(r.size);
        const named = new Set(dirty);
        for (const a of base.hostPages) {
          if (a < r.start || a >= end) continue;
          const off = Number(a - r.start);
          if (!named.has(off / PAGE_SIZE)) copies.push(off);
        }
      }
    }
    m.memory.writePages(r.start, r.size, image, r.offset, copies);
    pages += copies.length;
  }
  let cpu = 'full' as ResetResult['cpu']; // (set inside `apply`)
  try {
    const vcpu0 = m.vcpus[0]?.backend;
    const stub = cpl3Ok && cpl3?.stub && vcpu0?.guestDebugging?.() === false ? cpl3.stub : undefined;
    let prelude: EntryPrelude | undefined;
    if (stub) {
      const cell = stub.at + BigInt(RESET_STUB.CELL);
      prelude = base.prelude ??= {
        at: stub.at, length: RESET_STUB.LENGTH, blob: 'xsave', bytes: stub.xsave,
        retarget: (rip) => { const c = new Uint8Array(8); new DataView(c.buffer).setBigUint64(0, rip, true); m.memory.write(cell, c); },
        // The stub goes into its (host-reserved, user read-only) page when the vCPU takes the
        // prelude (after the prelude of an earlier reset that never ran has put the page back)
        // and the snapshot's bytes go back once it has run, at the first exit: the guest can
        // read the stub only between the reset and that exit, and every stop sees the
        // snapshot's page, as a fresh fork would.
        arm: () => { m.memory.write(stub.at, stub.page); },
        // Written back as the snapshot has it: nothing for the next reset to copy.
        done: () => { m.memory.write(stub.at, stub.original); base.hostPages.delete(stub.at); },
      };
    }
    const apply = cpl3Ok && cpl3
      ? (vm: BackendVm, vcpus: readonly BackendVcpu[], mf: SnapshotManifest, rejected: Set<number>): void => {
        if (applyCpl3StateForReset(vm, vcpus, mf, cpl3.kvmclock, prelude)) cpu = 'cpl3';
        else applyCpuStateForReset(vm, vcpus, mf, rejected);
      }
      : applyCpuStateForReset;
    applyState(m, x, snap, apply);
  } catch (e) {
    throw e instanceof TsvmError ? e : new StateError(`reset of '${m.name}' failed: ${String(e)}`);
  } finally {
    base.hostPages.clear(); // the copies above are host writes too: memory now equals the snapshot
    base.debugTraps = x.debugTraps();
    base.stateVersion = m.vcpus[0]?.backend.stateVersion?.();
  }
  return { pagesCopied: pages, cpu };
}
