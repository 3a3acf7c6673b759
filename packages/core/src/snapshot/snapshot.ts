/**
 * `Snapshot`: a validated manifest plus a frozen memory image. Taking one copies only the
 * non-zero pages of guest RAM into a fresh memfd (zero pages stay holes, so the image is
 * sparse in RAM and on disk); nothing writes to that memfd afterwards, so later writes by the
 * original machine never reach the machines restored or forked from it, which map the image
 * copy-on-write.
 * @module
 */
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, openSync, readSync, writeSync, ftruncateSync, renameSync, unlinkSync } from 'node:fs';
import type { Backend, BackendVcpu, MsrEntry } from '../backend.js';
import { InvalidArgumentError, SnapshotFormatError, StateError } from '../errors.js';
import type { HostMemory, GuestMemory } from '../memory.js';
import type { Machine } from '../machine.js';
import type { MachineInternals } from './internals.js';
import { kvmBackend } from '../backend/kvm.js';
import { VmPool, releasePooled, type PooledVm, type PremappedRegion } from './pool.js';
import { applyCpuState } from './apply.js';
import { DIRTY_RING_BYTES, cheaperDirtyTracking, type DirtyTracking } from './dirty-tracking.js';

/**
 * @internal How {@link Snapshot.prewarm} gets machines built ahead: `Machine` (which owns
 * `Machine.create`) sets `schedule` when it loads, so this module does not import it.
 */
export const prebuilding: { schedule?: (snap: Snapshot, backend: Backend) => void } = {};

/** Closed forks' VMs a snapshot keeps for its next forks. */
const RETURNED_VMS = 2;
/** The generation a build from a returned VM carries (it belongs to no `prewarm`). */
const RETURNED = -1;

/** Options of {@link Snapshot.prewarm}. */
export interface PrewarmOptions {
  /** How pooled VMs find dirty pages for reset: by price (`'auto'`, the default), or forced. */
  readonly dirtyTracking?: 'auto' | DirtyTracking;
}
import {
  PAGE_SIZE, SNAPSHOT_FORMAT, SNAPSHOT_VERSION, TSVM_VERSION, ZERO_PAGE, encodeManifest, parseManifest,
  type SnapshotManifest, type SnapshotRegion, type SnapshotVcpu,
} from './manifest.js';

const MAGIC = Buffer.from('TSVMSNP\0', 'latin1');
/** magic(8) + header version(4) + manifest length(4) + sha256 of the manifest(32). */
const HEADER = 48;
const MAX_MANIFEST = 16 * 1024 * 1024;
const CHUNK = 1 << 20;

/** A machine's state at one instant: restore it, fork it, reset to it, save it. */
export class Snapshot {
  /** The validated manifest (everything but RAM). */
  readonly manifest: SnapshotManifest;
  /**
   * The frozen memory image; every region's bytes at its `offset`. SAFETY: owned by this
   * snapshot and only read (by reset); forks map its fd privately, so `close()` while forks
   * live is safe for them (their mappings keep the pages).
   */
  readonly #image: HostMemory;
  #closed = false;
  /** MSRs a vCPU of this host refused to take back (learned on the first restore). */
  readonly rejectedMsrs = new Set<number>();

  /** Where forks map the image from: a memfd at 0, or the snapshot file past its manifest. */
  readonly #source: { readonly memory: HostMemory; readonly base: number };

  /**
   * @internal use `Machine.snapshot()` or {@link Snapshot.load}.
   * @param image - the image's bytes (read by reset); closed with the snapshot.
   * @param source - what forks map, if not `image` itself (a file); closed with the snapshot.
   */
  constructor(manifest: SnapshotManifest, image: HostMemory, source?: { memory: HostMemory; base: number }) {
    this.manifest = manifest;
    this.#image = image;
    this.#source = source ?? { memory: image, base: 0 };
  }

  /** @internal what forks map copy-on-write, and the file offset of the image in it. */
  mapSource(): { readonly memory: HostMemory; readonly base: number } {
    this.image();
    return this.#source;
  }

  /** Bytes of guest RAM the snapshot describes. */
  get memorySize(): number {
    return this.manifest.imageSize;
  }

  /** Bytes actually stored: non-zero pages only. */
  get storedBytes(): number {
    return this.manifest.memory.reduce((n, r) => n + r.storedPages * PAGE_SIZE, 0);
  }

  /** @internal the image, for restore and reset (throws after close). */
  image(): HostMemory {
    if (this.#closed) throw new StateError('the snapshot is closed');
    return this.#image;
  }

  /**
   * Writes the snapshot to `path` (atomically: a temporary file, then rename): a 48-byte header
   * (magic, version, manifest length and SHA-256), the manifest JSON, then the image from the
   * next 4 KiB boundary with zero pages left as holes.
   * @returns bytes of the file, holes included.
   */
  save(path: string): number {
    if (typeof path !== 'string' || path === '') throw new InvalidArgumentError('path', 'must be a non-empty string');
    const img = this.image();
    const json = Buffer.from(JSON.stringify(encodeManifest(this.manifest)), 'utf8');
    const header = Buffer.alloc(HEADER);
    MAGIC.copy(header, 0);
    header.writeUInt32LE(SNAPSHOT_VERSION, 8);
    header.writeUInt32LE(json.length, 12);
    createHash('sha256').update(json).digest().copy(header, 16);
    const imageAt = roundUp(HEADER + json.length);
    const tmp = `${path}.tmp-${process.pid}`;
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeSync(fd, header, 0, HEADER, 0);
      writeSync(fd, json, 0, json.length, HEADER);
      ftruncateSync(fd, imageAt + this.manifest.imageSize);
      const bytes = Buffer.from(img.bytes.buffer, img.bytes.byteOffset, this.manifest.imageSize);
      for (let off = 0; off < this.manifest.imageSize; off += PAGE_SIZE) {
        const page = bytes.subarray(off, off + PAGE_SIZE);
        if (!page.equals(ZERO_PAGE)) writeSync(fd, page, 0, PAGE_SIZE, imageAt + off);
      }
    } catch (e) {
      closeSync(fd);
      try { unlinkSync(tmp); } catch { /* already gone */ }
      throw e;
    }
    closeSync(fd);
    renameSync(tmp, path);
    return imageAt + this.manifest.imageSize;
  }

  /**
   * Opens a snapshot written by {@link save}. The file is untrusted: a bad magic, version,
   * checksum or manifest, or a file shorter than its manifest says, is a
   * {@link SnapshotFormatError} naming what is wrong. Nothing is copied: machines restored from
   * it map the file's image copy-on-write, so the file must stay as it is (not truncated or
   * rewritten in place) while the snapshot or its machines live — `save` replaces files by
   * rename, which is safe.
   */
  static load(path: string, backend: Backend): Snapshot {
    if (typeof path !== 'string' || path === '') throw new InvalidArgumentError('path', 'must be a non-empty string');
    const fd = openSync(path, 'r');
    try {
      return Snapshot.#read(fd, fstatSync(fd).size, backend);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  static #read(fd: number, fileSize: number, backend: Backend): Snapshot {
    const header = Buffer.alloc(HEADER);
    if (fileSize < HEADER || readSync(fd, header, 0, HEADER, 0) !== HEADER) throw new SnapshotFormatError(`snapshot file: header: the file has ${fileSize} bytes, fewer than the ${HEADER}-byte header`);
    if (!header.subarray(0, 8).equals(MAGIC)) throw new SnapshotFormatError('snapshot file: header.magic: not a tsvm snapshot');
    const version = header.readUInt32LE(8);
    if (version !== SNAPSHOT_VERSION) throw new SnapshotFormatError(`snapshot file: header.version: ${version}; this build reads version ${SNAPSHOT_VERSION} only`);
    const len = header.readUInt32LE(12);
    if (len > MAX_MANIFEST || HEADER + len > fileSize) throw new SnapshotFormatError(`snapshot file: header.manifestLength: ${len} bytes do not fit in the ${fileSize}-byte file`);
    const json = Buffer.alloc(len);
    if (readSync(fd, json, 0, len, HEADER) !== len) throw new SnapshotFormatError('snapshot file: manifest: short read');
    if (!createHash('sha256').update(json).digest().equals(header.subarray(16, 48))) throw new SnapshotFormatError('snapshot file: header.sha256: the manifest does not match its checksum');
    let raw: unknown;
    try {
      raw = JSON.parse(json.toString('utf8'));
    } catch (e) {
      throw new SnapshotFormatError('snapshot file: manifest: not valid JSON', { cause: e });
    }
    const manifest = parseManifest(raw);
    const imageAt = roundUp(HEADER + len);
    if (fileSize < imageAt + manifest.imageSize) {
      throw new SnapshotFormatError(`snapshot file: imageSize: the manifest needs ${imageAt + manifest.imageSize} bytes, the file has ${fileSize} (truncated?)`);
    }
    // The file itself is the image: a private mapping (for reset's reads) and the fd forks map.
    // The size check above is what keeps a later access from SIGBUS-ing past the end.
    let open = true;
    const file: HostMemory = { fd, bytes: new Uint8Array(0), hostAddress: 0n, close: () => { if (open) { open = false; closeSync(fd); } } };
    const vm = backend.createVm({ irqchip: false });
    let view: HostMemory;
    try {
      view = vm.allocateMemoryFrom(file, imageAt, Math.max(manifest.imageSize, PAGE_SIZE), 'tsvm-snapshot-file');
    } finally {
      vm.close();
    }
    return new Snapshot(manifest, view, { memory: file, base: imageAt });
  }

  #pool: VmPool | undefined;
  /** Machines built ahead from pooled VMs (CPU state applied, no devices yet), see {@link prewarm}. */
  readonly #prebuilt: Machine[] = [];
  #prebuiltTarget = 0;

  /**
   * Keeps `count` VMs ready for `Machine.fork(this)` / `Machine.restore(this)` on `backend`,
   * each with this snapshot's RAM mapped and vCPU state applied, and builds up to `count`
   * machines from them ahead (on the event loop, one per turn; devices, `setup` and device state
   * are a fork's own), refilled after each fork: VM creation (~0.5 ms on PVM) and most of
   * `Machine.create` then stay off the fork's latency. (A machine built ahead starts its guest
   * clock when it is built, as a pooled VM does.) `prewarm(0)` releases them; so does
   * {@link close}, which also releases the VMs closed forks left for the next ones (up to 2,
   * kept without any `prewarm`). A snapshot of a machine with several vCPUs keeps no pool (yet), and a fork
   * with `vcpuThreads: 'parallel'` builds its own machine.
   *
   * Pooled VMs track dirty pages the way `options.dirtyTracking` says: `'auto'` (the default)
   * picks what this host prices lower for a reset (see {@link cheaperDirtyTracking}; measured
   * once per process, ~5 ms, the first time), `'log'` / `'ring'` force one (`'ring'` falls back to
   * the log where the host has no rings). {@link dirtyTracking} says what was chosen.
   */
  prewarm(count: number, backend: Backend = kvmBackend(), options: PrewarmOptions = {}): void {
    if (!Number.isSafeInteger(count) || count < 0 || count > 256) throw new InvalidArgumentError('count', `must be an integer in [0, 256], got ${String(count)}`);
    if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    const want = options.dirtyTracking ?? 'auto';
    if (want !== 'auto' && want !== 'log' && want !== 'ring') throw new InvalidArgumentError('options.dirtyTracking', `must be 'auto', 'log' or 'ring', got ${String(want)}`);
    this.image();
    this.#pool?.close();
    this.#dropPrebuilt();
    const manifest = this.manifest;
    const source = this.mapSource();
    const tracking = count === 0 ? 'log' : want === 'auto' ? cheaperDirtyTracking(backend) : want;
    this.#dirtyTracking = tracking;
    const vmOptions = tracking === 'ring' ? { irqchip: manifest.machine.irqchip, dirtyRing: DIRTY_RING_BYTES } : { irqchip: manifest.machine.irqchip };
    this.#pool = count === 0 || manifest.vcpus.length > 1 ? undefined : new VmPool(backend, vmOptions, count,
      (vm, vcpu) => applyCpuState(vm, [vcpu], manifest, this.rejectedMsrs),
      // Guest RAM too: a fresh machine's regions get slots 0, 1, … in order, as here.
      (vm) => {
        const out: PremappedRegion[] = [];
        try {
          manifest.memory.forEach((r, slot) => {
            const host = vm.allocateMemoryFrom(source.memory, source.base + r.offset, r.size, `tsvm-${r.name}`);
            out.push({ slot, start: r.start, size: r.size, readonly: r.readonly, host });
            vm.mapMemory(slot, r.start, host, r.size, { readonly: r.readonly, logDirty: true });
          });
          return out;
        } catch (e) {
          for (const r of out) r.host.close();
          throw e;
        }
      },
      // Machines built ahead hold pooled VMs: together they make `count`.
      { inUse: () => this.#prebuilt.length + this.#building, onReady: () => prebuilding.schedule?.(this, backend) });
    if (this.#pool) {
      this.#prebuiltTarget = count;
      prebuilding.schedule?.(this, backend);
    }
  }

  #building = 0;
  /** Bumped by each `prewarm` and by `close`: a build begun under an earlier one is not kept. */
  #generation = 0;

  /**
   * @internal A pooled VM to build a machine ahead from, when {@link prewarm} wants one more on
   * `backend` and the pool has a VM ready, with the generation to hand back; counted against the
   * pool until {@link keepPrebuilt} or {@link prebuildFailed}.
   */
  takeVmToPrebuild(backend: Backend): { vm: NonNullable<ReturnType<VmPool['take']>>; generation: number } | undefined {
    if (this.#closed) return undefined;
    const returned = takeFor(this.#returned, backend);
    if (returned) {
      this.#buildingReturned++;
      return { vm: returned.vm, generation: RETURNED };
    }
    if (!this.#pool || this.#pool.backend !== backend || this.#pool.size === 0) return undefined;
    if (this.#prebuilt.length + this.#building >= this.#prebuiltTarget) return undefined;
    const vm = this.#pool.take();
    if (!vm) return undefined;
    this.#building++;
    return { vm, generation: this.#generation };
  }

  /** @internal Keeps a machine built ahead for the next fork on `backend`; false (the caller closes it) when no longer wanted. */
  keepPrebuilt(backend: Backend, m: Machine, generation: number): boolean {
    if (generation === RETURNED) {
      this.#buildingReturned = Math.max(0, this.#buildingReturned - 1);
      if (this.#closed) return false;
      this.#returnedMachines.push({ backend, machine: m });
      return true;
    }
    if (generation !== this.#generation) return false;
    this.#building = Math.max(0, this.#building - 1);
    if (this.#closed || this.#pool?.backend !== backend || this.#prebuilt.length >= this.#prebuiltTarget) return false;
    this.#prebuilt.push(m);
    return true;
  }

  /**
   * @internal A build from {@link takeVmToPrebuild} failed (its VM is released). No more are
   * built ahead for this `prewarm` (a failure that repeats would churn VMs); the pool makes up
   * for the VM, and forks take pooled VMs (and report the failure themselves).
   */
  prebuildFailed(generation: number): void {
    if (generation === RETURNED) { this.#buildingReturned = Math.max(0, this.#buildingReturned - 1); return; }
    if (generation !== this.#generation) return;
    this.#building = Math.max(0, this.#building - 1);
    this.#prebuiltTarget = 0;
    this.#pool?.refill();
  }

  /** VMs of closed forks, made ready again (see {@link keepReturnedVm}), with their backend. */
  readonly #returned: { readonly backend: Backend; readonly vm: PooledVm }[] = [];
  /** Machines built ahead from returned VMs, with their backend. */
  readonly #returnedMachines: { readonly backend: Backend; readonly machine: Machine }[] = [];
  /** Returned VMs a machine is being built from. */
  #buildingReturned = 0;

  /** @internal How many closed forks' VMs wait for the next forks, as VMs or as machines built from them (diagnostics, tests). */
  get returnedVms(): number {
    return this.#returned.length + this.#returnedMachines.length + this.#buildingReturned;
  }

  /** @internal Whether a closed fork's VM would be kept now (at most {@link RETURNED_VMS}). */
  wantsReturnedVm(): boolean {
    return !this.#closed && !this.#dropping && this.returnedVms < RETURNED_VMS;
  }

  /** Set while {@link prewarm} releases what it built: those VMs are released, not returned. */
  #dropping = false;

  /**
   * @internal Keeps a closed fork's VM on `backend` (wiped, RAM back to this image, state
   * applied: `restore.ts`) for the next fork, which then creates none, and has a machine built
   * from it ahead (as `prewarm`'s are); false (the caller releases it) when not kept.
   */
  keepReturnedVm(backend: Backend, vm: PooledVm): boolean {
    if (!this.wantsReturnedVm()) return false;
    this.#returned.push({ backend, vm });
    prebuilding.schedule?.(this, backend);
    return true;
  }

  /** @internal A machine built ahead on `backend`, if one is ready (the pool then makes a VM for the next). */
  takePrebuilt(backend: Backend): Machine | undefined {
    const m = this.#pool?.backend === backend ? this.#prebuilt.shift() : undefined;
    if (m) { this.#pool?.refill(); return m; }
    return takeFor(this.#returnedMachines, backend)?.machine;
  }

  /** Closes the machines built ahead (their VMs are released in the background, see `Machine.released`). */
  #dropPrebuilt(): void {
    this.#prebuiltTarget = 0;
    this.#building = 0;
    this.#generation++;
    // (A machine's close hands its VM on synchronously, before its first await.)
    this.#dropping = true;
    try {
      for (const m of this.#prebuilt.splice(0)) void m.close().catch(() => undefined);
    } finally {
      this.#dropping = false;
    }
  }

  #dirtyTracking: DirtyTracking = 'log';

  /**
   * The dirty-page tracking {@link prewarm} chose for pooled VMs (`'log'` before any prewarm).
   * A VM falls back to the log where the host refuses rings: `BackendVm.dirtyTracking` is the truth per machine.
   */
  get dirtyTracking(): DirtyTracking {
    return this.#dirtyTracking;
  }

  /** @internal a ready VM for a fork on `backend`, if this snapshot keeps a pool for it. */
  takePooledVm(backend: Backend): ReturnType<VmPool['take']> {
    return takeFor(this.#returned, backend)?.vm ?? (this.#pool?.backend === backend ? this.#pool.take() : undefined);
  }

  /** Releases the image and any pooled VMs. Machines restored or forked from it keep running. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#dropPrebuilt();
    this.#pool?.close();
    for (const { vm } of this.#returned.splice(0)) releasePooled(vm);
    for (const { machine } of this.#returnedMachines.splice(0)) void machine.close().catch(() => undefined);
    this.#image.close();
    if (this.#source.memory !== this.#image) this.#source.memory.close();
  }

  /** `using snap = await vm.snapshot()`. */
  [Symbol.dispose](): void {
    this.close();
  }
}

/** Removes and returns the first entry of `list` for `backend`. */
function takeFor<T extends { readonly backend: Backend }>(list: T[], backend: Backend): T | undefined {
  const i = list.findIndex((r) => r.backend === backend);
  return i >= 0 ? list.splice(i, 1)[0] : undefined;
}

/**
 * Host memory for an image, of no machine: the backend's own (`Backend.allocateMemory`), else
 * allocated through a throw-away VM.
 */
function allocateImage(backend: Backend, size: number): HostMemory {
  if (backend.allocateMemory) return backend.allocateMemory(Math.max(size, PAGE_SIZE), 'tsvm-snapshot');
  const vm = backend.createVm({ irqchip: false });
  try {
    return vm.allocateMemory(Math.max(size, PAGE_SIZE), 'tsvm-snapshot');
  } finally {
    vm.close();
  }
}

function roundUp(n: number): number {
  return Math.ceil(n / PAGE_SIZE) * PAGE_SIZE;
}

/** Copies the non-zero pages of `src` to `dst` at `at`; returns how many there were. */
function copyNonZeroPages(src: Uint8Array, dst: Uint8Array, at: number): number {
  const b = Buffer.from(src.buffer, src.byteOffset, src.byteLength);
  let n = 0;
  for (let off = 0; off < b.length; off += PAGE_SIZE) {
    const page = b.subarray(off, off + PAGE_SIZE);
    // memcmp against a zero page: an order of magnitude faster than a JS loop.
    if (page.equals(ZERO_PAGE)) continue;
    dst.set(page, at + off);
    n++;
  }
  return n;
}

/** CPUID vendor and leaf-1 signature: restoring on another CPU model is refused. */
export function cpuSignature(vcpu: BackendVcpu): string {
  const t = vcpu.supportedCpuid();
  const l0 = t.find((e) => e.function === 0);
  const l1 = t.find((e) => e.function === 1);
  if (!l0 || !l1) return 'unknown';
  const b = Buffer.alloc(12);
  b.writeUInt32LE(l0.ebx >>> 0, 0); b.writeUInt32LE(l0.edx >>> 0, 4); b.writeUInt32LE(l0.ecx >>> 0, 8);
  return `${b.toString('latin1').replace(/[^\x20-\x7e]/g, '?')}:0x${(l1.eax >>> 0).toString(16)}`;
}

/** Reads every MSR of the index list that this vCPU lets us read (KVM stops at the first it refuses). */
function readMsrs(vcpu: BackendVcpu): MsrEntry[] {
  const want = vcpu.msrIndexList();
  const out: MsrEntry[] = [];
  let i = 0;
  while (i < want.length) {
    const got = vcpu.getMsrs(want.slice(i));
    out.push(...got);
    i += got.length + 1; // skip the one KVM refused
  }
  return out;
}

/** Captures `m` (stopped) into a new in-memory snapshot. */
export function takeSnapshot(m: Machine, x: MachineInternals): Snapshot {
  if (x.running) throw new StateError('cannot snapshot a running machine; let run() return first');
  const vcpus: SnapshotVcpu[] = m.vcpus.map((v) => {
    const b = v.backend;
    // KVM finishes an I/O or MMIO exit on the next KVM_RUN: do it now, or the saved RIP/RAX
    // would be from before the access completed.
    b.completePendingExit();
    return { id: v.id, regs: b.getRegs(), sregs: b.getSregs(), msrs: readMsrs(b), blobs: b.getState() };
  });
  const devices: Record<string, unknown> = {};
  for (const d of x.devices()) {
    if (!d.snapshot) continue;
    if (Object.hasOwn(devices, d.name)) throw new StateError(`two attached devices are named '${d.name}': a snapshot stores device state by name`);
    try {
      devices[d.name] = structuredClone(d.snapshot());
    } catch (e) {
      throw new StateError(`device '${d.name}': snapshot() failed or returned a value that cannot be stored: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  const vmState = x.vm.getState();
  const regions = m.memory.regions();
  const imageSize = regions.reduce((n, r) => n + r.size, 0);
  const image = allocateImage(m.backend, imageSize);
  try {
    let offset = 0;
    const memory: SnapshotRegion[] = regions.map((r) => {
      // Only where the host memory holds data (a never-written page reads as zeros, and reading
      // it through the mapping would allocate it): the whole region where that is not known.
      const extents = m.memory.dataExtents(r.slot) ?? [[0, r.size] as const];
      let stored = 0;
      for (const [from, to] of extents) {
        const end = Math.min(to, r.size);
        if (end > from) stored += copyRegion(m.memory, BigInt(r.start) + BigInt(from), end - from, image.bytes, offset + from);
      }
      const out = { slot: r.slot, start: BigInt(r.start), size: r.size, readonly: r.readonly, name: r.name, offset, storedPages: stored };
      offset += r.size;
      return out;
    });
    const cpu = x.cpu();
    const manifest: SnapshotManifest = {
      format: SNAPSHOT_FORMAT, version: SNAPSHOT_VERSION, tsvm: TSVM_VERSION,
      host: { backend: m.backend.name, flavour: m.capabilities.flavour, cpu: cpuSignature(m.vcpu(0).backend) },
      machine: { name: m.name, irqchip: m.irqchip, mode: cpu.mode, systemArea: cpu.systemArea ?? null, ...(m.cpuModel ? { cpu: m.cpuModel } : {}) },
      memory, imageSize, vcpus, vm: vmState, devices,
    };
    // What we write is what we read back: a snapshot that would not load is a bug here, now.
    return new Snapshot(parseManifest(JSON.parse(JSON.stringify(encodeManifest(manifest)))), image);
  } catch (e) {
    image.close();
    throw e;
  }
}

function copyRegion(mem: GuestMemory, start: bigint | number, size: number, dst: Uint8Array, at: number): number {
  const buf = new Uint8Array(Math.min(CHUNK, size));
  let n = 0;
  for (let off = 0; off < size; off += CHUNK) {
    const len = Math.min(CHUNK, size - off);
    const chunk = len === buf.length ? buf : buf.subarray(0, len);
    mem.readInto(BigInt(start) + BigInt(off), chunk);
    n += copyNonZeroPages(chunk, dst, at + off);
  }
  return n;
}
