/**
 * x86 decoding with `iced-x86`: disassembly for violation messages, and the successors of an
 * instruction for the probe mechanism (where will control go after this instruction?).
 * @module
 */
import {
  BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Formatter, FormatterSyntax, Instruction, Mnemonic, OpKind, Register,
} from 'iced-x86';
import type { GuestMemory, Regs, Stop } from '@tsvm/core';

/** x86 instructions are at most 15 bytes. */
const MAX_INSN = 15;

/** One decoded instruction (plain data: the iced objects are freed before returning). */
export interface DecodedInstruction {
  /** Address the instruction was decoded at (as the guest sees it). */
  readonly ip: bigint;
  /** Length in bytes. */
  readonly length: number;
  /** Intel-syntax text, e.g. `out 0E5h,al`. */
  readonly text: string;
  /** Raw bytes. */
  readonly bytes: Uint8Array;
  /** Whether the bytes do not form a valid instruction. */
  readonly invalid: boolean;
}

/** Where control can go after an instruction. */
export interface Successors {
  /** Candidate next instruction addresses (as the guest sees them). */
  readonly addresses: readonly bigint[];
  /** False when some successor could not be computed (e.g. an fs-relative indirect jump). */
  readonly complete: boolean;
}

/** Reads up to 15 bytes at `physical`, fewer at the end of a region; empty when unreadable. */
export function readCode(mem: GuestMemory, physical: bigint): Uint8Array {
  for (let n = MAX_INSN; n > 0; n--) {
    try {
      return mem.read(physical, n);
    } catch { /* shorter read: the instruction may end at a region boundary */ }
  }
  return new Uint8Array(0);
}

function withInstruction<T>(bytes: Uint8Array, ip: bigint, bitness: 16 | 32 | 64, f: (i: Instruction) => T): T {
  const d = new Decoder(bitness, bytes, DecoderOptions.None);
  try {
    d.ip = ip;
    const insn = d.decode();
    try { return f(insn); } finally { insn.free(); }
  } finally {
    d.free();
  }
}

let formatter: Formatter | undefined;

/** Decodes the first instruction of `bytes` as if at `ip`. */
export function decodeBytes(bytes: Uint8Array, ip: bigint, bitness: 16 | 32 | 64): DecodedInstruction {
  if (bytes.length === 0) return { ip, length: 0, text: '(no bytes)', bytes, invalid: true };
  formatter ??= new Formatter(FormatterSyntax.Intel);
  const f = formatter;
  return withInstruction(bytes, ip, bitness, (i) => ({
    ip, length: i.length, text: i.isInvalid ? '(invalid instruction)' : f.format(i), bytes: bytes.slice(0, i.length), invalid: i.isInvalid,
  }));
}

/**
 * Disassembles the instruction at guest address `rip` for a message, e.g.
 * `0x1000: out 0E5h,al [e6 e5]`. `physical` is where to read it (default: `rip`, i.e. identity
 * mapping). Never throws: unreadable memory gives `0x1000: (unreadable)`.
 */
export function formatInstructionAt(mem: GuestMemory, rip: bigint, bitness: 16 | 32 | 64, options: { physical?: bigint } = {}): string {
  return formatInstruction(readCode(mem, options.physical ?? rip), rip, bitness);
}

/**
 * Formats the first instruction of `bytes` at guest address `rip` like
 * {@link formatInstructionAt}, e.g. `0x1000: out 0E5h,al [e6 e5]` (for an exec event's `code`).
 */
export function formatInstruction(bytes: Uint8Array, rip: bigint, bitness: 16 | 32 | 64): string {
  if (bytes.length === 0) return `0x${rip.toString(16)}: (unreadable)`;
  const d = decodeBytes(bytes, rip, bitness);
  return `0x${rip.toString(16)}: ${d.text} [${Array.from(d.bytes, (b) => b.toString(16).padStart(2, '0')).join(' ')}]`;
}

/**
 * Explains an `internal-error` stop: core's message, then the instruction at RIP disassembled,
 * from the bytes KVM reported with an emulation failure when it did, else from what core read at
 * RIP, e.g. `... at 0x1000: int3 [cc] (bytes from KVM)`.
 */
export function explainInternalError(stop: Extract<Stop, { reason: 'internal-error' }>): string {
  const kvm = stop.instruction !== undefined && stop.instruction.length > 0;
  const bytes = kvm ? (stop.instruction as Uint8Array) : stop.code;
  const at = `0x${stop.rip.toString(16)}`;
  if (bytes.length === 0) return `${stop.message} at ${at}: (code unreadable)`;
  const d = decodeBytes(bytes, stop.rip, stop.bitness);
  const hex = Array.from(d.invalid ? bytes : d.bytes, (b) => b.toString(16).padStart(2, '0')).join(' ');
  return `${stop.message} at ${at}: ${d.text} [${hex}] (bytes ${kvm ? 'from KVM' : 'read at RIP'})`;
}

/** Reads a pointer-sized value at a guest *virtual* address (the caller translates). */
export type ReadPointer = (linear: bigint, width: 2 | 4 | 8) => bigint | undefined;

const REG_KEYS = new Map<number, keyof Regs>();
for (const k of ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15'] as const) {
  const wide = Register[k.toUpperCase() as keyof typeof Register] as number;
  REG_KEYS.set(wide, k);
  const narrow = k.startsWith('r') && /\d/.test(k) ? `${k.toUpperCase()}D` : `E${k.slice(1).toUpperCase()}`;
  const n = Register[narrow as keyof typeof Register] as number | undefined;
  if (n !== undefined) REG_KEYS.set(n, k);
}

function reg(r: Register, regs: Regs, nextIp: bigint): bigint | undefined {
  if (r === Register.None) return 0n;
  if (r === Register.RIP || r === Register.EIP) return nextIp;
  const k = REG_KEYS.get(r);
  return k === undefined ? undefined : regs[k];
}

/** Inputs for computing indirect successors: the registers at the instruction and a memory reader. */
export interface MachineView {
  /** General-purpose registers with RIP at the instruction. */
  readonly regs: Regs;
  /** Reads a pointer at a linear address. */
  readonly read: ReadPointer;
  /** Reads `IA32_LSTAR` (the `syscall` target); called only for `syscall`. */
  readonly lstar?: () => bigint | undefined;
}

/**
 * Where control may go after the instruction `bytes` at `ip`: the fall-through, the target of a
 * direct branch (both for conditional ones), and — because the vCPU is stopped *at* the
 * instruction — the exact target of `ret`, register- and memory-indirect jumps and calls, and
 * `syscall` (LSTAR). `int n` and exceptions arm the fall-through (reached after `iret`).
 */
export function successors(bytes: Uint8Array, ip: bigint, bitness: 16 | 32 | 64, view: MachineView | undefined): Successors {
  return withInstruction(bytes, ip, bitness, (i) => {
    const next = i.nextIP;
    const width = (bitness / 8) as 2 | 4 | 8;
    const mask = (v: bigint): bigint => BigInt.asUintN(bitness, v);
    switch (i.flowControl) {
      case FlowControl.Next: case FlowControl.Interrupt: case FlowControl.Exception: case FlowControl.XbeginXabortXend:
        return { addresses: [next], complete: true };
      case FlowControl.UnconditionalBranch:
        return i.op0Kind === OpKind.FarBranch16 || i.op0Kind === OpKind.FarBranch32 ? { addresses: [], complete: false } : { addresses: [i.nearBranchTarget], complete: true };
      case FlowControl.ConditionalBranch:
        return { addresses: uniq([next, i.nearBranchTarget]), complete: true };
      case FlowControl.Call:
        if (i.mnemonic === Mnemonic.Syscall) {
          const lstar = view?.lstar?.();
          return lstar !== undefined ? { addresses: uniq([lstar, next]), complete: true } : { addresses: [next], complete: false };
        }
        if (i.nearBranchTarget === 0n && i.op0Kind !== OpKind.NearBranch16 && i.op0Kind !== OpKind.NearBranch32 && i.op0Kind !== OpKind.NearBranch64) return { addresses: [next], complete: false };
        return { addresses: [i.nearBranchTarget], complete: true };
      case FlowControl.Return: {
        if (!view) return { addresses: [], complete: false };
        if (i.mnemonic === Mnemonic.Sysret || i.mnemonic === Mnemonic.Sysexit) return { addresses: [mask(view.regs.rcx)], complete: true };
        const t = view.read(view.regs.rsp, width);
        return t === undefined ? { addresses: [], complete: false } : { addresses: [mask(t)], complete: true };
      }
      case FlowControl.IndirectBranch: case FlowControl.IndirectCall: {
        if (!view) return { addresses: [], complete: false };
        if (i.op0Kind === OpKind.Register) {
          const v = reg(i.op0Register, view.regs, next);
          return v === undefined ? { addresses: [], complete: false } : { addresses: [mask(v)], complete: true };
        }
        if (i.op0Kind !== OpKind.Memory || i.memorySegment === Register.FS || i.memorySegment === Register.GS) return { addresses: [], complete: false };
        const ea = i.isIpRelMemoryOperand ? i.ipRelMemoryAddress : (() => {
          const b = reg(i.memoryBase, view.regs, next), x = reg(i.memoryIndex, view.regs, next);
          return b === undefined || x === undefined ? undefined : mask(b + x * BigInt(i.memoryIndexScale) + i.memoryDisplacementU64);
        })();
        const t = ea === undefined ? undefined : view.read(mask(ea), width);
        return t === undefined ? { addresses: [], complete: false } : { addresses: [mask(t)], complete: true };
      }
      default:
        return { addresses: [], complete: false };
    }
  });
}

function uniq(a: bigint[]): bigint[] {
  return [...new Set(a)];
}

const MEMORY_OPERANDS = new Set<OpKind>([
  OpKind.Memory, OpKind.MemorySegSI, OpKind.MemorySegESI, OpKind.MemorySegRSI, OpKind.MemorySegDI, OpKind.MemorySegEDI,
  OpKind.MemorySegRDI, OpKind.MemoryESDI, OpKind.MemoryESEDI, OpKind.MemoryESRDI,
]);
/** Reported at (or completed by) the host with RIP on them: never moved out of line. */
const STAYS_IN_PLACE = new Set<Mnemonic>([
  Mnemonic.In, Mnemonic.Out, Mnemonic.Insb, Mnemonic.Insw, Mnemonic.Insd, Mnemonic.Outsb, Mnemonic.Outsw, Mnemonic.Outsd, Mnemonic.Hlt,
]);

/**
 * Whether `i` behaves the same at another address: straight-line code or a direct near branch,
 * no port I/O or `hlt` (exits that would report the copy's address), and no memory operand
 * other than `lea`'s or a long `nop`'s — an access that faults would show the guest's fault
 * handler the copy's RIP (a guest that looks up its faulting RIP, e.g. Linux's exception
 * tables, would not find it), so those instructions stay in place.
 */
function movable(i: Instruction): boolean {
  if (i.isInvalid || STAYS_IN_PLACE.has(i.mnemonic)) return false;
  const fc = i.flowControl;
  if (fc === FlowControl.ConditionalBranch || fc === FlowControl.UnconditionalBranch) {
    return i.op0Kind === OpKind.NearBranch16 || i.op0Kind === OpKind.NearBranch32 || i.op0Kind === OpKind.NearBranch64;
  }
  if (fc !== FlowControl.Next) return false;
  if (i.mnemonic === Mnemonic.Lea || i.mnemonic === Mnemonic.Nop) return true;
  for (let k = 0; k < i.opCount; k++) if (MEMORY_OPERANDS.has(i.opKind(k))) return false;
  return true;
}

/** Code that runs instructions away from their address and then jumps back. */
export interface OutOfLine {
  /** The relocated instructions followed by a jump to `resume`, encoded for address `at`. */
  readonly code: Uint8Array;
  /** How many original bytes the copied instructions cover. */
  readonly covered: number;
  /** Where the copy jumps back to (the first instruction not copied). */
  readonly resume: bigint;
}

/**
 * Relocates the whole instructions at the start of `bytes` (decoded as if at `ip`) that cover
 * at least `minLength` bytes so they run at `at`, followed by a jump back to the first
 * instruction not copied — execute-out-of-line, as kprobes and uprobes do. Branches and
 * RIP-relative operands are re-encoded for the new address (iced-x86's block encoder). Returns
 * undefined when an instruction is not {@link movable}, a branch is not the last one copied,
 * or the copy cannot be encoded (e.g. out of `rel32` range); 16-bit code is never moved.
 */
export function relocateOutOfLine(bytes: Uint8Array, ip: bigint, bitness: 16 | 32 | 64, minLength: number, at: bigint): OutOfLine | undefined {
  if (bitness === 16 || bytes.length === 0) return undefined;
  const d = new Decoder(bitness, bytes, DecoderOptions.None);
  const made: Instruction[] = [];
  try {
    d.ip = ip;
    let covered = 0;
    while (covered < minLength) {
      if (!d.canDecode) return undefined;
      const i = d.decode();
      made.push(i);
      if (!movable(i)) return undefined;
      covered += i.length;
      // A branch ends the copy: the bytes after it are not on its taken path.
      if (i.flowControl !== FlowControl.Next && covered < minLength) return undefined;
    }
    const resume = BigInt.asUintN(bitness, ip + BigInt(covered));
    made.push(Instruction.createBranch(bitness === 64 ? Code.Jmp_rel32_64 : Code.Jmp_rel32_32, resume));
    // One instruction per encoder call: a block encoder given the whole group would aim a branch
    // back to the group's first address at the copy, and the guest would loop past the trap.
    const parts: Uint8Array[] = [];
    let off = 0n;
    for (const i of made) {
      const be = new BlockEncoder(bitness, BlockEncoderOptions.None);
      try {
        be.add(i);
        const b = be.encode(at + off);
        parts.push(b);
        off += BigInt(b.length);
      } finally {
        be.free();
      }
    }
    const code = new Uint8Array(Number(off));
    let k = 0;
    for (const b of parts) { code.set(b, k); k += b.length; }
    return { code, covered, resume };
  } catch {
    return undefined; // out of branch range, or an instruction the encoder cannot place there
  } finally {
    for (const i of made) i.free();
    d.free();
  }
}
