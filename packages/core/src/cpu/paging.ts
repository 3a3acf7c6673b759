/**
 * Guest virtual → guest-physical translation by walking the guest's page tables from the host.
 * The CPU reports RIP as a virtual address; core reads the instruction bytes at RIP for a stop
 * (an emulation failure) and the monitor keys exec hooks by guest-physical address: this walk
 * connects the two. Reads go through the checked `GuestMemory`, so a garbage CR3 yields
 * `undefined`, never an out-of-bounds read.
 * @module
 */
import type { GuestMemory } from '../memory.js';
import type { Sregs } from '../backend.js';

const CR0_PG = 1n << 31n, CR4_PSE = 1n << 4n, CR4_PAE = 1n << 5n, EFER_LMA = 1n << 10n;
const PRESENT = 1n, PS = 1n << 7n;
const ADDR = 0x000f_ffff_ffff_f000n;

/** Instruction width the vCPU decodes in now: 16, 32 or 64. */
export function bitnessOf(sregs: Sregs): 16 | 32 | 64 {
  if ((sregs.efer & EFER_LMA) !== 0n && sregs.cs.l === 1) return 64;
  return sregs.cs.db === 1 && (sregs.cr0 & 1n) === 1n ? 32 : 16;
}

/** The linear address of `rip` (adds the CS base outside 64-bit mode). */
export function linearRip(sregs: Sregs, rip: bigint): bigint {
  return bitnessOf(sregs) === 64 ? rip : BigInt.asUintN(32, sregs.cs.base + rip);
}

function entry(mem: GuestMemory, table: bigint, index: bigint, wide: boolean): bigint | undefined {
  const at = table + index * (wide ? 8n : 4n);
  try {
    return wide ? mem.readU64(at) : BigInt(mem.readUint(at, 4));
  } catch {
    return undefined;
  }
}

/**
 * Translates a linear address with the paging mode in `sregs` (none, 32-bit, PAE, 4-level).
 * @returns the guest-physical address, or undefined when unmapped or the tables are unreadable.
 */
export function translateVirtual(mem: GuestMemory, sregs: Sregs, linear: bigint): bigint | undefined {
  if ((sregs.cr0 & CR0_PG) === 0n) return linear;
  if ((sregs.efer & EFER_LMA) !== 0n) {
    let table = sregs.cr3 & ADDR;
    for (let level = 3; level >= 0; level--) {
      const shift = 12n + 9n * BigInt(level);
      const e = entry(mem, table, (linear >> shift) & 0x1ffn, true);
      if (e === undefined || (e & PRESENT) === 0n) return undefined;
      if (level > 0 && level < 3 && (e & PS) !== 0n) {
        const mask = (1n << shift) - 1n;
        return (e & ADDR & ~mask) | (linear & mask);
      }
      table = e & ADDR;
    }
    return table | (linear & 0xfffn);
  }
  if ((sregs.cr4 & CR4_PAE) !== 0n) {
    const pdpte = entry(mem, sregs.cr3 & 0xffff_ffe0n, (linear >> 30n) & 3n, true);
    if (pdpte === undefined || (pdpte & PRESENT) === 0n) return undefined;
    const pde = entry(mem, pdpte & ADDR, (linear >> 21n) & 0x1ffn, true);
    if (pde === undefined || (pde & PRESENT) === 0n) return undefined;
    if ((pde & PS) !== 0n) return (pde & ADDR & ~0x1f_ffffn) | (linear & 0x1f_ffffn);
    const pte = entry(mem, pde & ADDR, (linear >> 12n) & 0x1ffn, true);
    if (pte === undefined || (pte & PRESENT) === 0n) return undefined;
    return (pte & ADDR) | (linear & 0xfffn);
  }
  const pde = entry(mem, sregs.cr3 & 0xffff_f000n, (linear >> 22n) & 0x3ffn, false);
  if (pde === undefined || (pde & PRESENT) === 0n) return undefined;
  if ((pde & PS) !== 0n && (sregs.cr4 & CR4_PSE) !== 0n) return (pde & 0xffc0_0000n) | (linear & 0x3f_ffffn);
  const pte = entry(mem, pde & 0xffff_f000n, (linear >> 12n) & 0x3ffn, false);
  if (pte === undefined || (pte & PRESENT) === 0n) return undefined;
  return (pte & 0xffff_f000n) | (linear & 0xfffn);
}

/** Longest x86 instruction. */
const MAX_INSN = 15;

/**
 * Reads up to 15 bytes of code at `rip` through the current paging mode; stops early at an
 * unmapped page or the end of RAM. Never throws: unreadable code gives an empty array.
 */
export function codeAt(mem: GuestMemory, sregs: Sregs, rip: bigint): Uint8Array {
  const out: number[] = [];
  const linear = linearRip(sregs, rip);
  while (out.length < MAX_INSN) {
    const at = linear + BigInt(out.length);
    const phys = translateVirtual(mem, sregs, at);
    if (phys === undefined) break;
    const n = Math.min(MAX_INSN - out.length, 4096 - Number(at & 0xfffn));
    let got = 0;
    for (; got < n; got++) {
      try { out.push(mem.readUint(phys + BigInt(got), 1)); } catch { break; }
    }
    if (got < n) break;
  }
  return Uint8Array.from(out);
}
