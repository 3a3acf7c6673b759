/**
 * A vCPU of a {@link Machine}: typed register access for users and tests.
 * @module
 */
import type { BackendVcpu, CpuidEntry, MsrEntry, Regs, Sregs } from './backend.js';
import { InvalidArgumentError, StateError } from './errors.js';
import { REG_NAMES } from '@tsvm/kvm-backend';
import { checkArray, checkBigint, checkCpuid, checkInt, checkMsrEntries, checkMsrIndices, checkObject, checkSregs } from './check.js';

/** One virtual CPU. */
export class Vcpu {
  /** vCPU index. */
  readonly id: number;
  /** @internal the backend vCPU. */
  readonly backend: BackendVcpu;

  readonly #inGuest: () => boolean;

  /**
   * @internal created by `Machine`; `inGuest` says whether this vCPU's runner thread is inside
   * `KVM_RUN` now (`vcpuThreads: 'parallel'`).
   */
  constructor(backend: BackendVcpu, inGuest: () => boolean = () => false) {
    this.backend = backend;
    this.id = backend.id;
    this.#inGuest = inGuest;
  }

  /**
   * With runner threads, a vCPU is only ever still between its own exits or while the machine
   * is stopped: its registers in `kvm_run` would be stale, a write would be lost when KVM stores
   * them at the next exit, and any other ioctl would wait for its slice to end.
   */
  #still(): void {
    if (this.#inGuest()) throw new StateError(`vCPU ${this.id} is running guest code on its runner thread: read or change its state at its own exits or while the machine is stopped`);
  }

  /** General-purpose registers. */
  getRegs(): Regs {
    this.#still();
    return this.backend.getRegs();
  }

  /** Updates the given general-purpose registers, leaving the others as they are. */
  setRegs(update: Partial<Regs>): void {
    this.#still();
    checkObject(update, 'regs');
    const regs = this.backend.getRegs();
    for (const [k, v] of Object.entries(update)) {
      if (!(REG_NAMES as readonly string[]).includes(k)) throw new InvalidArgumentError(`regs.${k}`, 'unknown register');
      regs[k as keyof Regs] = checkBigint(v, `regs.${k}`, 0n, (1n << 64n) - 1n);
    }
    this.backend.setRegs(regs);
  }

  /** Special registers (segments, control registers, descriptor tables). */
  getSregs(): Sregs {
    this.#still();
    return this.backend.getSregs();
  }

  /** Replaces the special registers. */
  setSregs(sregs: Sregs): void {
    this.#still();
    this.backend.setSregs(checkSregs(sregs, 'sregs'));
  }

  /** Reads MSRs. */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    this.#still();
    return this.backend.getMsrs(checkMsrIndices(indices, 'indices'));
  }

  /** Writes MSRs (indices 32-bit, values 64-bit). */
  setMsrs(entries: readonly MsrEntry[]): void {
    this.#still();
    this.backend.setMsrs(checkMsrEntries(entries, 'entries'));
  }

  /** Sets the CPUID table (effective for code at CPL0; see HOST-FACTS for PVM at CPL3). */
  setCpuid(entries: readonly CpuidEntry[]): void {
    this.#still();
    this.backend.setCpuid(checkCpuid(entries, 'entries'));
  }

  /**
   * Configures KVM guest debug (`KVM_GUESTDBG_*` flags; debug registers DR0-3 in slots 0-3,
   * DR7 in slot 7). Whether it works at a given CPL is host-specific: see `calibrate()`.
   */
  setGuestDebug(control: number, debugreg: readonly bigint[] = []): void {
    this.#still();
    checkInt(control, 'control', 0, 0xffff_ffff);
    const regs = checkArray(debugreg, 'debugreg', 8).map((r, i) => checkBigint(r, `debugreg[${i}]`, 0n, (1n << 64n) - 1n));
    this.backend.setGuestDebug(control, regs);
  }

  /** The host's default CPUID table. */
  supportedCpuid(): CpuidEntry[] {
    return this.backend.supportedCpuid();
  }
}
