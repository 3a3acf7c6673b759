/**
 * `/dev/kvm`: the system fd. One method per ioctl.
 * @module
 */
import { existsSync } from 'node:fs';
import { C, errno, libc } from './raw/libc.js';
import { KVM, KVM_CAP, KVM_CONST } from './raw/ioctls.js';
import * as S from './raw/structs.js';
import { decodeCpuid, dv } from './raw/codec.js';
import { KvmError, KvmUnavailableError, errnoName } from './errors.js';
import { closeFd, ioctlAsync, ioctlInt, ioctlPtr } from './fd.js';
import { heldFd } from './ledger.js';
import { KvmVm } from './vm.js';
import type { CpuidEntry } from './types.js';

/** An open `/dev/kvm`. */
export class KvmSystem {
  /** The `/dev/kvm` fd, or -1 after close. */
  fd: number;

  private constructor(fd: number) {
    this.fd = fd;
    heldFd(fd);
  }

  /**
   * Opens `/dev/kvm` and checks the API version.
   * @throws KvmUnavailableError with a reason a person can act on.
   */
  static open(path = '/dev/kvm'): KvmSystem {
    if (process.platform !== 'linux') throw new KvmUnavailableError(`KVM needs Linux (this is ${process.platform})`);
    let c;
    try {
      c = libc();
    } catch (e) {
      throw new KvmUnavailableError('libc could not be loaded through koffi', { cause: e });
    }
    const fd = c.open(path, C.O_RDWR | C.O_CLOEXEC);
    if (fd < 0) {
      const e = errno();
      const hint = e === 2 ? (existsSync('/sys/module/kvm') ? ' (the kvm module is loaded but no KVM device is bound; on a nested or PVM host the vendor module may have refused to bind)' : ' (the kvm module is not loaded)')
        : e === 13 ? ' (permission denied: add the user to the kvm group)' : '';
      throw new KvmUnavailableError(`cannot open ${path}: ${errnoName(e)}${hint}`, { cause: new KvmError('open', e) });
    }
    const sys = new KvmSystem(fd);
    try {
      const v = ioctlInt(fd, 'KVM_GET_API_VERSION');
      if (v !== KVM_CONST.API_VERSION) throw new KvmUnavailableError(`unsupported KVM API version ${v} (need ${KVM_CONST.API_VERSION})`);
    } catch (e) {
      sys.close();
      if (e instanceof KvmUnavailableError) throw e;
      throw new KvmUnavailableError(`${path} does not answer KVM_GET_API_VERSION`, { cause: e });
    }
    return sys;
  }

  /** `KVM_CHECK_EXTENSION`: 0 when unsupported, otherwise a capability-specific value. */
  checkExtension(cap: number): number {
    return ioctlInt(this.fd, 'KVM_CHECK_EXTENSION', cap);
  }

  /** Whether a capability (by `KVM_CAP` name) is supported. */
  has(cap: keyof typeof KVM_CAP): boolean {
    try {
      return this.checkExtension(KVM_CAP[cap]) > 0;
    } catch {
      return false;
    }
  }

  /** `KVM_GET_VCPU_MMAP_SIZE`. */
  vcpuMmapSize(): number {
    return ioctlInt(this.fd, 'KVM_GET_VCPU_MMAP_SIZE');
  }

  /** `KVM_GET_SUPPORTED_CPUID`. */
  supportedCpuid(max = 256): CpuidEntry[] {
    const entSize = S.sizeOf(S.kvm_cpuid_entry2);
    const buf = new Uint8Array(8 + max * entSize);
    dv(buf).setUint32(0, max, true);
    ioctlPtr(this.fd, 'KVM_GET_SUPPORTED_CPUID', buf);
    return decodeCpuid(buf);
  }

  /**
   * `KVM_GET_MSR_INDEX_LIST`: the MSRs KVM saves and restores for a vCPU (what a snapshot
   * must carry). Asked twice: first for the count (E2BIG), then for the list.
   */
  msrIndexList(): number[] {
    const probe = new Uint8Array(4);
    libc().ioctlPtr(this.fd, KVM.KVM_GET_MSR_INDEX_LIST, probe);
    const n = dv(probe).getUint32(0, true);
    const b = new Uint8Array(4 + n * 4);
    dv(b).setUint32(0, n, true);
    ioctlPtr(this.fd, 'KVM_GET_MSR_INDEX_LIST', b);
    const v = dv(b);
    const got = v.getUint32(0, true);
    return Array.from({ length: Math.min(got, n) }, (_, i) => v.getUint32(4 + i * 4, true));
  }

  /** `KVM_CREATE_VM` (type 0). */
  createVm(): KvmVm {
    // Asked once here so the VM need not know its system (imports go system → vm → vcpu).
    const mmapSize = this.vcpuMmapSize();
    const fd = ioctlInt(this.fd, 'KVM_CREATE_VM', 0);
    return new KvmVm(fd, mmapSize);
  }

  /** `KVM_CREATE_VM` (type 0) with the kernel's work on a thread-pool thread (see `ioctlAsync`). */
  async createVmAsync(): Promise<KvmVm> {
    const mmapSize = this.vcpuMmapSize();
    const fd = await ioctlAsync(this.fd, 'KVM_CREATE_VM', 0);
    return new KvmVm(fd, mmapSize);
  }

  /** Closes `/dev/kvm`. Idempotent. */
  close(): void {
    closeFd(this.fd);
    this.fd = -1;
  }
}
