/**
 * Restore, fork and reset. A restored machine's RAM is the snapshot's image mapped
 * copy-on-write (no copy); restore and fork are the same operation, and every machine made
 * from a snapshot logs dirty pages so `Machine.reset()` re-copies only what the guest wrote.
 * Restore is all or nothing: the new machine is closed again on any failure and the error is a
 * {@link SnapshotFormatError} naming the field, with the backend's error as `cause`.
 * @module
 */
import type { Backend, BackendVcpu, BackendVm } from '../backend.js';
import type { DeviceMapping } from '../device.js';
import { InvalidArgumentError, SnapshotFormatError, StateError, TsvmError } from '../errors.js';
import { DmaGate } from '../dma.js';
import type { HostMemory } from '../memory.js';
import type { Machine, MachineOptions } from '../machine.js';
import { KvmBackend, kvmBackend } from '../backend/kvm.js';
import type { MachineInternals } from './internals.js';
import { PAGE_SIZE, type SnapshotManifest } from './manifest.js';
import { Snapshot, cpuSignature } from './snapshot.js';
import { applyCpuState, applyCpuStateForReset, step } from './apply.js';
import { MAX_VCPUS } from '../machine/state.js';
import type { PremappedRegion } from './pool.js';

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
}

const bases = new WeakMap<Machine, ResetBase>();
let forks = 0;

/**
 * `target` with the members in `overrides` replaced and every other member its own (methods
 * bound to it, made once): a wrapper that cannot fall behind what `target` offers.
 */
function overriding<T extends object>(target: T, overrides: Partial<T>): T {
  const bound = new Map<PropertyKey, unknown>();
  return new Proxy(target, {
    get(t, key) {
      if (Object.hasOwn(overrides, key)) return (overrides as Record<PropertyKey, unknown>)[key];
      let f = bound.get(key);
      if (f === undefined) {
        const v = (t as Record<PropertyKey, unknown>)[key];
        f = typeof v === 'function' ? v.bind(t) : v;
        bound.set(key, f);
      }
      return f;
    },
  });
}

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
  return overriding(vm, { allocateMemory: allocate, createVcpu, mapMemory });
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

/**
 * Creates a machine in the state of `snap`: RAM mapped copy-on-write from the snapshot's image,
 * vCPU, VM and device state applied. The result can be reset (`Machine.reset()`) to `snap`.
 */
export async function restoreMachine(
  snap: Snapshot,
  options: RestoreOptions,
  create: (o: MachineOptions) => Promise<Machine>,
  internals: (m: Machine) => MachineInternals,
): Promise<Machine> {
  if (!(snap instanceof Snapshot)) throw new InvalidArgumentError('snapshot', 'must be a Snapshot (from Machine.snapshot or Snapshot.load)');
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  const manifest = snap.manifest;
  const backend = options.backend ?? kvmBackend();
  checkHost(manifest, backend);
  const source = snap.mapSource();
  // The pool holds 1-vCPU VMs (see `Snapshot.prewarm`).
  const pooled = manifest.vcpus.length === 1 ? snap.takePooledVm(backend) : undefined;
  // The backend as it is (its clock, its CPUID probe, whatever else it offers) but for the VM it makes.
  const wrapped = overriding(backend, { createVm: (o) => imageBackedVm(pooled?.vm ?? backend.createVm(o), source, manifest, pooled?.vcpu, pooled?.memory) });
  let m: Machine;
  try {
    m = await create({
      memory: manifest.memory.map((r) => ({ start: r.start, size: r.size, readonly: r.readonly, name: r.name, logDirty: true })),
      backend: wrapped,
      irqchip: manifest.machine.irqchip,
      vcpus: manifest.vcpus.length,
      name: options.name ?? `${manifest.machine.name}~${++forks}`,
      ...(manifest.machine.cpu ? { cpu: manifest.machine.cpu } : {}),
      ...(options.vcpuThreads !== undefined ? { vcpuThreads: options.vcpuThreads } : {}),
    });
  } catch (e) {
    // Machine.create has already released whatever it made; a pooled vCPU it never took is ours.
    pooled?.vcpu.close();
    for (const r of pooled?.memory ?? []) { try { r.host.close(); } catch { /* may be closed already */ } }
    throw new SnapshotFormatError(`snapshot: memory: a machine of this shape cannot be created: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  try {
    const x = internals(m);
    const cpu = signatureOf(backend, m.vcpu(0).backend);
    if (cpu !== manifest.host.cpu) throw new SnapshotFormatError(`snapshot: host.cpu is '${manifest.host.cpu}', this host's CPU is '${cpu}'`);
    if (options.devices) m.attachDevice(options.devices);
    await options.setup?.(m);
    const slots = manifest.memory.map((r) => m.memory.regionAt(r.start, r.size).slot);
    applyState(m, x, snap, !pooled?.prepared);
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
    bases.set(m, { snapshot: snap, slots, hostPages });
    return m;
  } catch (e) {
    await m.close().catch(() => undefined);
    if (e instanceof SnapshotFormatError) throw e;
    throw new SnapshotFormatError(`snapshot: restore failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
}

/** Applies the snapshot's VM, vCPU (unless a pooled VM has it already) and device state. */
function applyState(m: Machine, x: MachineInternals, snap: Snapshot, cpu = true, apply = applyCpuState): void {
  const manifest = snap.manifest;
  if (cpu) apply(x.vm, m.vcpus.map((v) => v.backend), manifest, snap.rejectedMsrs);
  const attached = new Map(x.devices().map((d) => [d.name, d]));
  for (const [name, state] of Object.entries(manifest.devices)) {
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
  const scratch = full ? new Uint8Array(PAGE_SIZE) : undefined;
  base.slots.forEach((slot, i) => {
    const r = snap.manifest.memory[i];
    if (!r) return;
    const copy = (off: number): void => {
      m.memory.write(r.start + BigInt(off), image.subarray(r.offset + off, r.offset + off + PAGE_SIZE));
      pages++;
    };
    const bitmap = m.dirtyPages(slot); // harvested in both modes, so the next reset starts clean
    if (scratch) {
      for (let off = 0; off < r.size; off += PAGE_SIZE) {
        m.memory.readInto(r.start + BigInt(off), scratch);
        if (!Buffer.from(scratch.buffer).equals(image.subarray(r.offset + off, r.offset + off + PAGE_SIZE))) copy(off);
      }
      return;
    }
    const end = r.start + BigInt(r.size);
    for (const a of [...base.hostPages]) {
      if (a < r.start || a >= end) continue;
      const off = Number(a - r.start);
      const bit = off / PAGE_SIZE;
      if (((bitmap[bit >> 3] ?? 0) & (1 << (bit & 7))) === 0) copy(off);
    }
    for (let byte = 0; byte < bitmap.length; byte++) {
      let bits = bitmap[byte] as number;
      while (bits !== 0) {
        const bit = 31 - Math.clz32(bits & -bits);
        bits &= bits - 1;
        const off = (byte * 8 + bit) * PAGE_SIZE;
        if (off < r.size) copy(off);
      }
    }
  });
  try {
    applyState(m, x, snap, true, applyCpuStateForReset);
  } catch (e) {
    throw e instanceof TsvmError ? e : new StateError(`reset of '${m.name}' failed: ${String(e)}`);
  } finally {
    base.hostPages.clear(); // the copies above are host writes too: memory now equals the snapshot
  }
  return { pagesCopied: pages };
}
