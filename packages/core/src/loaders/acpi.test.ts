import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../errors.js';
import { makeMemory } from './fixtures.test-util.js';
import { ACPI_DEFAULT_ADDRESS, ACPI_PM_DEFAULT_BASE, ACPI_SLEEP_TYPE, writeAcpiTables } from './acpi.js';

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

  it('with power: XSDT → FADT (rev 6, 276 bytes) → DSDT and FACS, every checksum zero, ports where the FADT says', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    const r = writeAcpiTables(m.memory, { cpus: 1, power: true });
    const mem = m.memory.read(0, 0x100000);
    const dv = new DataView(mem.buffer, mem.byteOffset);
    const xsdt = r.xsdtAddress;
    const xlen = dv.getUint32(xsdt + 4, true);
    expect(sum(mem.subarray(xsdt, xsdt + xlen))).toBe(0);
    const tables = [0, 1].map((i) => Number(dv.getBigUint64(xsdt + 36 + 8 * i, true)));
    expect((xlen - 36) / 8).toBe(2);
    expect(tables.map((t) => text(mem, t, 4))).toEqual(['APIC', 'FACP']);
    const f = tables[1] as number;
    expect(f).toBe(r.fadtAddress);
    expect(dv.getUint32(f + 4, true)).toBe(276);
    expect(mem[f + 8]).toBe(6);
    expect(sum(mem.subarray(f, f + 276))).toBe(0);
    // 32-bit and 64-bit pointers agree (ACPICA warns and prefers X_ when they differ).
    expect(dv.getUint32(f + 36, true)).toBe(r.facsAddress);
    expect(Number(dv.getBigUint64(f + 132, true))).toBe(r.facsAddress);
    expect(dv.getUint32(f + 40, true)).toBe(r.dsdtAddress);
    expect(Number(dv.getBigUint64(f + 140, true))).toBe(r.dsdtAddress);
    expect(dv.getUint16(f + 46, true)).toBe(9);
    expect(dv.getUint32(f + 48, true)).toBe(0); // no SMI_CMD: always ACPI mode
    const base = ACPI_PM_DEFAULT_BASE;
    expect([dv.getUint32(f + 56, true), dv.getUint32(f + 64, true), dv.getUint32(f + 76, true)]).toEqual([base, base + 4, base + 8]);
    expect([mem[f + 88], mem[f + 89], mem[f + 91]]).toEqual([4, 2, 4]);
    const gas = (o: number) => ({ space: mem[o], bits: mem[o + 1], access: mem[o + 3], address: Number(dv.getBigUint64(o + 4, true)) });
    expect(gas(f + 148)).toEqual({ space: 1, bits: 32, access: 2, address: base });
    expect(gas(f + 172)).toEqual({ space: 1, bits: 16, access: 2, address: base + 4 });
    expect(gas(f + 208)).toEqual({ space: 1, bits: 32, access: 3, address: base + 8 });
    const flags = dv.getUint32(f + 112, true);
    expect(flags & (1 << 8)).not.toBe(0); // TMR_VAL_EXT: the timer is 32 bits
    expect(flags & (1 << 20)).toBe(0); // not hardware-reduced
    expect(mem[f + 108]).toBe(0x32); // CMOS century register
    // FACS: 64-byte aligned, no checksum.
    const facs = r.facsAddress as number;
    expect(facs % 64).toBe(0);
    expect(text(mem, facs, 4)).toBe('FACS');
    expect(dv.getUint32(facs + 4, true)).toBe(64);
    // DSDT: header checksum, then AML parsed back.
    const d = r.dsdtAddress as number;
    expect(text(mem, d, 4)).toBe('DSDT');
    const dlen = dv.getUint32(d + 4, true);
    expect(sum(mem.subarray(d, d + dlen))).toBe(0);
    expect(parseSleepPackages(mem.subarray(d + 36, d + dlen))).toEqual({ _S0_: [0, 0, 0, 0], _S3_: [ACPI_SLEEP_TYPE.S3, ACPI_SLEEP_TYPE.S3, 0, 0], _S5_: [ACPI_SLEEP_TYPE.S5, ACPI_SLEEP_TYPE.S5, 0, 0] });
    // MADT gains the SCI's interrupt source override: IRQ 9 → GSI 9, level, active high.
    const madt = r.madtAddress;
    const mlen = dv.getUint32(madt + 4, true);
    expect(sum(mem.subarray(madt, madt + mlen))).toBe(0);
    const iso: number[][] = [];
    for (let o = madt + 44; o < madt + mlen; o += mem[o + 1] as number) if (mem[o] === 2) iso.push([mem[o + 3] as number, dv.getUint32(o + 4, true), dv.getUint16(o + 8, true)]);
    expect(iso).toEqual([[9, 9, 0x0d]]);
    expect(r.size).toBe(facs + 64 - r.rsdpAddress);
  });

  it('rejects bad power options', () => {
    const m = makeMemory(2 * 1024 * 1024, 0);
    for (const power of [{ pmBase: 0xfffa }, { pmBase: -1 }, { sciIrq: 8 }, { sciIrq: 16 }, 'yes']) {
      expect(() => writeAcpiTables(m.memory, { power: power as never })).toThrow(InvalidArgumentError);
    }
    const r = writeAcpiTables(m.memory, { power: { pmBase: 0xb000, sciIrq: 10 } });
    expect(r.power).toEqual({ pmBase: 0xb000, sciIrq: 10 });
    expect(writeAcpiTables(m.memory).fadtAddress).toBeUndefined();
  });
});

/**
 * A reader for the only AML forms the DSDT should hold: `NameOp NameSeg PackageOp PkgLength
 * NumElements {ZeroOp | OneOp | BytePrefix b}*`. Anything else fails the test.
 */
function parseSleepPackages(aml: Uint8Array): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  let i = 0;
  const at = (k: number): number => {
    const v = aml[k];
    if (v === undefined) throw new Error(`AML ends at ${k}`);
    return v;
  };
  while (i < aml.length) {
    expect(at(i)).toBe(0x08); // NameOp
    const name = String.fromCharCode(...aml.subarray(i + 1, i + 5));
    expect(at(i + 5)).toBe(0x12); // PackageOp
    const lead = at(i + 6);
    expect(lead >> 6).toBe(0); // one-byte PkgLength
    const end = i + 6 + lead;
    const n = at(i + 7);
    const values: number[] = [];
    let k = i + 8;
    while (k < end) {
      const op = at(k);
      if (op === 0x00 || op === 0x01) { values.push(op); k += 1; } else if (op === 0x0a) { values.push(at(k + 1)); k += 2; } else throw new Error(`unexpected AML opcode 0x${op.toString(16)} at ${k}`);
    }
    expect(k).toBe(end);
    expect(values.length).toBe(n);
    out[name] = values;
    i = end;
  }
  return out;
}
