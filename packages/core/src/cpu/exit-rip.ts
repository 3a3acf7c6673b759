/**
 * The one helper every consumer uses for "which instruction caused this exit": binds
 * {@link accessingInstruction} to a vCPU's registers and the guest's code, read through the
 * checked `GuestMemory` after a page walk (so a garbage CR3 or RIP yields RIP unchanged, never
 * an out-of-bounds read).
 * @module
 */
import type { BackendVcpu, Sregs } from '../backend.js';
import type { VcpuExit } from '../exits.js';
import type { GuestMemory } from '../memory.js';
import { accessingInstruction, movesRip, type IoRipBehaviour } from './io-rip.js';
import { bitnessOf, codeAt } from './paging.js';

/** Reads exactly `length` (≤ 15) code bytes at virtual `rip`; undefined if any is unreadable. */
export function readCodeBytes(memory: GuestMemory, sregs: Sregs, rip: bigint, length: number): Uint8Array | undefined {
  const code = codeAt(memory, sregs, rip);
  return code.length >= length ? code.subarray(0, length) : undefined;
}

/**
 * The address of the instruction that caused `exit` on `vcpu`: RIP, except at a port-I/O exit
 * on a host whose KVM has already moved RIP past some I/O forms (see `HostCapabilities.ioExitRip`).
 * One `KVM_GET_REGS` (plus `KVM_GET_SREGS` and a short code read on such hosts).
 */
export function instructionRipOf(exit: VcpuExit | undefined, vcpu: BackendVcpu, memory: GuestMemory, behaviour: IoRipBehaviour): bigint {
  const regs = vcpu.getRegs();
  if (exit?.kind !== 'io' || !movesRip(behaviour)) return regs.rip;
  const sregs = vcpu.getSregs();
  return accessingInstruction(exit, regs.rip, {
    bitness: bitnessOf(sregs), rdx: regs.rdx, rcx: regs.rcx,
    readCode: (rip, length) => readCodeBytes(memory, sregs, rip, length),
  }, behaviour);
}
