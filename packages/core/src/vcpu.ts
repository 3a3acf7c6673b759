/**
 * A vCPU of a {@link Machine}: typed register access for users and tests.
 * @module
 */
import type { BackendVcpu, CpuidEntry, MsrEntry, Regs, Sregs } from './backend.js';
import { InvalidArgumentError } from './errors.js';
import { REG_NAMES } from '@tsvm/kvm-backend';

/** One virtual CPU. */
export class Vcpu {
  /** vCPU index. */
  readonly id: number;
  /** @internal the backend vCPU. */
  readonly backend: BackendVcpu;

  /** @internal created by `Machine`. */
  constructor(backend: BackendVcpu) {
    this.backend = backend;
    this.id = backend.id;
  }

  /** General-purpose registers. */
  getRegs(): Regs {
    return this.backend.getRegs();
  }

  /** Updates the given general-purpose registers, leaving the others as they are. */
  setRegs(update: Partial<Regs>): void {
    const regs = this.backend.getRegs();
    for (const [k, v] of Object.entries(update)) {
      if (!(REG_NAMES as readonly string[]).includes(k)) throw new InvalidArgumentError(`regs.${k}`, 'unknown register');
      if (typeof v !== 'bigint') throw new InvalidArgumentError(`regs.${k}`, 'must be a bigint');
      regs[k as keyof Regs] = v;
    }
    this.backend.setRegs(regs);
  }

  /** Special registers (segments, control registers, descriptor tables). */
  getSregs(): Sregs {
    return this.backend.getSregs();
  }

  /** Replaces the special registers. */
  setSregs(sregs: Sregs): void {
    this.backend.setSregs(sregs);
  }

  /** Reads MSRs. */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    return this.backend.getMsrs(indices);
  }

  /** Writes MSRs. */
  setMsrs(entries: readonly MsrEntry[]): void {
    this.backend.setMsrs(entries);
  }

  /** Sets the CPUID table (effective for code at CPL0; see HOST-FACTS for PVM at CPL3). */
  setCpuid(entries: readonly CpuidEntry[]): void {
    this.backend.setCpuid(entries);
  }

  /**
   * Configures KVM guest debug (`KVM_GUESTDBG_*` flags; debug registers DR0-3 in slots 0-3,
   * DR7 in slot 7). Whether it works at a given CPL is host-specific: see `calibrate()`.
   */
  setGuestDebug(control: number, debugreg: readonly bigint[] = []): void {
    this.backend.setGuestDebug(control, debugreg);
  }

  /** The host's default CPUID table. */
  supportedCpuid(): CpuidEntry[] {
    return this.backend.supportedCpuid();
  }
}
