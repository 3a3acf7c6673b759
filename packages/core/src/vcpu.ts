/**
 * A vCPU of a {@link Machine}: typed register access for users and tests.
 * @module
 */
import type { BackendVcpu, CpuidEntry, MsrEntry, Regs, Sregs } from './backend.js';
import { InvalidArgumentError } from './errors.js';
import { REG_NAMES } from '@tsvm/kvm-backend';
import { checkArray, checkBigint, checkCpuid, checkInt, checkMsrEntries, checkMsrIndices, checkObject, checkSregs } from './check.js';

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
    return this.backend.getSregs();
  }

  /** Replaces the special registers. */
  setSregs(sregs: Sregs): void {
    this.backend.setSregs(checkSregs(sregs, 'sregs'));
  }

  /** Reads MSRs. */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    return this.backend.getMsrs(checkMsrIndices(indices, 'indices'));
  }

  /** Writes MSRs (indices 32-bit, values 64-bit). */
  setMsrs(entries: readonly MsrEntry[]): void {
    this.backend.setMsrs(checkMsrEntries(entries, 'entries'));
  }

  /** Sets the CPUID table (effective for code at CPL0; see HOST-FACTS for PVM at CPL3). */
  setCpuid(entries: readonly CpuidEntry[]): void {
    this.backend.setCpuid(checkCpuid(entries, 'entries'));
  }

  /**
   * Configures KVM guest debug (`KVM_GUESTDBG_*` flags; debug registers DR0-3 in slots 0-3,
   * DR7 in slot 7). Whether it works at a given CPL is host-specific: see `calibrate()`.
   */
  setGuestDebug(control: number, debugreg: readonly bigint[] = []): void {
    checkInt(control, 'control', 0, 0xffff_ffff);
    const regs = checkArray(debugreg, 'debugreg', 8).map((r, i) => checkBigint(r, `debugreg[${i}]`, 0n, (1n << 64n) - 1n));
    this.backend.setGuestDebug(control, regs);
  }

  /** The host's default CPUID table. */
  supportedCpuid(): CpuidEntry[] {
    return this.backend.supportedCpuid();
  }
}
