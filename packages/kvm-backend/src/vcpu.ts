/**
 * A vCPU fd and its mmap'd `kvm_run`. One method per ioctl; {@link KvmVcpu.run} does one
 * `KVM_RUN` and returns a copied-out {@link KvmExit}, and the `complete*` methods write the
 * answer to an exit that needs one (`in`, MMIO read, MSR) into `kvm_run` for the next
 * `KVM_RUN` to consume. The mapping itself never leaves this class.
 * @module
 */
import { C, addressOf, errno, libc, viewOf, type NativePointer } from './raw/libc.js';

/** What `mmap` returns on failure: `(void *)-1`. */
const MAP_FAILED = 0xffffffffffffffffn;
import * as S from './raw/structs.js';
import { KVM, KVM_CONST } from './raw/ioctls.js';
import { decodeRegs, decodeSregs, dv, encodeCpuid, encodeRegs, encodeSregs } from './raw/codec.js';
import { KvmError, TsvmError } from './errors.js';
import { closeFd, ioctlPtr } from './fd.js';
import { heldFd, heldMapping, releasingMapping } from './ledger.js';
import { INTR, Pending, decodeExit, type KvmExit, type PendingAnswer } from './exit.js';
import type { CoalescedEntry, CpuidEntry, MsrEntry, Regs, Sregs } from './types.js';

const PAGE = 4096;
const O = S.KVM_RUN_OFFSETS;

/** Which raw vCPU state blob {@link KvmVcpu.getBlob} reads (each is one `KVM_GET_*` ioctl). */
export type KvmStateBlob = 'fpu' | 'lapic' | 'events' | 'debugregs' | 'xsave' | 'xcrs';

/** An open vCPU. */
export class KvmVcpu {
  /** vCPU fd, or -1 after close. */
  fd: number;
  /** vCPU id. */
  readonly id: number;
  // SAFETY: both views cover this vCPU's `kvm_run` mapping and are private to this class, so
  // nothing can hold them past `close()`, which unmaps the mapping and swaps in empty views.
  // Exits are copied out of them at decode time (`decodeExit`).
  #run: DataView;
  #runBytes: Uint8Array;
  readonly #mmapSize: number;
  #ptr: NativePointer;
  readonly #ioctl = libc().ioctlInt;
  readonly #runReq = KVM.KVM_RUN;
  readonly #regsBuf = new Uint8Array(S.sizeOf(S.kvm_regs));
  readonly #sregsBuf = new Uint8Array(S.sizeOf(S.kvm_sregs));
  /** What the last exit waits for; written by `decodeExit`. */
  readonly #answer: PendingAnswer = { pending: Pending.None, ioOffset: 0, ioLength: 0 };

  /** @internal use `KvmVm.createVcpu`. */
  constructor(fd: number, id: number, mmapSize: number) {
    this.fd = fd;
    this.id = id;
    this.#mmapSize = mmapSize;
    heldFd(fd);
    const ptr = libc().mmap(null, mmapSize, C.PROT_READ | C.PROT_WRITE, C.MAP_SHARED, fd, 0);
    if (ptr === null || addressOf(ptr) === MAP_FAILED) throw new KvmError('mmap(kvm_run)', errno());
    heldMapping(ptr, mmapSize);
    this.#ptr = ptr;
    const ab = viewOf(ptr, mmapSize);
    this.#run = new DataView(ab);
    this.#runBytes = new Uint8Array(ab);
  }

  /**
   * `KVM_RUN`, decoded. An interrupted run (a signal such as the slice timer, or
   * `immediate_exit`) is the `'intr'` exit; any other failure throws {@link KvmError}.
   * An answer to the previous exit that was not given (`complete*`) is lost: KVM reads
   * whatever the mapping holds.
   */
  run(): KvmExit {
    const r = this.#ioctl(this.fd, this.#runReq, 0);
    return this.decodeRun(r < 0 ? -errno() : r);
  }

  /**
   * Decodes the `KVM_RUN` another thread issued on this vCPU's fd (a {@link VcpuRunners}
   * runner): `result` is what the ioctl returned, or `-errno`. Exactly what {@link run} returns
   * for the same outcome; call it only once that ioctl has returned.
   */
  decodeRun(result: number): KvmExit {
    const a = this.#answer;
    a.pending = Pending.None;
    if (result < 0) {
      const e = -result;
      if (e === C.EINTR || e === C.EAGAIN) return INTR;
      throw new KvmError('KVM_RUN', e);
    }
    return decodeExit(this.#run.getUint32(O.exit_reason, true), this.#run, this.#runBytes, a);
  }

  #notPending(what: string): TsvmError {
    return new TsvmError('TSVM_KVM_NO_PENDING_EXIT', `${what}: the last exit of vCPU ${this.id} was not one`);
  }

  /**
   * Answers a pending `in` exit: the first `size * count` bytes of `data` (fewer if `data` is
   * shorter) are what the guest reads when `KVM_RUN` resumes it.
   * @throws TsvmError `TSVM_KVM_NO_PENDING_EXIT` when the last exit was not an `in`.
   */
  completeIoIn(data: Uint8Array): void {
    const a = this.#answer;
    if (a.pending !== Pending.IoIn) throw this.#notPending('completeIoIn');
    this.#runBytes.set(data.length > a.ioLength ? data.subarray(0, a.ioLength) : data, a.ioOffset);
    a.pending = Pending.None;
  }

  /**
   * Answers a pending MMIO read with up to 8 bytes (`mmio.data`).
   * @throws TsvmError `TSVM_KVM_NO_PENDING_EXIT` when the last exit was not an MMIO read.
   */
  completeMmioRead(data: Uint8Array): void {
    if (this.#answer.pending !== Pending.MmioRead) throw this.#notPending('completeMmioRead');
    this.#runBytes.set(data.length > 8 ? data.subarray(0, 8) : data, O.mmio_data);
    this.#answer.pending = Pending.None;
  }

  /**
   * Answers a pending `rdmsr`/`wrmsr` exit: `data` is the value `rdmsr` returns (ignored for
   * `wrmsr`); `error` makes the guest's instruction raise #GP instead.
   * @throws TsvmError `TSVM_KVM_NO_PENDING_EXIT` when the last exit was not an MSR access.
   */
  completeMsr(data: bigint, error: boolean): void {
    if (this.#answer.pending !== Pending.Msr) throw this.#notPending('completeMsr');
    this.#run.setUint8(O.msr_error, error ? 1 : 0);
    this.#run.setBigUint64(O.msr_data, BigInt.asUintN(64, data), true);
    this.#answer.pending = Pending.None;
  }

  /** Sets `kvm_run.immediate_exit` (the next `KVM_RUN` returns at once with EINTR). */
  setImmediateExit(on: boolean): void {
    this.#run.setUint8(O.immediate_exit, on ? 1 : 0);
  }

  /**
   * Finishes the exit KVM last reported (an `in`/`out` or MMIO access, which KVM completes
   * only on the next `KVM_RUN`) without running any further guest instruction: `KVM_RUN` with
   * `immediate_exit` set, as the KVM API documents for saving state after an I/O exit.
   * A pending `in` or MMIO read that was never answered reads all-ones, what a PC bus returns
   * when no device drives it (so a `rep ins` never stores stale bytes into guest memory).
   */
  completePendingExit(): void {
    const a = this.#answer;
    if (a.pending === Pending.IoIn) this.#runBytes.fill(0xff, a.ioOffset, a.ioOffset + a.ioLength);
    else if (a.pending === Pending.MmioRead) this.#runBytes.fill(0xff, O.mmio_data, O.mmio_data + 8);
    a.pending = Pending.None;
    this.setImmediateExit(true);
    try {
      const r = this.#ioctl(this.fd, this.#runReq, 0);
      if (r < 0) {
        const e = errno();
        if (e !== C.EINTR && e !== C.EAGAIN) throw new KvmError('KVM_RUN (immediate_exit)', e);
      }
    } finally {
      this.setImmediateExit(false);
    }
  }

  /**
   * Queues exception `vector` (with `errorCode` when given) for delivery at the next entry:
   * `KVM_GET_VCPU_EVENTS`, set `exception.{injected,nr,has_error_code,error_code}`,
   * `KVM_SET_VCPU_EVENTS`.
   */
  injectException(vector: number, errorCode?: number): void {
    const b = this.getBlob('events');
    const v = dv(b);
    const O = S.VCPU_EVENTS_OFFSETS;
    v.setUint8(O.exception_injected, 1);
    v.setUint8(O.exception_nr, vector);
    v.setUint8(O.exception_has_error_code, errorCode === undefined ? 0 : 1);
    v.setUint8(O.exception_pending, 0);
    v.setUint32(O.exception_error_code, errorCode ?? 0, true);
    this.setBlob('events', b);
  }

  /**
   * Asks KVM to store the general-purpose registers into `kvm_run.s.regs` at every exit
   * (`kvm_valid_regs = KVM_SYNC_X86_REGS`; needs `KVM_CAP_SYNC_REGS`), so
   * {@link syncedRegs} reads them without an ioctl; `false` stops it. With `sregs` the special
   * registers travel too (`KVM_SYNC_X86_SREGS`, read with {@link syncedSregs}); they are loaded
   * from `kvm_run` only after {@link setSyncedSregs}.
   */
  setSyncRegs(on: boolean, sregs = false): void {
    const bits = on ? KVM_CONST.SYNC_X86_REGS | (sregs ? KVM_CONST.SYNC_X86_SREGS : 0) : 0;
    this.#run.setBigUint64(O.kvm_valid_regs, BigInt(bits), true);
  }

  /** The registers KVM stored at the last exit (valid only with {@link setSyncRegs} on, after a `KVM_RUN`). */
  syncedRegs(): Regs {
    return decodeRegs(this.#runBytes.subarray(O.sync_regs, O.sync_regs + this.#regsBuf.length));
  }

  /** The special registers KVM stored at the last exit (valid only with `setSyncRegs(true, true)`, after a `KVM_RUN`). */
  syncedSregs(): Sregs {
    const at = O.sync_regs + this.#regsBuf.length; // struct kvm_sync_regs { kvm_regs regs; kvm_sregs sregs; ... }
    return decodeSregs(this.#runBytes.subarray(at, at + this.#sregsBuf.length));
  }

  /**
   * Writes registers into `kvm_run.s.regs` and marks them dirty: KVM loads them at the start
   * of the next `KVM_RUN`, without a `KVM_SET_REGS`. Note that KVM's register load also drops
   * a pending exception, so an exception queued since is lost: use {@link setRegs} then.
   */
  setSyncedRegs(regs: Regs): void {
    const to = this.#runBytes.subarray(O.sync_regs, O.sync_regs + this.#regsBuf.length);
    const known = Object.isFrozen(regs) ? ENCODED_REGS.get(regs) : undefined; // as in setSyncedSregs
    if (known) to.set(known);
    else {
      encodeRegs(regs, to);
      if (Object.isFrozen(regs)) ENCODED_REGS.set(regs, to.slice());
    }
    const d = this.#run.getBigUint64(O.kvm_dirty_regs, true);
    this.#run.setBigUint64(O.kvm_dirty_regs, d | BigInt(KVM_CONST.SYNC_X86_REGS), true);
  }

  /**
   * Writes special registers into `kvm_run.s.regs.sregs` and marks them dirty: the next
   * `KVM_RUN` loads them (KVM's `sync_regs`, which runs before it completes a pending I/O
   * exit: finish that first) without a `KVM_SET_SREGS`. Needs `KVM_SYNC_X86_SREGS`.
   */
  setSyncedSregs(sregs: Sregs): void {
    const to = this.#runBytes.subarray(O.sync_sregs, O.sync_sregs + this.#sregsBuf.length);
    // Encoding costs ~4 µs (~100 BigInt stores); a frozen object cannot change, so its bytes are kept.
    const known = Object.isFrozen(sregs) ? ENCODED_SREGS.get(sregs) : undefined;
    if (known) to.set(known);
    else {
      encodeSregs(sregs, to);
      if (Object.isFrozen(sregs) && Object.values(sregs).every((x) => typeof x !== 'object' || Object.isFrozen(x))) ENCODED_SREGS.set(sregs, to.slice());
    }
    this.#markSyncDirty(KVM_CONST.SYNC_X86_SREGS);
  }

  /**
   * Writes a `struct kvm_vcpu_events` (a blob from `getBlob('events')`) into
   * `kvm_run.s.regs.events` and marks it dirty: loaded by the next `KVM_RUN` after the
   * registers, as `KVM_SET_VCPU_EVENTS` would. Needs `KVM_SYNC_X86_EVENTS`.
   */
  setSyncedEvents(events: Uint8Array): void {
    const size = S.sizeOf(S.kvm_vcpu_events);
    if (events.length !== size) throw new KvmError('kvm_run.s.regs.events', 22, `blob must be ${size} bytes`);
    this.#runBytes.set(events, O.sync_events);
    this.#markSyncDirty(KVM_CONST.SYNC_X86_EVENTS);
  }

  /** The `struct kvm_vcpu_events` last written with {@link setSyncedEvents} (or stored by KVM with `KVM_SYNC_X86_EVENTS` valid). */
  syncedEvents(): Uint8Array {
    return this.#runBytes.slice(O.sync_events, O.sync_events + S.sizeOf(S.kvm_vcpu_events));
  }

  /** `kvm_run.kvm_dirty_regs`: what KVM will still load at the next `KVM_RUN` (`KVM_SYNC_X86_*` bits). */
  syncDirtyBits(): number {
    return Number(this.#run.getBigUint64(O.kvm_dirty_regs, true));
  }

  /** Clears `bits` of `kvm_run.kvm_dirty_regs` (state written there that KVM must not load). */
  dropSynced(bits: number): void {
    const d = this.#run.getBigUint64(O.kvm_dirty_regs, true);
    this.#run.setBigUint64(O.kvm_dirty_regs, d & ~BigInt(bits), true);
  }

  #markSyncDirty(bit: number): void {
    const d = this.#run.getBigUint64(O.kvm_dirty_regs, true);
    this.#run.setBigUint64(O.kvm_dirty_regs, d | BigInt(bit), true);
  }

  /** Forgets registers written with {@link setSyncedRegs} that KVM has not loaded yet. */
  dropSyncedRegs(): void {
    const d = this.#run.getBigUint64(O.kvm_dirty_regs, true);
    this.#run.setBigUint64(O.kvm_dirty_regs, d & ~BigInt(KVM_CONST.SYNC_X86_REGS), true);
  }

  /** `KVM_GET_REGS`. */
  getRegs(): Regs {
    ioctlPtr(this.fd, 'KVM_GET_REGS', this.#regsBuf);
    return decodeRegs(this.#regsBuf);
  }

  /** `KVM_SET_REGS`. */
  setRegs(regs: Regs): void {
    encodeRegs(regs, this.#regsBuf);
    ioctlPtr(this.fd, 'KVM_SET_REGS', this.#regsBuf);
  }

  /** `KVM_GET_SREGS`. */
  getSregs(): Sregs {
    ioctlPtr(this.fd, 'KVM_GET_SREGS', this.#sregsBuf);
    return decodeSregs(this.#sregsBuf);
  }

  /** `KVM_SET_SREGS`. */
  setSregs(sregs: Sregs): void {
    encodeSregs(sregs, this.#sregsBuf);
    ioctlPtr(this.fd, 'KVM_SET_SREGS', this.#sregsBuf);
  }

  /** `KVM_SET_CPUID2`. */
  setCpuid(entries: readonly CpuidEntry[]): void {
    ioctlPtr(this.fd, 'KVM_SET_CPUID2', encodeCpuid(entries));
  }

  /** `KVM_GET_MSRS` for the given indices. */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    const b = new Uint8Array(8 + indices.length * 16);
    const v = dv(b);
    v.setUint32(0, indices.length, true);
    indices.forEach((ix, i) => v.setUint32(8 + i * 16, ix, true));
    const n = ioctlPtr(this.fd, 'KVM_GET_MSRS', b);
    return indices.slice(0, n).map((index, i) => ({ index, data: v.getBigUint64(8 + i * 16 + 8, true) }));
  }

  /** `KVM_SET_MSRS`. Throws if KVM accepted fewer than all entries. */
  setMsrs(entries: readonly MsrEntry[]): void {
    const b = new Uint8Array(8 + entries.length * 16);
    const v = dv(b);
    v.setUint32(0, entries.length, true);
    entries.forEach((e, i) => { v.setUint32(8 + i * 16, e.index, true); v.setBigUint64(8 + i * 16 + 8, BigInt.asUintN(64, e.data), true); });
    const n = ioctlPtr(this.fd, 'KVM_SET_MSRS', b);
    if (n !== entries.length) throw new KvmError('KVM_SET_MSRS', 22, `MSR 0x${entries[n]?.index.toString(16)} rejected`);
  }

  /** `KVM_GET_MP_STATE`. */
  getMpState(): number {
    const b = new Uint8Array(4);
    ioctlPtr(this.fd, 'KVM_GET_MP_STATE', b);
    return dv(b).getUint32(0, true);
  }

  /** `KVM_SET_MP_STATE`. */
  setMpState(state: number): void {
    const b = new Uint8Array(4);
    dv(b).setUint32(0, state, true);
    ioctlPtr(this.fd, 'KVM_SET_MP_STATE', b);
  }

  /** `KVM_SET_GUEST_DEBUG` (`control` = `KVM_GUESTDBG_*` flags; `debugreg` = DR0-3, 6, 7 in slots 0-3, 6, 7). */
  setGuestDebug(control: number, debugreg: readonly bigint[] = []): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_guest_debug));
    const v = dv(b);
    v.setUint32(0, control, true);
    debugreg.slice(0, 8).forEach((d, i) => v.setBigUint64(8 + i * 8, d, true));
    ioctlPtr(this.fd, 'KVM_SET_GUEST_DEBUG', b);
  }

  /** `KVM_SET_SIGNAL_MASK` with a kernel sigset (8 bytes); `null` clears the mask. */
  setSignalMask(kernelSigset: Uint8Array | null): void {
    if (!kernelSigset) { ioctlPtr(this.fd, 'KVM_SET_SIGNAL_MASK', null); return; }
    const b = new Uint8Array(4 + kernelSigset.length);
    dv(b).setUint32(0, kernelSigset.length, true);
    b.set(kernelSigset, 4);
    ioctlPtr(this.fd, 'KVM_SET_SIGNAL_MASK', b);
  }

  /** `KVM_ENABLE_CAP` on the vCPU. */
  enableCap(cap: number, args: readonly bigint[] = []): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_enable_cap));
    const v = dv(b);
    v.setUint32(0, cap, true);
    args.slice(0, 4).forEach((a, i) => v.setBigUint64(8 + i * 8, a, true));
    ioctlPtr(this.fd, 'KVM_ENABLE_CAP', b);
  }

  /** Raw state blobs for snapshots: `KVM_GET_{FPU,LAPIC,VCPU_EVENTS,DEBUGREGS,XSAVE,XCRS}`. */
  getBlob(kind: KvmStateBlob): Uint8Array {
    const [name, type] = BLOBS[kind];
    const b = new Uint8Array(S.sizeOf(type));
    ioctlPtr(this.fd, `KVM_GET_${name}`, b);
    return b;
  }

  /** Writes a blob produced by {@link getBlob}. */
  setBlob(kind: KvmStateBlob, data: Uint8Array): void {
    const [name, type] = BLOBS[kind];
    if (data.length !== S.sizeOf(type)) throw new KvmError(`KVM_SET_${name}`, 22, `blob must be ${S.sizeOf(type)} bytes`);
    ioctlPtr(this.fd, `KVM_SET_${name}`, data);
  }

  /**
   * Drains the coalesced MMIO/PIO ring (page `KVM_COALESCED_MMIO_PAGE_OFFSET` of the vCPU
   * mapping). Returns the entries in order and advances `first`.
   */
  drainCoalesced(into: CoalescedEntry[] = []): CoalescedEntry[] {
    if (this.#mmapSize < (KVM_CONST.COALESCED_MMIO_PAGE_OFFSET + 1) * PAGE) return into;
    const base = KVM_CONST.COALESCED_MMIO_PAGE_OFFSET * PAGE;
    const v = this.#run;
    const max = Math.floor((PAGE - 8) / 24);
    let first = v.getUint32(base, true);
    const last = v.getUint32(base + 4, true);
    while (first !== last) {
      const at = base + 8 + first * 24;
      const len = v.getUint32(at + 8, true);
      into.push({
        address: v.getBigUint64(at, true),
        length: len,
        pio: v.getUint32(at + 12, true) !== 0,
        data: this.#runBytes.slice(at + 16, at + 16 + Math.min(len, 8)),
      });
      first = (first + 1) % max;
      // Publish consumption before reading the next entry, as the kernel expects.
      v.setUint32(base, first, true);
    }
    return into;
  }

  // SAFETY: the ring mapping is private to this class (entries are copied out by
  // `harvestDirtyRing`) and unmapped by `close()`, which swaps in an empty view.
  #ring: { ptr: NativePointer; bytes: number; view: DataView; next: number } | undefined;

  /**
   * Maps this vCPU's dirty ring (`bytes`, as given to `KvmVm.enableDirtyRing`) from page
   * `KVM_DIRTY_LOG_PAGE_OFFSET` of the vCPU fd. Once per vCPU.
   */
  mapDirtyRing(bytes: number): void {
    if (this.#ring) throw new KvmError('mmap(dirty ring)', 17, 'already mapped');
    const ptr = libc().mmap(null, bytes, C.PROT_READ | C.PROT_WRITE, C.MAP_SHARED, this.fd, KVM_CONST.DIRTY_LOG_PAGE_OFFSET * PAGE);
    if (ptr === null || addressOf(ptr) === MAP_FAILED) throw new KvmError('mmap(dirty ring)', errno());
    heldMapping(ptr, bytes);
    this.#ring = { ptr, bytes, view: new DataView(viewOf(ptr, bytes)), next: 0 };
  }

  /**
   * Collects the entries KVM published since the last harvest (`struct kvm_dirty_gfn`: flags,
   * slot, offset in pages), calling `page(slot, pageOffset)` for each and marking it harvested;
   * the caller then issues `KvmVm.resetDirtyRings`. Call only while the vCPU is not in `KVM_RUN`
   * (the thread that runs it calls this, so KVM never writes an entry while it is read).
   * @returns how many entries it took.
   */
  harvestDirtyRing(page: (slot: number, offset: number) => void): number {
    const r = this.#ring;
    if (!r) return 0;
    const entries = r.bytes / 16;
    let n = 0;
    for (;;) {
      const at = (r.next % entries) * 16;
      if ((r.view.getUint32(at, true) & KVM_CONST.DIRTY_GFN_F_DIRTY) === 0) break;
      page(r.view.getUint32(at + 4, true), Number(r.view.getBigUint64(at + 8, true)));
      r.view.setUint32(at, KVM_CONST.DIRTY_GFN_F_RESET, true);
      r.next++;
      if (++n === entries) break;
    }
    return n;
  }

  /** Unmaps `kvm_run` and closes the fd. Idempotent. */
  close(): void {
    if (this.fd < 0) return;
    if (this.#ring) { releasingMapping(this.#ring.ptr); libc().munmap(this.#ring.ptr, this.#ring.bytes); this.#ring = undefined; }
    releasingMapping(this.#ptr);
    libc().munmap(this.#ptr, this.#mmapSize);
    this.#run = new DataView(new ArrayBuffer(0));
    this.#runBytes = new Uint8Array(0);
    this.#answer.pending = Pending.None;
    closeFd(this.fd);
    this.fd = -1;
  }
}

/** `struct kvm_sregs` bytes of frozen (deeply) `Sregs` objects, e.g. a snapshot's: see `setSyncedSregs`. */
const ENCODED_SREGS = new WeakMap<Sregs, Uint8Array>();
/** `struct kvm_regs` bytes of frozen `Regs` objects (see `setSyncedRegs`). */
const ENCODED_REGS = new WeakMap<Regs, Uint8Array>();

const BLOBS = {
  fpu: ['FPU', S.kvm_fpu],
  lapic: ['LAPIC', S.kvm_lapic_state],
  events: ['VCPU_EVENTS', S.kvm_vcpu_events],
  debugregs: ['DEBUGREGS', S.kvm_debugregs],
  xsave: ['XSAVE', S.kvm_xsave],
  xcrs: ['XCRS', S.kvm_xcrs],
} as const;
