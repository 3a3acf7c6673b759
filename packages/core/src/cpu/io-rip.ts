/**
 * Where the instruction behind a port-I/O exit is. KVM flavours disagree on RIP at an
 * `KVM_EXIT_IO`: on VMX and SVM it stays on an `in`/`out` until the next `KVM_RUN` completes
 * it, but a non-repeated `outs` goes through KVM's emulator and is already complete (RIP past
 * it; measured under nested SVM); on PVM the emulator has also completed a plain `out`, but not
 * an `in` or a `rep outs` (RIP *on* it). Nothing in `kvm_run` says which, so the backend
 * learns the rule per instruction class once per host ({@link IoRipBehaviour}) and this module
 * turns "RIP now" into "the accessing instruction" by decoding the guest's bytes. Every
 * consumer — the unhandled-exit report, `deny({ effect: 'gp' })`, probes, the audit log — goes
 * through {@link accessingInstruction}.
 * @module
 */
import type { IoExit } from '../exits.js';

/** The port-I/O instruction forms, which flavours treat differently. */
export type IoInstructionClass = 'out-imm' | 'out-dx' | 'outs' | 'rep-outs' | 'in-imm' | 'in-dx' | 'ins' | 'rep-ins';

/** Every {@link IoInstructionClass}. */
export const IO_INSTRUCTION_CLASSES: readonly IoInstructionClass[] = ['out-imm', 'out-dx', 'outs', 'rep-outs', 'in-imm', 'in-dx', 'ins', 'rep-ins'];

/** Where RIP is at an I/O exit of one class: on the instruction, or already after it. */
export type IoRipRule = 'on' | 'after';

/** RIP at an I/O exit, per instruction class, as this host's KVM reports it. */
export type IoRipBehaviour = Readonly<Record<IoInstructionClass, IoRipRule>>;

/** RIP stays on the instruction for every form: what is assumed when the host could not be probed (and on the mock). */
export const RIP_ON_INSTRUCTION: IoRipBehaviour = Object.freeze({
  'out-imm': 'on', 'out-dx': 'on', outs: 'on', 'rep-outs': 'on', 'in-imm': 'on', 'in-dx': 'on', ins: 'on', 'rep-ins': 'on',
});

/** One decoded port-I/O instruction. */
export interface IoInstruction {
  /** Its form. */
  readonly class: IoInstructionClass;
  /** Length in bytes, prefixes included. */
  readonly length: number;
  /** `in` or `out`. */
  readonly direction: 'in' | 'out';
  /** Element size in bytes. */
  readonly size: 1 | 2 | 4;
  /** The immediate port (`in al, imm8` / `out imm8, al` forms). */
  readonly port?: number;
  /** Address size in bits (for the count register of `rep` forms). */
  readonly addressBits: 16 | 32 | 64;
}

const SEGMENT_OR_REP = new Set([0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0xf2, 0xf3]);

/**
 * Decodes `bytes` as one port-I/O instruction occupying exactly all of them (prefixes, opcode,
 * immediate). Returns undefined for anything else — including a valid I/O instruction that is
 * shorter or longer than `bytes`.
 */
export function decodeIoInstruction(bytes: Uint8Array, bitness: 16 | 32 | 64): IoInstruction | undefined {
  let i = 0;
  let opsize = false, adsize = false, rep = false;
  // Legacy prefixes in any order, then at most one REX (64-bit mode) right before the opcode.
  for (; i < bytes.length; i++) {
    const b = bytes[i] as number;
    if (b === 0x66) opsize = true;
    else if (b === 0x67) adsize = true;
    else if (SEGMENT_OR_REP.has(b)) { if (b === 0xf2 || b === 0xf3) rep = true; }
    else break;
  }
  if (bitness === 64 && i < bytes.length && ((bytes[i] as number) & 0xf0) === 0x40) i++;
  if (i >= bytes.length) return undefined;
  const op = bytes[i] as number;
  const wide = (op & 1) === 1;
  const size: 1 | 2 | 4 = !wide ? 1 : (bitness === 16) !== opsize ? 2 : 4;
  const addressBits: 16 | 32 | 64 = bitness === 64 ? (adsize ? 32 : 64) : (bitness === 16) !== adsize ? 16 : 32;
  let cls: IoInstructionClass;
  let length = i + 1;
  let port: number | undefined;
  switch (op & 0xfe) {
    case 0xe4: cls = 'in-imm'; port = bytes[i + 1]; length++; break;
    case 0xe6: cls = 'out-imm'; port = bytes[i + 1]; length++; break;
    case 0xec: cls = 'in-dx'; break;
    case 0xee: cls = 'out-dx'; break;
    case 0x6c: cls = rep ? 'rep-ins' : 'ins'; break;
    case 0x6e: cls = rep ? 'rep-outs' : 'outs'; break;
    default: return undefined;
  }
  if (length !== bytes.length) return undefined;
  const direction = cls.includes('out') ? 'out' : 'in';
  return port === undefined ? { class: cls, length, direction, size, addressBits } : { class: cls, length, direction, size, port, addressBits };
}

/** What {@link accessingInstruction} needs to know about the vCPU. */
export interface IoCpuView {
  /** Instruction width now (16, 32 or 64). */
  readonly bitness: 16 | 32 | 64;
  /** RDX (the port of `dx` forms). */
  readonly rdx: bigint;
  /** RCX (the count of `rep` forms). */
  readonly rcx: bigint;
  /**
   * Reads `length` code bytes at virtual address `rip`, or returns undefined where the code is
   * not mapped or outside guest RAM.
   */
  readCode(rip: bigint, length: number): Uint8Array | undefined;
}

/** Whether any form leaves RIP after the instruction (if none, RIP is always the answer). */
export function movesRip(behaviour: IoRipBehaviour): boolean {
  for (const c of IO_INSTRUCTION_CLASSES) if (behaviour[c] === 'after') return true;
  return false;
}

/** The longest x86 instruction. */
const MAX_LENGTH = 15;

function matches(d: IoInstruction, exit: IoExit, cpu: IoCpuView): boolean {
  if (d.direction !== exit.direction || d.size !== exit.size) return false;
  if (d.port !== undefined) return d.port === exit.port;
  return Number(cpu.rdx & 0xffffn) === exit.port;
}

function countOf(d: IoInstruction, rcx: bigint): bigint {
  return d.addressBits === 64 ? rcx : rcx & ((1n << BigInt(d.addressBits)) - 1n);
}

/**
 * The address of the instruction that made I/O exit `exit`, given RIP now and the host's
 * {@link IoRipBehaviour}:
 * - an instruction *at* RIP that matches the exit (direction, size, port, and a non-zero count
 *   for `rep` forms) and whose class this host reports `on` it → RIP;
 * - otherwise the *shortest* matching instruction that ends at RIP and whose class this host
 *   reports `after` it → its start. Shortest, because the byte before an `out dx, al` is far
 *   more often the tail of the previous instruction that merely looks like a prefix (`mov al,
 *   0x41` ends in a REX-shaped 0x41) than a redundant prefix; an operand-size prefix that
 *   changes the element size is still found, since the shorter form does not match the size;
 * - neither (code unreadable or rewritten) → RIP, unchanged.
 *
 * Where both could be true (an `out dx, al` immediately followed by a `rep outsb` to the same
 * port, on a host that completes `out` before exiting but not `rep outs`) the two exits are
 * indistinguishable from the vCPU's state; the one at RIP wins, which is right for every
 * element of the `rep` but the `out` itself.
 */
export function accessingInstruction(exit: IoExit, rip: bigint, cpu: IoCpuView, behaviour: IoRipBehaviour): bigint {
  if (!movesRip(behaviour)) return rip;
  let here: Uint8Array | undefined;
  for (const want of [MAX_LENGTH, 4, 2, 1]) if ((here = cpu.readCode(rip, want))) break;
  if (here) {
    for (let len = 1; len <= here.length; len++) {
      const d = decodeIoInstruction(here.subarray(0, len), cpu.bitness);
      if (!d) continue;
      const repOk = !d.class.startsWith('rep') || countOf(d, cpu.rcx) > 0n;
      if (behaviour[d.class] === 'on' && repOk && matches(d, exit, cpu)) return rip;
      break;
    }
  }
  // The bytes before RIP; nearer spans are retried when the page before is unreadable.
  let before: Uint8Array | undefined;
  let span = 0;
  for (const want of [MAX_LENGTH, 4, 2, 1]) {
    span = Number(rip < BigInt(want) ? rip : BigInt(want));
    if (span > 0 && (before = cpu.readCode(rip - BigInt(span), span))) break;
  }
  if (before) {
    for (let len = 1; len <= span; len++) {
      const d = decodeIoInstruction(before.subarray(span - len), cpu.bitness);
      if (d && behaviour[d.class] === 'after' && matches(d, exit, cpu)) return rip - BigInt(len);
    }
  }
  return rip;
}
