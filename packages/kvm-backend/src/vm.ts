/**
 * A VM fd. One method per ioctl; no policy.
 * @module
 */
import * as S from './raw/structs.js';
import { dv, encodeCpuid } from './raw/codec.js';
import type { CpuidEntry } from './types.js';
import { KVM_CAP, KVM_CONST } from './raw/ioctls.js';
import { closeFd, closeFdInBackground, dupFd, ioctlAsync, ioctlInt, ioctlPtr } from './fd.js';
import { heldFd } from './ledger.js';
import { KvmVcpu } from './vcpu.js';
import { KvmError } from './errors.js';

/** A raw state blob must be exactly its struct's size: KVM would read past a short one. */
function checkSize(ioctl: string, data: Uint8Array, size: number): void {
  if (data.length !== size) throw new KvmError(ioctl, 22, `blob must be ${size} bytes, got ${data.length}`);
}

/** Flags of a memslot. */
export interface MemslotFlags {
  /** Track dirty pages (`KVM_MEM_LOG_DIRTY_PAGES`). */
  logDirty?: boolean;
  /** Guest writes exit as MMIO (`KVM_MEM_READONLY`). */
  readonly?: boolean;
}

/** An open KVM VM. */
export class KvmVm {
  /** VM fd, or -1 after close. */
  fd: number;
  /** `KVM_GET_VCPU_MMAP_SIZE` of the system, the length of each vCPU's `kvm_run` mapping. */
  readonly vcpuMmapSize: number;
  readonly #regionBuf = new Uint8Array(S.sizeOf(S.kvm_userspace_memory_region));

  /** @internal use `KvmSystem.createVm`. */
  constructor(fd: number, vcpuMmapSize: number) {
    this.fd = fd;
    heldFd(fd);
    this.vcpuMmapSize = vcpuMmapSize;
  }

  /** `KVM_SET_USER_MEMORY_REGION`. A size of 0 deletes the slot. */
  setUserMemoryRegion(slot: number, guestPhys: bigint, size: number, hostAddress: bigint, flags: MemslotFlags = {}): void {
    const v = dv(this.#regionBuf);
    v.setUint32(0, slot, true);
    v.setUint32(4, (flags.logDirty ? KVM_CONST.MEM_LOG_DIRTY_PAGES : 0) | (flags.readonly ? KVM_CONST.MEM_READONLY : 0), true);
    v.setBigUint64(8, guestPhys, true);
    v.setBigUint64(16, BigInt(size), true);
    v.setBigUint64(24, hostAddress, true);
    ioctlPtr(this.fd, 'KVM_SET_USER_MEMORY_REGION', this.#regionBuf);
  }

  /** `KVM_SET_TSS_ADDR` (needed on Intel before running real-mode code). */
  setTssAddr(address: number): void {
    ioctlInt(this.fd, 'KVM_SET_TSS_ADDR', address);
  }

  /** `KVM_SET_IDENTITY_MAP_ADDR`. */
  setIdentityMapAddr(address: bigint): void {
    const b = new Uint8Array(8);
    dv(b).setBigUint64(0, address, true);
    ioctlPtr(this.fd, 'KVM_SET_IDENTITY_MAP_ADDR', b);
  }

  /** `KVM_CREATE_IRQCHIP` (PIC + IOAPIC + per-vCPU LAPIC in the kernel). */
  createIrqchip(): void {
    ioctlInt(this.fd, 'KVM_CREATE_IRQCHIP');
  }

  /** `KVM_CREATE_PIT2`. */
  createPit2(flags = 0): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_pit_config));
    dv(b).setUint32(0, flags, true);
    ioctlPtr(this.fd, 'KVM_CREATE_PIT2', b);
  }

  readonly #irqBuf = new Uint8Array(8);
  /** `KVM_IRQ_LINE`. */
  irqLine(irq: number, level: boolean): void {
    const v = dv(this.#irqBuf);
    v.setUint32(0, irq, true);
    v.setUint32(4, level ? 1 : 0, true);
    ioctlPtr(this.fd, 'KVM_IRQ_LINE', this.#irqBuf);
  }

  #zone(address: bigint, size: number, pio: boolean): Uint8Array {
    const b = new Uint8Array(S.sizeOf(S.kvm_coalesced_mmio_zone));
    const v = dv(b);
    v.setBigUint64(0, address, true);
    v.setUint32(8, size, true);
    v.setUint32(12, pio ? 1 : 0, true);
    return b;
  }

  /** `KVM_REGISTER_COALESCED_MMIO` (with `pio` for a port range). */
  registerCoalesced(address: bigint, size: number, pio: boolean): void {
    ioctlPtr(this.fd, 'KVM_REGISTER_COALESCED_MMIO', this.#zone(address, size, pio));
  }

  /** `KVM_UNREGISTER_COALESCED_MMIO`. */
  unregisterCoalesced(address: bigint, size: number, pio: boolean): void {
    ioctlPtr(this.fd, 'KVM_UNREGISTER_COALESCED_MMIO', this.#zone(address, size, pio));
  }

  /** `KVM_GET_DIRTY_LOG` into `bitmap` (one bit per page; the buffer's address is passed). */
  getDirtyLog(slot: number, bitmapAddress: bigint): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_dirty_log));
    const v = dv(b);
    v.setUint32(0, slot, true);
    v.setBigUint64(8, bitmapAddress, true);
    ioctlPtr(this.fd, 'KVM_GET_DIRTY_LOG', b);
  }

  /**
   * Switches the VM to a dirty-page ring of `bytes` per vCPU (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`;
   * a power of two, at most what `KVM_CHECK_EXTENSION` reports). Only before the first vCPU is
   * created; from then on `KVM_GET_DIRTY_LOG` is refused: harvest each vCPU's ring
   * (`KvmVcpu.mapDirtyRing`) and call {@link resetDirtyRings}.
   */
  enableDirtyRing(bytes: number): void {
    this.enableCap(KVM_CAP.DIRTY_LOG_RING_ACQ_REL, [BigInt(bytes)]);
  }

  /**
   * `KVM_RESET_DIRTY_RINGS`: write-protects again the pages of every ring entry marked
   * harvested and frees those entries. Returns how many it reset.
   */
  resetDirtyRings(): number {
    return ioctlInt(this.fd, 'KVM_RESET_DIRTY_RINGS', 0);
  }

  /** `KVM_ENABLE_CAP` on the VM. */
  enableCap(cap: number, args: readonly bigint[] = [], flags = 0): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_enable_cap));
    const v = dv(b);
    v.setUint32(0, cap, true);
    v.setUint32(4, flags, true);
    args.slice(0, 4).forEach((a, i) => v.setBigUint64(8 + i * 8, a, true));
    ioctlPtr(this.fd, 'KVM_ENABLE_CAP', b);
  }

  /**
   * `KVM_X86_SET_MSR_FILTER`. Each range's bitmap has one bit per MSR; a set bit *allows*
   * the access, a clear bit makes it exit to userspace (with `KVM_CAP_X86_USER_SPACE_MSR`).
   * The bitmaps must stay alive during the call only (KVM copies them).
   */
  setMsrFilter(defaultDeny: boolean, ranges: ReadonlyArray<{ flags: number; base: number; nmsrs: number; bitmapAddress: bigint }>): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_msr_filter));
    const v = dv(b);
    v.setUint32(0, defaultDeny ? KVM_CONST.MSR_FILTER_DEFAULT_DENY : KVM_CONST.MSR_FILTER_DEFAULT_ALLOW, true);
    const r0 = S.offsetOf(S.kvm_msr_filter, 'ranges');
    const rs = S.sizeOf(S.kvm_msr_filter_range);
    ranges.slice(0, 16).forEach((r, i) => {
      const at = r0 + i * rs;
      v.setUint32(at, r.flags, true);
      v.setUint32(at + 4, r.nmsrs, true);
      v.setUint32(at + 8, r.base >>> 0, true);
      v.setBigUint64(at + 16, r.bitmapAddress, true);
    });
    ioctlPtr(this.fd, 'KVM_X86_SET_MSR_FILTER', b);
  }

  /** `KVM_IOEVENTFD`: a guest write to `address` signals `eventfd` without an exit. */
  ioeventfd(address: bigint, length: number, eventfd: number, opts: { pio: boolean; datamatch?: bigint; deassign?: boolean }): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_ioeventfd));
    const v = dv(b);
    v.setBigUint64(0, opts.datamatch ?? 0n, true);
    v.setBigUint64(8, address, true);
    v.setUint32(16, length, true);
    v.setInt32(20, eventfd, true);
    v.setUint32(24, (opts.datamatch !== undefined ? KVM_CONST.IOEVENTFD_FLAG_DATAMATCH : 0) | (opts.pio ? KVM_CONST.IOEVENTFD_FLAG_PIO : 0) | (opts.deassign ? 4 : 0), true);
    ioctlPtr(this.fd, 'KVM_IOEVENTFD', b);
  }

  /** `KVM_IRQFD`: writing to `eventfd` raises `gsi`. */
  irqfd(eventfd: number, gsi: number, deassign = false): void {
    const b = new Uint8Array(S.sizeOf(S.kvm_irqfd));
    const v = dv(b);
    v.setUint32(0, eventfd, true);
    v.setUint32(4, gsi, true);
    v.setUint32(8, deassign ? 1 : 0, true);
    ioctlPtr(this.fd, 'KVM_IRQFD', b);
  }

  /** `KVM_GET_CLOCK` (raw bytes for snapshots). */
  getClock(): Uint8Array {
    const b = new Uint8Array(S.sizeOf(S.kvm_clock_data));
    ioctlPtr(this.fd, 'KVM_GET_CLOCK', b);
    return b;
  }

  /** `KVM_SET_CLOCK` with bytes from {@link getClock}. */
  setClock(data: Uint8Array): void {
    checkSize('KVM_SET_CLOCK', data, S.sizeOf(S.kvm_clock_data));
    ioctlPtr(this.fd, 'KVM_SET_CLOCK', data);
  }

  /**
   * `KVM_GET_IRQCHIP` for one chip (`KVM_CONST.IRQCHIP_*`): the whole `struct kvm_irqchip`
   * as raw bytes (for snapshots; the caller never needs to look inside).
   */
  getIrqchip(chipId: number): Uint8Array {
    const b = new Uint8Array(S.sizeOf(S.kvm_irqchip));
    dv(b).setUint32(0, chipId, true);
    ioctlPtr(this.fd, 'KVM_GET_IRQCHIP', b);
    return b;
  }

  /** `KVM_SET_IRQCHIP` with bytes from {@link getIrqchip} (the chip id is inside them). */
  setIrqchip(data: Uint8Array): void {
    checkSize('KVM_SET_IRQCHIP', data, S.sizeOf(S.kvm_irqchip));
    ioctlPtr(this.fd, 'KVM_SET_IRQCHIP', data);
  }

  /** `KVM_GET_PIT2`: the in-kernel PIT's `struct kvm_pit_state2` as raw bytes. */
  getPit2(): Uint8Array {
    const b = new Uint8Array(S.sizeOf(S.kvm_pit_state2));
    ioctlPtr(this.fd, 'KVM_GET_PIT2', b);
    return b;
  }

  /** `KVM_SET_PIT2` with bytes from {@link getPit2}. */
  setPit2(data: Uint8Array): void {
    checkSize('KVM_SET_PIT2', data, S.sizeOf(S.kvm_pit_state2));
    ioctlPtr(this.fd, 'KVM_SET_PIT2', data);
  }

  /**
   * The set-up of a new VM and its vCPU 0 with the kernel's work on thread-pool threads (see
   * `ioctlAsync`): `KVM_SET_TSS_ADDR` (when `tssAddress` is given), `KVM_CREATE_IRQCHIP` and
   * `KVM_CREATE_PIT2` (when `pitFlags` is given), `KVM_CREATE_VCPU`, `KVM_SET_CPUID2` and
   * `KVM_SET_SIGNAL_MASK` (the mask as `KvmVcpu.setSignalMask` takes it, made on the thread that
   * will run the vCPU). On failure everything it made is closed and the promise rejects.
   */
  async prepareAsync(options: { tssAddress?: number; pitFlags?: number; cpuid: readonly CpuidEntry[]; signalMask: Uint8Array }): Promise<KvmVcpu> {
    if (options.tssAddress !== undefined) await ioctlAsync(this.fd, 'KVM_SET_TSS_ADDR', options.tssAddress);
    if (options.pitFlags !== undefined) {
      await ioctlAsync(this.fd, 'KVM_CREATE_IRQCHIP', 0);
      const pit = new Uint8Array(S.sizeOf(S.kvm_pit_config));
      dv(pit).setUint32(0, options.pitFlags, true);
      await ioctlAsync(this.fd, 'KVM_CREATE_PIT2', pit);
    }
    const fd = await ioctlAsync(this.fd, 'KVM_CREATE_VCPU', 0);
    let vcpu: KvmVcpu;
    try {
      vcpu = new KvmVcpu(fd, 0, this.vcpuMmapSize);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
    try {
      await ioctlAsync(fd, 'KVM_SET_CPUID2', encodeCpuid(options.cpuid));
      const mask = new Uint8Array(4 + options.signalMask.length);
      dv(mask).setUint32(0, options.signalMask.length, true);
      mask.set(options.signalMask, 4);
      await ioctlAsync(fd, 'KVM_SET_SIGNAL_MASK', mask);
      return vcpu;
    } catch (e) {
      vcpu.close();
      throw e;
    }
  }

  /** `KVM_CREATE_VCPU` and mmap of its `kvm_run`. */
  createVcpu(id: number): KvmVcpu {
    const fd = ioctlInt(this.fd, 'KVM_CREATE_VCPU', id);
    try {
      return new KvmVcpu(fd, id, this.vcpuMmapSize);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /**
   * A new wrapper for the vCPU `old` wraps, on a second fd (`F_DUPFD_CLOEXEC`) with its own
   * `kvm_run` mapping; `old` is closed (its mapping unmapped, its fd number released). Anyone
   * still holding `old` gets `EBADF` and empty views, never the vCPU: how a kept VM's vCPU
   * changes owner. The vCPU itself (its state) is unchanged.
   * @throws KvmError when the dup or the mapping fails; `old` is then unchanged.
   */
  rewrapVcpu(old: KvmVcpu): KvmVcpu {
    const fd = dupFd(old.fd);
    let fresh: KvmVcpu;
    try {
      fresh = new KvmVcpu(fd, old.id, this.vcpuMmapSize);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
    old.close();
    return fresh;
  }

  /**
   * A new wrapper owning this VM's fd; this one is left closed (`fd` -1) without closing it:
   * a stale holder of this object reaches no VM. Idempotent on a closed VM (returns a closed one).
   */
  rewrap(): KvmVm {
    const vm = new KvmVm(this.fd, this.vcpuMmapSize);
    this.fd = -1;
    return vm;
  }

  /**
   * `KVM_GET_CPUID2` on one of this VM's vCPUs: the table KVM holds for it now, as raw
   * `struct kvm_cpuid2` bytes with room for `max` entries (KVM keeps the runtime bits, e.g.
   * OSXSAVE, in step with CR4 and XCR0; on PVM it also merges the host's values in). Raw, for
   * comparing one vCPU's table at two times.
   */
  vcpuCpuidBytes(vcpu: KvmVcpu, max = 256): Uint8Array {
    const b = new Uint8Array(8 + max * S.sizeOf(S.kvm_cpuid_entry2));
    dv(b).setUint32(0, max, true);
    ioctlPtr(vcpu.fd, 'KVM_GET_CPUID2', b);
    return b;
  }

  /** Closes the VM fd. Idempotent. Close vCPUs and unmap memory first. */
  close(): void {
    closeFd(this.fd);
    this.fd = -1;
  }

  /**
   * Like {@link close}, but the kernel's teardown of the VM runs on a thread-pool thread: this
   * object is closed at once (`fd` is -1), and the promise resolves when the kernel has released
   * the VM. Close the vCPUs first, as for `close()`.
   */
  closeInBackground(): Promise<void> {
    const fd = this.fd;
    this.fd = -1;
    return closeFdInBackground(fd);
  }
}
