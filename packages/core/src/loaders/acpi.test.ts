import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../errors.js';
import { makeMemory } from './fixtures.test-util.js';
import { ACPI_DEFAULT_ADDRESS, writeAcpiTables } from './acpi.js';

const sum = (b: Uint8Array): number => b.reduce((a, x) => (a + x) & 0xff, 0);
const text = (b: Uint8Array, o: number, n: number): string => String.fromCharCode(...b.subarray(o, o + n));

describe('writeAcpiTables', () => {
  it('RSDP → XSDT → MADT, every checksum zero, as an ACPI reader walks them', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    const r = writeAcpiTables(m.memory, { cpus: 2 });
    expect(r.rsdpAddress).toBe(ACPI_DEFAULT_ADDRESS);
    const mem = m.memory.read(0, 0x100000);
    const dv = new DataView(mem.buffer, mem.byteOffset);
    const rsdp = r.rsdpAddress;
    expect(text(mem, rsdp, 8)).toBe('RSD PTR ');
    expect(sum(mem.subarray(rsdp, rsdp + 20))).toBe(0);
    expect(mem[rsdp + 15]).toBe(2);
    expect(dv.getUint32(rsdp + 20, true)).toBe(36);
    expect(sum(mem.subarray(rsdp, rsdp + 36))).toBe(0);
    const xsdt = Number(dv.getBigUint64(rsdp + 24, true));
    expect(xsdt % 8).toBe(0);
    expect(text(mem, xsdt, 4)).toBe('XSDT');
    const xlen = dv.getUint32(xsdt + 4, true);
    expect(sum(mem.subarray(xsdt, xsdt + xlen))).toBe(0);
    expect((xlen - 36) / 8).toBe(1);
    const madt = Number(dv.getBigUint64(xsdt + 36, true));
    expect(text(mem, madt, 4)).toBe('APIC');
    const mlen = dv.getUint32(madt + 4, true);
    expect(sum(mem.subarray(madt, madt + mlen))).toBe(0);
    expect(dv.getUint32(madt + 36, true)).toBe(0xfee00000);
    const entries: number[][] = [];
    for (let o = madt + 44; o < madt + mlen; o += mem[o + 1] as number) entries.push([...mem.subarray(o, o + (mem[o + 1] as number))]);
    expect(entries.map((e) => e[0])).toEqual([0, 0, 1, 4]);
    expect(entries.slice(0, 2).map((e) => [e[2], e[3], e[4]])).toEqual([[0, 0, 1], [1, 1, 1]]);
    const io = entries[2] as number[];
    expect([io[2], io[4]! | (io[5]! << 8) | (io[6]! << 16) | (io[7]! << 24) >>> 0]).toEqual([2, 0xfec00000 | 0]);
    expect(entries[3]).toEqual([4, 6, 0xff, 0, 0, 1]);
  });

  it('rejects bad options and writes nothing', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    for (const o of [{ cpus: 0 }, { cpus: 255 }, { address: 0xe0008 }, { address: 0xfffa0 }]) expect(() => writeAcpiTables(m.memory, o)).toThrow(InvalidArgumentError);
    expect(m.memory.read(ACPI_DEFAULT_ADDRESS, 36).every((b) => b === 0)).toBe(true);
    expect(() => writeAcpiTables(makeMemory(512 * 1024, 0).memory)).toThrow(/not guest RAM/);
  });
});
