/**
 * The vCPU's KVM guest-debug state, shared by every hook that needs it: single-step, software
 * breakpoints (`int3`) and the four hardware breakpoint registers. One `KVM_SET_GUEST_DEBUG`
 * carries all of them, so one owner computes the control word.
 *
 * A hardware breakpoint fires *before* its instruction; to make progress the unit steps over it
 * by disabling the register, single-stepping once and re-enabling it (HOST-FACTS: RF is ignored
 * on PVM, so the architectural way does not work there).
 * @module
 */
import { StateError, type DebugExit } from '@tsvm/core';

/** `KVM_GUESTDBG_*` control bits. */
export const GUESTDBG = { ENABLE: 0x1, SINGLESTEP: 0x2, USE_SW_BP: 0x1_0000, USE_HW_BP: 0x2_0000 } as const;

const DR6_BS = 1n << 14n;

/** What `setGuestDebug` is called on. */
export interface DebugTarget {
  /** `KVM_SET_GUEST_DEBUG` (DR0-3 in slots 0-3, DR7 in slot 7). */
  setGuestDebug(control: number, debugreg?: readonly bigint[]): void;
}

/** What a debug exit meant. */
export type DebugCause =
  | { readonly kind: 'step' }
  | { readonly kind: 'hw'; readonly address: bigint }
  | { readonly kind: 'sw'; readonly address: bigint }
  /** A step the unit made for itself (stepping over a hardware breakpoint): resume silently. */
  | { readonly kind: 'internal' }
  | { readonly kind: 'unknown' };

/** Owner of the guest-debug control word. */
export class DebugUnit {
  readonly #target: DebugTarget;
  #stepUsers = 0;
  #swbp = false;
  readonly #hw: Array<bigint | undefined> = [undefined, undefined, undefined, undefined];
  #steppingOver: number | undefined;
  #applied = '';

  /** @param target - the vCPU. */
  constructor(target: DebugTarget) {
    this.#target = target;
  }

  /** Free hardware breakpoint registers. */
  get freeHwSlots(): number {
    return this.#hw.filter((x) => x === undefined).length;
  }

  /** Adds (+1) or removes (-1) a single-step user. */
  step(delta: 1 | -1): void {
    this.#stepUsers = Math.max(0, this.#stepUsers + delta);
    this.#apply();
  }

  /** Turns `KVM_GUESTDBG_USE_SW_BP` on or off. */
  softwareBreakpoints(on: boolean): void {
    this.#swbp = on;
    this.#apply();
  }

  /** Arms an execute breakpoint at linear `address`. @returns the slot. @throws StateError when all 4 are used. */
  addHw(address: bigint): number {
    const slot = this.#hw.indexOf(undefined);
    if (slot < 0) throw new StateError('all 4 hardware debug registers are in use');
    this.#hw[slot] = address;
    this.#apply();
    return slot;
  }

  /** Frees a hardware breakpoint slot. */
  removeHw(slot: number): void {
    this.#hw[slot] = undefined;
    if (this.#steppingOver === slot) this.#steppingOver = undefined;
    this.#apply();
  }

  /**
   * Issues `KVM_SET_GUEST_DEBUG` again even if nothing changed here: after the vCPU's state was
   * replaced (`Machine.reset` sets sregs, MSRs, events, …) a host may have dropped the #BP/#DB
   * intercepts guest debug needs (seen on nested SVM: int3 then reached the guest).
   */
  reapply(): void {
    if (this.#applied === '' || this.#applied.startsWith('0:')) return; // guest debug is off: nothing to restore
    this.#applied = '';
    this.#apply();
  }

  /** Classifies a debug exit and performs the step-over bookkeeping for hardware breakpoints. */
  onDebugExit(exit: DebugExit): DebugCause {
    if (exit.exception === 3) return this.#swbp ? { kind: 'sw', address: exit.pc } : { kind: 'unknown' };
    if (exit.exception !== 1) return { kind: 'unknown' };
    if ((exit.dr6 & DR6_BS) !== 0n || this.#steppingOver !== undefined) {
      if (this.#steppingOver !== undefined) {
        this.#steppingOver = undefined;
        this.#apply();
        return this.#stepUsers > 0 ? { kind: 'step' } : { kind: 'internal' };
      }
      return this.#stepUsers > 0 ? { kind: 'step' } : { kind: 'unknown' };
    }
    for (let i = 0; i < 4; i++) {
      const a = this.#hw[i];
      if (a !== undefined && ((exit.dr6 >> BigInt(i)) & 1n) === 1n) {
        this.#steppingOver = i;
        this.#apply();
        return { kind: 'hw', address: a };
      }
    }
    return { kind: 'unknown' };
  }

  #apply(): void {
    let control = 0;
    const dr: bigint[] = [0n, 0n, 0n, 0n, 0n, 0n, 0n, 0n];
    let dr7 = 0n;
    this.#hw.forEach((a, i) => {
      if (a === undefined) return;
      dr[i] = a;
      if (this.#steppingOver !== i) dr7 |= 1n << BigInt(2 * i); // L<i>; RW=00 (execute), LEN=00
    });
    dr[7] = dr7;
    if (dr7 !== 0n) control |= GUESTDBG.USE_HW_BP;
    if (this.#stepUsers > 0 || this.#steppingOver !== undefined) control |= GUESTDBG.SINGLESTEP;
    if (this.#swbp) control |= GUESTDBG.USE_SW_BP;
    if (control !== 0) control |= GUESTDBG.ENABLE;
    const key = `${control}:${dr.join(',')}`;
    if (key === this.#applied) return; // KVM_SET_GUEST_DEBUG costs ~6.5 µs on PVM: skip no-ops
    this.#applied = key;
    this.#target.setGuestDebug(control, dr);
  }
}
