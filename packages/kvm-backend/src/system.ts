/**
 * `/dev/kvm`: the system fd. One method per ioctl.
 * @module
 */
import { existsSync } from 'node:fs';
import { C, errno, libc } from './raw/libc.js';
import { KVM_CAP, KVM_CONST } from './raw/ioctls.js';
import * as S from './raw/structs.js';
import { dv } from './raw/codec.js';
import { KvmError, KvmUnavailableError, errnoName } from './errors.js';
import { closeFd, ioctlInt, ioctlPtr } from './fd.js';
import { KvmVm } from './vm.js';
import type { CpuidEntry } from './types.js';

/** An open `/dev/kvm`. */
export class KvmSystem {
  /** The `/dev/kvm` fd, or -1 after close. */
  fd: number;

  private constructor(fd: number) {
    this.fd = fd;
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

  /** `KVM_CREATE_VM` (type 0). */
  createVm(): KvmVm {
    const fd = ioctlInt(this.fd, 'KVM_CREATE_VM', 0);
    return new KvmVm(fd, this);
  }

  /** Closes `/dev/kvm`. Idempotent. */
  close(): void {
    closeFd(this.fd);
    this.fd = -1;
  }
}

/** Decodes a `struct kvm_cpuid2` buffer. */
export function decodeCpuid(buf: Uint8Array): CpuidEntry[] {
  const v = dv(buf);
  const n = v.getUint32(0, true);
  const entSize = S.sizeOf(S.kvm_cpuid_entry2);
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const at = 8 + i * entSize;
    out.push({
      function: v.getUint32(at, true), index: v.getUint32(at + 4, true), flags: v.getUint32(at + 8, true),
      eax: v.getUint32(at + 12, true), ebx: v.getUint32(at + 16, true), ecx: v.getUint32(at + 20, true), edx: v.getUint32(at + 24, true),
    });
  }
  return out;
}

/** Encodes a `struct kvm_cpuid2` buffer. */
export function encodeCpuid(entries: readonly CpuidEntry[]): Uint8Array {
  const entSize = S.sizeOf(S.kvm_cpuid_entry2);
  const buf = new Uint8Array(8 + entries.length * entSize);
  const v = dv(buf);
  v.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const at = 8 + i * entSize;
    v.setUint32(at, e.function >>> 0, true); v.setUint32(at + 4, e.index >>> 0, true); v.setUint32(at + 8, e.flags >>> 0, true);
    v.setUint32(at + 12, e.eax >>> 0, true); v.setUint32(at + 16, e.ebx >>> 0, true); v.setUint32(at + 20, e.ecx >>> 0, true); v.setUint32(at + 24, e.edx >>> 0, true);
  });
  return buf;
}
