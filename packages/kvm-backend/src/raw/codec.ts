/**
 * Byte-buffer codecs for KVM structs, at offsets taken from the koffi definitions.
 * Encoding into reusable buffers keeps the exit path free of per-call marshalling.
 * @module
 */
import * as S from './structs.js';
import { REG_NAMES, type CpuidEntry, type DTable, type Regs, type Segment, type Sregs } from '../types.js';

const SEG_FIELDS = ['type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable'] as const;
const SEG = {
  base: S.offsetOf(S.kvm_segment, 'base'),
  limit: S.offsetOf(S.kvm_segment, 'limit'),
  selector: S.offsetOf(S.kvm_segment, 'selector'),
  bytes: Object.fromEntries(SEG_FIELDS.map((f) => [f, S.offsetOf(S.kvm_segment, f)])) as Record<(typeof SEG_FIELDS)[number], number>,
};
const SEG_NAMES = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
const CR_NAMES = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base'] as const;

/** A DataView over a whole Uint8Array. */
export function dv(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** Decodes `struct kvm_regs`. */
export function decodeRegs(buf: Uint8Array): Regs {
  const v = dv(buf);
  const r = {} as Regs;
  REG_NAMES.forEach((n, i) => { r[n] = v.getBigUint64(i * 8, true); });
  return r;
}

/** Encodes `struct kvm_regs` into `buf`. */
export function encodeRegs(regs: Regs, buf: Uint8Array): void {
  const v = dv(buf);
  REG_NAMES.forEach((n, i) => { v.setBigUint64(i * 8, BigInt.asUintN(64, regs[n]), true); });
}

function decodeSegment(v: DataView, at: number): Segment {
  const s = {
    base: v.getBigUint64(at + SEG.base, true),
    limit: v.getUint32(at + SEG.limit, true),
    selector: v.getUint16(at + SEG.selector, true),
  } as Segment;
  for (const f of SEG_FIELDS) s[f] = v.getUint8(at + SEG.bytes[f]);
  return s;
}

function encodeSegment(s: Segment, v: DataView, at: number): void {
  v.setBigUint64(at + SEG.base, BigInt.asUintN(64, s.base), true);
  v.setUint32(at + SEG.limit, s.limit >>> 0, true);
  v.setUint16(at + SEG.selector, s.selector & 0xffff, true);
  for (const f of SEG_FIELDS) v.setUint8(at + SEG.bytes[f], s[f] & 0xff);
}

/** Decodes `struct kvm_sregs`. */
export function decodeSregs(buf: Uint8Array): Sregs {
  const v = dv(buf);
  const out = {} as Sregs;
  for (const n of SEG_NAMES) out[n] = decodeSegment(v, S.offsetOf(S.kvm_sregs, n));
  for (const n of ['gdt', 'idt'] as const) {
    const at = S.offsetOf(S.kvm_sregs, n);
    out[n] = { base: v.getBigUint64(at, true), limit: v.getUint16(at + 8, true) } satisfies DTable;
  }
  for (const n of CR_NAMES) out[n] = v.getBigUint64(S.offsetOf(S.kvm_sregs, n), true);
  const ib = S.offsetOf(S.kvm_sregs, 'interrupt_bitmap');
  out.interrupt_bitmap = [0, 1, 2, 3].map((i) => v.getBigUint64(ib + i * 8, true)) as Sregs['interrupt_bitmap'];
  return out;
}

/** Encodes `struct kvm_sregs` into `buf`. */
export function encodeSregs(s: Sregs, buf: Uint8Array): void {
  const v = dv(buf);
  for (const n of SEG_NAMES) encodeSegment(s[n], v, S.offsetOf(S.kvm_sregs, n));
  for (const n of ['gdt', 'idt'] as const) {
    const at = S.offsetOf(S.kvm_sregs, n);
    v.setBigUint64(at, BigInt.asUintN(64, s[n].base), true);
    v.setUint16(at + 8, s[n].limit & 0xffff, true);
  }
  for (const n of CR_NAMES) v.setBigUint64(S.offsetOf(S.kvm_sregs, n), BigInt.asUintN(64, s[n]), true);
  const ib = S.offsetOf(S.kvm_sregs, 'interrupt_bitmap');
  s.interrupt_bitmap.forEach((x, i) => v.setBigUint64(ib + i * 8, BigInt.asUintN(64, x), true));
}

/** Decodes a `struct kvm_cpuid2` buffer. */
export function decodeCpuid(buf: Uint8Array): CpuidEntry[] {
  const v = dv(buf);
  const n = v.getUint32(0, true);
  const entSize = S.sizeOf(S.kvm_cpuid_entry2);
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const at = 8 + i * entSize;
    out.push({
      function: v.getUint32(at, true), index: v.getUint32(at + 4, true), flags: v.getUint32(at + 8, true),
      eax: v.getUint32(at + 12, true), ebx: v.getUint32(at + 16, true), ecx: v.getUint32(at + 20, true), edx: v.getUint32(at + 24, true),
    });
  }
  return out;
}

/** Encodes a `struct kvm_cpuid2` buffer. */
export function encodeCpuid(entries: readonly CpuidEntry[]): Uint8Array {
  const entSize = S.sizeOf(S.kvm_cpuid_entry2);
  const buf = new Uint8Array(8 + entries.length * entSize);
  const v = dv(buf);
  v.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const at = 8 + i * entSize;
    v.setUint32(at, e.function >>> 0, true); v.setUint32(at + 4, e.index >>> 0, true); v.setUint32(at + 8, e.flags >>> 0, true);
    v.setUint32(at + 12, e.eax >>> 0, true); v.setUint32(at + 16, e.ebx >>> 0, true); v.setUint32(at + 20, e.ecx >>> 0, true); v.setUint32(at + 24, e.edx >>> 0, true);
  });
  return buf;
}
