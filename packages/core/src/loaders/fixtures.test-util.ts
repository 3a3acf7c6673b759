/**
 * Test-only builders of synthetic images (ELF, multiboot, bzImage) and guest memories. Not
 * exported from the package.
 * @module
 */
import { expect } from 'vitest';
import { gpa } from '../address.js';
import { ImageFormatError, InvalidArgumentError } from '../errors.js';
import { GuestMemory } from '../memory.js';

/** A guest memory together with its backing buffers, for byte-exact assertions. */
export interface TestMemory {
  readonly memory: GuestMemory;
  readonly buffers: readonly Uint8Array[];
}

/** Builds guest memory from regions (default: one writable region at 0). Fills RAM with `fill`. */
export function makeMemory(
  regions: number | readonly { start: number; size: number; readonly?: boolean }[],
  fill = 0xcc,
): TestMemory {
  const list = typeof regions === 'number' ? [{ start: 0, size: regions }] : regions;
  const memory = new GuestMemory();
  const buffers = list.map((r, slot) => {
    const bytes = new Uint8Array(r.size);
    if (fill !== 0) bytes.fill(fill);
    memory.addRegion(
      { slot, start: gpa(r.start), size: r.size, readonly: r.readonly ?? false, name: `r${slot}` },
      { bytes, hostAddress: 0n, fd: -1, close() {} },
    );
    return bytes;
  });
  return { memory, buffers };
}

/** Copies every buffer (to compare later). */
export function snapshot(m: TestMemory): Uint8Array[] {
  return m.buffers.map((b) => b.slice());
}

/**
 * Runs a load that may fail; a failure must be a typed loader error and must leave guest
 * memory byte-for-byte unchanged. Returns whether the load succeeded.
 */
export function expectAtomic(m: TestMemory, load: () => unknown): boolean {
  const before = snapshot(m);
  try {
    load();
    return true;
  } catch (e) {
    if (!(e instanceof ImageFormatError || e instanceof InvalidArgumentError)) throw e;
    m.buffers.forEach((b, i) => {
      // A cheap equality check first: comparing 16 MiB with toEqual is slow.
      if (Buffer.compare(b, before[i] as Uint8Array) !== 0) expect.fail(`guest memory changed by a rejected load (${e.message})`);
    });
    return false;
  }
}

/** Runs `fn`; if it throws, the error must be a typed loader error. */
export function expectTyped(fn: () => unknown): void {
  try {
    fn();
  } catch (e) {
    if (!(e instanceof ImageFormatError || e instanceof InvalidArgumentError)) throw e;
  }
}

/** Expects `fn` to throw an {@link ImageFormatError} naming `field` (a string or pattern). */
export function expectImageError(fn: () => unknown, field: string | RegExp): ImageFormatError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ImageFormatError);
    const err = e as ImageFormatError;
    if (typeof field === 'string') expect(err.field).toBe(field);
    else expect(err.field).toMatch(field);
    return err;
  }
  return expect.fail('expected an ImageFormatError');
}

/** Expects `fn` to throw an {@link InvalidArgumentError} naming `argument`. */
export function expectArgumentError(fn: () => unknown, argument: string | RegExp): InvalidArgumentError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(InvalidArgumentError);
    const err = e as InvalidArgumentError;
    if (typeof argument === 'string') expect(err.argument).toBe(argument);
    else expect(err.argument).toMatch(argument);
    return err;
  }
  return expect.fail('expected an InvalidArgumentError');
}

/** A little-endian builder that grows as needed. */
export class Bytes {
  bytes: Uint8Array;
  constructor(size = 0) {
    this.bytes = new Uint8Array(size);
  }
  #grow(end: number): DataView {
    if (end > this.bytes.length) {
      const n = new Uint8Array(end);
      n.set(this.bytes);
      this.bytes = n;
    }
    return new DataView(this.bytes.buffer);
  }
  u8(o: number, v: number): this {
    this.#grow(o + 1).setUint8(o, v);
    return this;
  }
  u16(o: number, v: number): this {
    this.#grow(o + 2).setUint16(o, v, true);
    return this;
  }
  u32(o: number, v: number): this {
    this.#grow(o + 4).setUint32(o, v >>> 0, true);
    return this;
  }
  u64(o: number, v: bigint): this {
    this.#grow(o + 8).setBigUint64(o, BigInt.asUintN(64, v), true);
    return this;
  }
  set(o: number, d: Uint8Array): this {
    this.#grow(o + d.length);
    this.bytes.set(d, o);
    return this;
  }
}

/** Deterministic pseudo-random bytes. */
export function pattern(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** One segment of {@link buildElf}. */
export interface ElfSegmentSpec {
  paddr: bigint;
  vaddr?: bigint;
  data: Uint8Array;
  memsz?: bigint;
  type?: number;
  align?: bigint;
}

/** One note of {@link buildElf}. */
export interface ElfNoteSpec {
  name: string;
  type: number;
  desc: Uint8Array;
}

/** Builds a little-endian ELF executable: header, program headers, segment data, then notes. */
export function buildElf(spec: {
  class: 32 | 64;
  machine?: number;
  type?: number;
  entry: bigint;
  segments: ElfSegmentSpec[];
  notes?: ElfNoteSpec[];
}): Uint8Array {
  const is64 = spec.class === 64;
  const ehsize = is64 ? 64 : 52;
  const phentsize = is64 ? 56 : 32;
  const notes = spec.notes ?? [];
  const phnum = spec.segments.length + (notes.length > 0 ? 1 : 0);
  const b = new Bytes();
  b.set(0, new Uint8Array([0x7f, 0x45, 0x4c, 0x46, is64 ? 2 : 1, 1, 1]));
  b.u16(16, spec.type ?? 2);
  b.u16(18, spec.machine ?? (is64 ? 62 : 3));
  b.u32(20, 1);
  if (is64) {
    b.u64(24, spec.entry).u64(32, BigInt(ehsize)).u16(52, ehsize).u16(54, phentsize).u16(56, phnum);
  } else {
    b.u32(24, Number(spec.entry)).u32(28, ehsize).u16(40, ehsize).u16(42, phentsize).u16(44, phnum);
  }
  let data = ehsize + phnum * phentsize;
  const writePh = (i: number, type: number, offset: number, vaddr: bigint, paddr: bigint, filesz: number, memsz: bigint, align: bigint): void => {
    const o = ehsize + i * phentsize;
    if (is64) {
      b.u32(o, type).u32(o + 4, 5).u64(o + 8, BigInt(offset)).u64(o + 16, vaddr).u64(o + 24, paddr);
      b.u64(o + 32, BigInt(filesz)).u64(o + 40, memsz).u64(o + 48, align);
    } else {
      b.u32(o, type).u32(o + 4, offset).u32(o + 8, Number(vaddr)).u32(o + 12, Number(paddr));
      b.u32(o + 16, filesz).u32(o + 20, Number(memsz)).u32(o + 24, 5).u32(o + 28, Number(align));
    }
  };
  spec.segments.forEach((s, i) => {
    data = (data + 15) & ~15;
    writePh(i, s.type ?? 1, data, s.vaddr ?? s.paddr, s.paddr, s.data.length, s.memsz ?? BigInt(s.data.length), s.align ?? 16n);
    b.set(data, s.data);
    data += s.data.length;
  });
  if (notes.length > 0) {
    data = (data + 3) & ~3;
    const start = data;
    for (const n of notes) {
      const name = new TextEncoder().encode(`${n.name}\0`);
      b.u32(data, name.length).u32(data + 4, n.desc.length).u32(data + 8, n.type);
      b.set(data + 12, name);
      data += 12 + ((name.length + 3) & ~3);
      b.set(data, n.desc);
      data += (n.desc.length + 3) & ~3;
    }
    b.u8(data - 1, b.bytes[data - 1] ?? 0); // materialise padding
    writePh(spec.segments.length, 4, start, 0n, 0n, data - start, 0n, 4n);
  }
  return b.bytes;
}
