import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../errors.js';
import { makeMemory } from './fixtures.test-util.js';
import { IOAPIC_DEFAULT_ADDRESS, MPTABLE_DEFAULT_ADDRESS, mpTableSize, writeMpTable } from './mptable.js';

const sum = (b: Uint8Array): number => b.reduce((a, x) => (a + x) & 0xff, 0);

/** Parses the table the way a guest does (Linux's mpparse.c checks): signatures, lengths, checksums, entries. */
function parse(mem: Uint8Array, at: number) {
  const dv = new DataView(mem.buffer, mem.byteOffset);
  const text = (o: number, n: number) => String.fromCharCode(...mem.subarray(o, o + n));
  expect(text(at, 4)).toBe('_MP_');
  expect(sum(mem.subarray(at, at + 16))).toBe(0);
  expect(mem[at + 8]).toBe(1);
  expect(mem[at + 9]).toBe(4);
  const cfg = dv.getUint32(at + 4, true);
  expect(text(cfg, 4)).toBe('PCMP');
  const len = dv.getUint16(cfg + 4, true);
  expect(sum(mem.subarray(cfg, cfg + len))).toBe(0);
  expect(dv.getUint32(cfg + 36, true)).toBe(0xfee00000);
  const count = dv.getUint16(cfg + 34, true);
  const entries: Array<{ type: number; bytes: Uint8Array }> = [];
  let o = cfg + 44;
  for (let i = 0; i < count; i++) {
    const type = mem[o] as number;
    const size = type === 0 ? 20 : 8;
    entries.push({ type, bytes: mem.subarray(o, o + size) });
    o += size;
  }
  expect(o).toBe(cfg + len);
  return { entries, dv };
}

describe('writeMpTable', () => {
  it('builds a table a guest accepts: checksums, one CPU (BSP), ISA bus, I/O APIC, IRQ n → pin n, LINT0/1', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    const r = writeMpTable(m.memory);
    expect(r).toEqual({ address: MPTABLE_DEFAULT_ADDRESS, size: mpTableSize(), ioapicId: 1 });
    const bytes = m.memory.read(0, 0x100000);
    const { entries } = parse(bytes, r.address);
    const byType = (t: number) => entries.filter((e) => e.type === t);
    expect(byType(0).map((e) => [e.bytes[1], e.bytes[3]])).toEqual([[0, 3]]);
    expect(String.fromCharCode(...(byType(1)[0]?.bytes.subarray(2, 8) ?? []))).toBe('ISA   ');
    const io = byType(2)[0]?.bytes;
    expect(io && new DataView(io.buffer, io.byteOffset).getUint32(4, true)).toBe(IOAPIC_DEFAULT_ADDRESS);
    expect(byType(3).map((e) => [e.bytes[5], e.bytes[6], e.bytes[7]])).toEqual(Array.from({ length: 24 }, (_, i) => [i, 1, i]));
    expect(byType(4).map((e) => [e.bytes[1], e.bytes[7]])).toEqual([[3, 0], [1, 1]]);
  });

  it('lists every vCPU, only the first as bootstrap processor, and puts the I/O APIC id after them', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    const r = writeMpTable(m.memory, { cpus: 4, address: 0xf0000 });
    const { entries } = parse(m.memory.read(0, 0x100000), 0xf0000);
    expect(entries.filter((e) => e.type === 0).map((e) => [e.bytes[1], e.bytes[3]])).toEqual([[0, 3], [1, 1], [2, 1], [3, 1]]);
    expect(r.ioapicId).toBe(4);
  });

  it('rejects bad options before writing anything', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    for (const o of [{ cpus: 0 }, { cpus: 1.5 }, { cpus: 300 }, { address: 0x9fc01 }, { address: 0xfffe0 }, { ioapicPins: 8 }]) {
      expect(() => writeMpTable(m.memory, o)).toThrow(InvalidArgumentError);
    }
    expect(m.memory.read(0x9fc00, 16).every((b) => b === 0)).toBe(true);
    const small = makeMemory(512 * 1024, 0);
    expect(() => writeMpTable(small.memory)).toThrow(/not guest RAM/);
  });
});
