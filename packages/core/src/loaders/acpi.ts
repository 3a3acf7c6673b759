/**
 * Minimal ACPI tables for a firmware-less guest: RSDP (revision 2) → XSDT → MADT. The MADT
 * lists each vCPU's local APIC, KVM's in-kernel I/O APIC (GSI n = ISA IRQ n, KVM's default
 * routing, so no source overrides) and LINT1 as NMI. That is all a kernel needs to run its
 * interrupt controllers in symmetric I/O mode, as it does under QEMU; kernels built without
 * `CONFIG_X86_MPPARSE` (Debian's cloud kernel) read no MP table, only this.
 *
 * There is deliberately no FADT/DSDT: no ACPI hardware (PM timer, SCI, sleep states) is
 * emulated, so a guest's ACPI interpreter finds nothing to load and the kernel falls back to
 * legacy devices (Linux logs that it could not load the tables and disables the interpreter;
 * the APIC configuration it read stays in force).
 * @module
 */
import { InvalidArgumentError } from '../errors.js';
import type { GuestMemory } from '../memory.js';
import { hex } from '../address.js';
import { StructWriter } from './bytes.js';
import { IOAPIC_DEFAULT_ADDRESS, LAPIC_DEFAULT_ADDRESS } from './mptable.js';

/** Default home of the tables: the BIOS area, where a guest may also scan for the RSDP. */
export const ACPI_DEFAULT_ADDRESS = 0xe0000;

/** Options of {@link writeAcpiTables}. */
export interface AcpiOptions {
  /** Number of vCPUs (APIC ids 0..cpus-1). Default 1. */
  readonly cpus?: number;
  /** Guest-physical address of the RSDP (16-byte aligned, below 1 MiB). Default {@link ACPI_DEFAULT_ADDRESS}. */
  readonly address?: number;
}

/** Where {@link writeAcpiTables} put the tables. */
export interface AcpiResult {
  /** RSDP address: hand it to the guest (`loadPvh({ rsdpAddress })`, `loadLinux({ rsdpAddress })`). */
  readonly rsdpAddress: number;
  /** XSDT address. */
  readonly xsdtAddress: number;
  /** MADT address. */
  readonly madtAddress: number;
  /** Bytes used from `address`. */
  readonly size: number;
}

const RSDP_SIZE = 36;
const HEADER = 36;

function checksum(bytes: Uint8Array, start: number, end: number): number {
  let sum = 0;
  for (let i = start; i < end; i++) sum = (sum + (bytes[i] as number)) & 0xff;
  return (0x100 - sum) & 0xff;
}

function ascii(w: StructWriter, o: number, s: string, n: number): void {
  for (let i = 0; i < n; i++) w.u8(o + i, i < s.length ? s.charCodeAt(i) : 0x20);
}

/** Writes a standard SDT header at `o` (checksum filled in later). */
function header(w: StructWriter, o: number, signature: string, length: number, revision: number): void {
  ascii(w, o, signature, 4);
  w.u32(o + 4, length);
  w.u8(o + 8, revision);
  ascii(w, o + 10, 'TSVM', 6);
  ascii(w, o + 16, `TSVM${signature}`, 8);
  w.u32(o + 24, 1);
  ascii(w, o + 28, 'TSVM', 4);
  w.u32(o + 32, 1);
}

/**
 * Writes RSDP, XSDT and MADT into guest memory (validated first, written at once).
 * @throws InvalidArgumentError - bad CPU count, a misaligned address, or tables that would not
 *   fit in RAM below 1 MiB.
 */
export function writeAcpiTables(memory: GuestMemory, options: AcpiOptions = {}): AcpiResult {
  const cpus = options.cpus ?? 1;
  const address = options.address ?? ACPI_DEFAULT_ADDRESS;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 254) throw new InvalidArgumentError('cpus', `must be 1..254, got ${String(cpus)}`);
  if (!Number.isInteger(address) || address < 0 || address % 16 !== 0) throw new InvalidArgumentError('address', `must be a 16-byte aligned address, got ${String(address)}`);
  const xsdtOff = 48; // after the RSDP, 16-aligned
  const xsdtLen = HEADER + 8;
  const madtOff = xsdtOff + 64;
  const madtLen = HEADER + 8 + cpus * 8 + 12 + 6;
  const size = madtOff + madtLen;
  if (address + size > 0x100000) throw new InvalidArgumentError('address', `ACPI tables at ${hex(address)} (${size} bytes) must end below 1 MiB`);
  if (!memory.contains(address, size)) throw new InvalidArgumentError('address', `[${hex(address)}, +${size}) is not guest RAM`);

  const w = new StructWriter(size);
  // MADT
  header(w, madtOff, 'APIC', madtLen, 3);
  w.u32(madtOff + 36, LAPIC_DEFAULT_ADDRESS);
  w.u32(madtOff + 40, 1); // PCAT_COMPAT: a dual 8259 is present (Linux masks it)
  let o = madtOff + 44;
  for (let id = 0; id < cpus; id++, o += 8) {
    w.u8(o, 0); // processor local APIC
    w.u8(o + 1, 8);
    w.u8(o + 2, id); // ACPI processor UID
    w.u8(o + 3, id); // APIC id
    w.u32(o + 4, 1); // enabled
  }
  w.u8(o, 1); // I/O APIC
  w.u8(o + 1, 12);
  w.u8(o + 2, cpus); // I/O APIC id
  w.u32(o + 4, IOAPIC_DEFAULT_ADDRESS);
  w.u32(o + 8, 0); // GSI base
  o += 12;
  w.u8(o, 4); // local APIC NMI
  w.u8(o + 1, 6);
  w.u8(o + 2, 0xff); // all processors
  w.u16(o + 3, 0);
  w.u8(o + 5, 1); // LINT1
  w.u8(madtOff + 9, checksum(w.bytes, madtOff, madtOff + madtLen));
  // XSDT
  header(w, xsdtOff, 'XSDT', xsdtLen, 1);
  w.u64(xsdtOff + HEADER, BigInt(address + madtOff));
  w.u8(xsdtOff + 9, checksum(w.bytes, xsdtOff, xsdtOff + xsdtLen));
  // RSDP (ACPI 2.0): the first 20 bytes and all 36 carry checksums.
  ascii(w, 0, 'RSD PTR ', 8);
  ascii(w, 9, 'TSVM', 6);
  w.u8(15, 2);
  w.u32(16, 0); // no RSDT: revision 2 guests use the XSDT
  w.u32(20, RSDP_SIZE);
  w.u64(24, BigInt(address + xsdtOff));
  w.u8(8, checksum(w.bytes, 0, 20));
  w.u8(32, checksum(w.bytes, 0, RSDP_SIZE));
  memory.write(address, w.bytes);
  return { rsdpAddress: address, xsdtAddress: address + xsdtOff, madtAddress: address + madtOff, size };
}
