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
import { bitnessOf, linearRip, translateVirtual } from './paging.js';

/** Reads `length` code bytes at virtual `rip`, page by page; undefined if any is unmapped. */
export function readCodeBytes(memory: GuestMemory, sregs: Sregs, rip: bigint, length: number): Uint8Array | undefined {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const linear = linearRip(sregs, rip + BigInt(done));
    const pa = translateVirtual(memory, sregs, linear);
    if (pa === undefined) return undefined;
    const n = Math.min(length - done, 4096 - Number(linear & 0xfffn));
    try {
      out.set(memory.read(pa, n), done);
    } catch {
      return undefined;
    }
    done += n;
  }
  return out;
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
