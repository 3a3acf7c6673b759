/**
 * Argument checks for the public boundary: each throws {@link InvalidArgumentError} naming the
 * argument, so a wrong-typed call never escapes as a raw `TypeError` from deeper code.
 * @module
 */
import { InvalidArgumentError } from './errors.js';
import type { CpuidEntry, MsrEntry, Sregs } from './backend.js';

/** Describes any value for a message without ever throwing (null-prototype objects, symbols). */
export function show(v: unknown): string {
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v);
  if (v === null || typeof v === 'undefined' || typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (typeof v === 'symbol') return 'a symbol';
  if (typeof v === 'function') return 'a function';
  if (Array.isArray(v)) return 'an array';
  return 'an object';
}

/** `v` must be a non-null object (not an array). */
export function checkObject(v: unknown, name: string): Record<string, unknown> {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new InvalidArgumentError(name, `must be an object, got ${show(v)}`);
  return v as Record<string, unknown>;
}

/** `v` must be a `Uint8Array`. */
export function checkBytes(v: unknown, name: string): Uint8Array {
  if (!(v instanceof Uint8Array)) throw new InvalidArgumentError(name, `must be a Uint8Array, got ${show(v)}`);
  return v;
}

/** `v` must be an integer `number` in `[min, max]`. */
export function checkInt(v: unknown, name: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new InvalidArgumentError(name, `must be an integer in ${min}..${max}, got ${show(v)}`);
  return v;
}

/** `v` must be a `bigint` in `[min, max]`. */
export function checkBigint(v: unknown, name: string, min: bigint, max: bigint): bigint {
  if (typeof v !== 'bigint' || v < min || v > max) throw new InvalidArgumentError(name, `must be a bigint in ${min}..${max}, got ${show(v)}`);
  return v;
}

/** `v` must be a boolean or undefined. */
export function checkOptionalBoolean(v: unknown, name: string): boolean | undefined {
  if (v !== undefined && typeof v !== 'boolean') throw new InvalidArgumentError(name, `must be a boolean, got ${show(v)}`);
  return v;
}

/** `v` must be an array; returns it. */
export function checkArray(v: unknown, name: string, max = 1 << 16): readonly unknown[] {
  if (!Array.isArray(v)) throw new InvalidArgumentError(name, `must be an array, got ${show(v)}`);
  if (v.length > max) throw new InvalidArgumentError(name, `at most ${max} entries, got ${v.length}`);
  return v;
}

const U64 = (1n << 64n) - 1n;
const U32 = 0xffff_ffff;

/** An array of 32-bit MSR indices. */
export function checkMsrIndices(v: unknown, name: string): number[] {
  return checkArray(v, name).map((x, i) => checkInt(x, `${name}[${i}]`, 0, U32));
}

/** An array of `{ index, data }` MSR entries. */
export function checkMsrEntries(v: unknown, name: string): MsrEntry[] {
  return checkArray(v, name).map((x, i) => {
    const e = checkObject(x, `${name}[${i}]`);
    return { index: checkInt(e['index'], `${name}[${i}].index`, 0, U32), data: checkBigint(e['data'], `${name}[${i}].data`, 0n, U64) };
  });
}

const CPUID_FIELDS = ['function', 'index', 'flags', 'eax', 'ebx', 'ecx', 'edx'] as const;

/** An array of CPUID leaves with 32-bit fields. */
export function checkCpuid(v: unknown, name: string): CpuidEntry[] {
  return checkArray(v, name, 256).map((x, i) => {
    const e = checkObject(x, `${name}[${i}]`);
    const out = {} as CpuidEntry;
    for (const f of CPUID_FIELDS) out[f] = checkInt(e[f] ?? 0, `${name}[${i}].${f}`, 0, U32);
    return out;
  });
}

const SEGMENTS = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
const SEG_FIELDS = { limit: U32, selector: 0xffff, type: 15, present: 1, dpl: 3, db: 1, s: 1, l: 1, g: 1, avl: 1, unusable: 1 } as const;
const CRS = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base'] as const;

/** A complete `Sregs` value: every segment, table and control register with the right types and ranges. */
export function checkSregs(v: unknown, name: string): Sregs {
  const s = checkObject(v, name);
  for (const seg of SEGMENTS) {
    const g = checkObject(s[seg], `${name}.${seg}`);
    checkBigint(g['base'], `${name}.${seg}.base`, 0n, U64);
    for (const [f, max] of Object.entries(SEG_FIELDS)) checkInt(g[f], `${name}.${seg}.${f}`, 0, max);
  }
  for (const t of ['gdt', 'idt'] as const) {
    const d = checkObject(s[t], `${name}.${t}`);
    checkBigint(d['base'], `${name}.${t}.base`, 0n, U64);
    checkInt(d['limit'], `${name}.${t}.limit`, 0, 0xffff);
  }
  for (const cr of CRS) checkBigint(s[cr], `${name}.${cr}`, 0n, U64);
  const bm = checkArray(s['interrupt_bitmap'], `${name}.interrupt_bitmap`);
  if (bm.length !== 4) throw new InvalidArgumentError(`${name}.interrupt_bitmap`, `must have 4 entries, got ${bm.length}`);
  bm.forEach((w, i) => checkBigint(w, `${name}.interrupt_bitmap[${i}]`, 0n, U64));
  return v as Sregs;
}
