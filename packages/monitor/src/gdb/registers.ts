/**
 * x86-64 registers as gdb numbers them (`org.gnu.gdb.i386.core`: rax rbx rcx rdx rsi rdi rbp rsp
 * r8–r15 rip, then eflags cs ss ds es fs gs as 32-bit values, then the x87 registers), the
 * target description that says so, and the `g`-packet encoding. The x87 registers are sent as
 * unavailable (`xx`): the stub does not read FPU state.
 * @module
 */
import type { Regs, Sregs } from '@tsvm/core';

/** The 64-bit registers, in gdb's order (numbers 0–16). */
export const GPRS = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rbp', 'rsp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip'] as const satisfies ReadonlyArray<keyof Regs>;
/** The segment selectors, in gdb's order (numbers 18–23, after eflags at 17). */
export const SEGMENTS = ['cs', 'ss', 'ds', 'es', 'fs', 'gs'] as const satisfies ReadonlyArray<keyof Sregs>;
const X87 = ['st0', 'st1', 'st2', 'st3', 'st4', 'st5', 'st6', 'st7'];
const X87_CONTROL = ['fctrl', 'fstat', 'ftag', 'fiseg', 'fioff', 'foseg', 'fooff', 'fop'];

/** Number of registers in the description (gdb requires the x87 ones in the core feature). */
export const REGISTER_COUNT = GPRS.length + 1 + SEGMENTS.length + X87.length + X87_CONTROL.length;

/** Size in bytes of register `n` (undefined past the last one). */
export function registerSize(n: number): number | undefined {
  if (!Number.isInteger(n) || n < 0 || n >= REGISTER_COUNT) return undefined;
  if (n < GPRS.length) return 8;
  if (n < GPRS.length + 1 + SEGMENTS.length) return 4;
  if (n < GPRS.length + 1 + SEGMENTS.length + X87.length) return 10;
  return 4;
}

const EFLAGS = [['CF', 0], ['PF', 2], ['AF', 4], ['ZF', 6], ['SF', 7], ['TF', 8], ['IF', 9], ['DF', 10], ['OF', 11], ['NT', 14], ['RF', 16], ['VM', 17], ['AC', 18], ['VIF', 19], ['VIP', 20], ['ID', 21]] as const;

/** The target description gdb reads with `qXfer:features:read:target.xml`. */
export const TARGET_XML = [
  '<?xml version="1.0"?>',
  '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
  '<target version="1.0">',
  '<architecture>i386:x86-64</architecture>',
  '<feature name="org.gnu.gdb.i386.core">',
  '<flags id="i386_eflags" size="4">',
  ...EFLAGS.map(([name, bit]) => `<field name="${name}" start="${bit}" end="${bit}"/>`),
  '</flags>',
  ...GPRS.map((r) => `<reg name="${r}" bitsize="64" type="${r === 'rip' ? 'code_ptr' : r === 'rsp' || r === 'rbp' ? 'data_ptr' : 'int64'}"/>`),
  '<reg name="eflags" bitsize="32" type="i386_eflags"/>',
  ...SEGMENTS.map((s) => `<reg name="${s}" bitsize="32" type="int32"/>`),
  ...X87.map((r) => `<reg name="${r}" bitsize="80" type="i387_ext"/>`),
  ...X87_CONTROL.map((r) => `<reg name="${r}" bitsize="32" type="int" group="float"/>`),
  '</feature>',
  '</target>',
].join('\n');

/** A little-endian hex field of `size` bytes. */
export function leHex(v: bigint, size: number): string {
  let s = '';
  let x = BigInt.asUintN(size * 8, v);
  for (let i = 0; i < size; i++) { s += (x & 0xffn).toString(16).padStart(2, '0'); x >>= 8n; }
  return s;
}

/** Little-endian hex to a value; undefined unless exactly `size` bytes of hex. */
export function parseLeHex(s: string, size: number): bigint | undefined {
  if (s.length !== size * 2 || !/^[0-9a-fA-F]*$/.test(s)) return undefined;
  let v = 0n;
  for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(parseInt(s.slice(i * 2, i * 2 + 2), 16));
  return v;
}

/** Register `n` as hex (`xx…` for the ones the stub does not read); `rip` is passed separately (see the server). */
export function encodeRegister(n: number, regs: Regs, sregs: Sregs): string | undefined {
  const size = registerSize(n);
  if (size === undefined) return undefined;
  if (n < GPRS.length) return leHex(regs[GPRS[n] as (typeof GPRS)[number]], 8);
  if (n === GPRS.length) return leHex(regs.rflags, 4);
  const seg = SEGMENTS[n - GPRS.length - 1];
  if (seg !== undefined) return leHex(BigInt(sregs[seg].selector), 4);
  return 'xx'.repeat(size);
}

/** The whole `g` reply. */
export function encodeAll(regs: Regs, sregs: Sregs): string {
  let s = '';
  for (let n = 0; n < REGISTER_COUNT; n++) s += encodeRegister(n, regs, sregs) ?? '';
  return s;
}

/**
 * The general registers (and eflags) a `G`/`P` write sets: the part of `regs` gdb may change.
 * Segment selectors and x87 values are accepted and ignored (changing a selector without its
 * descriptor would corrupt the vCPU). Returns undefined when a field is malformed.
 */
export function decodeRegister(n: number, hex: string): { readonly name: keyof Regs; readonly value: bigint } | null | undefined {
  const size = registerSize(n);
  if (size === undefined) return undefined;
  if (/^x+$/i.test(hex) && hex.length === size * 2) return null;
  const v = parseLeHex(hex, size);
  if (v === undefined) return undefined;
  if (n < GPRS.length) return { name: GPRS[n] as (typeof GPRS)[number], value: v };
  if (n === GPRS.length) return { name: 'rflags', value: v };
  return null;
}

/** Splits a `G` payload into per-register writes; undefined when it is malformed or too long. */
export function decodeAll(hex: string): Array<{ readonly name: keyof Regs; readonly value: bigint }> | undefined {
  const out: Array<{ readonly name: keyof Regs; readonly value: bigint }> = [];
  let at = 0;
  for (let n = 0; n < REGISTER_COUNT && at < hex.length; n++) {
    const size = (registerSize(n) ?? 0) * 2;
    const field = hex.slice(at, at + size);
    if (field.length < size) return undefined;
    const d = decodeRegister(n, field);
    if (d === undefined) return undefined;
    if (d) out.push(d);
    at += size;
  }
  return at === hex.length ? out : undefined;
}
