/**
 * The Intel MultiProcessor Specification 1.4 table: how a firmware-less VMM tells a guest
 * about its CPUs, its I/O APIC and how ISA interrupts reach it, without ACPI. Linux finds it by
 * scanning the last KiB of base memory (0x9fc00) among other places; with it, Linux runs the
 * in-kernel I/O APIC in *symmetric I/O mode* (as it does under QEMU's ACPI tables) instead of
 * the fragile "virtual wire with no configuration" fallback.
 *
 * Layout: a 16-byte floating pointer (`_MP_`), then the configuration table (`PCMP` header,
 * one processor entry per vCPU, one ISA bus, one I/O APIC, an I/O interrupt entry per
 * I/O APIC pin with ISA IRQ n → pin n — KVM's default GSI routing — and the two local
 * interrupt entries LINT0 = ExtINT, LINT1 = NMI). Both structures carry byte checksums.
 * @module
 */
import { InvalidArgumentError } from '../errors.js';
import type { GuestMemory } from '../memory.js';
import { hex } from '../address.js';
import { StructWriter } from './bytes.js';

/** Where {@link writeMpTable} puts the table by default: the last KiB of base memory. */
export const MPTABLE_DEFAULT_ADDRESS = 0x9fc00;
/** The I/O APIC's MMIO base (KVM's in-kernel I/O APIC). */
export const IOAPIC_DEFAULT_ADDRESS = 0xfec00000;
/** The local APIC's MMIO base. */
export const LAPIC_DEFAULT_ADDRESS = 0xfee00000;

/** Options of {@link writeMpTable}. */
export interface MpTableOptions {
  /** Number of vCPUs (local APIC ids 0..cpus-1). Default 1. */
  readonly cpus?: number;
  /** Guest-physical address (16-byte aligned, below 1 MiB). Default {@link MPTABLE_DEFAULT_ADDRESS}. */
  readonly address?: number;
  /** I/O APIC pins (= GSIs). Default 24, as KVM's. */
  readonly ioapicPins?: number;
}

/** Where {@link writeMpTable} put the table. */
export interface MpTableResult {
  /** Floating pointer address. */
  readonly address: number;
  /** Total bytes written (floating pointer + configuration table). */
  readonly size: number;
  /** The I/O APIC id used (one above the last CPU's). */
  readonly ioapicId: number;
}

const FPS_SIZE = 16;
const HEADER_SIZE = 44;
const PROC_SIZE = 20;
const BUS_SIZE = 8;
const IOAPIC_SIZE = 8;
const INT_SIZE = 8;
const LINT_SIZE = 8;
/** Room left in base memory below the 640 KiB line is the caller's business; the table is small. */
const MAX_CPUS = 254;

/** Size in bytes of the table {@link writeMpTable} builds for these options. */
export function mpTableSize(options: MpTableOptions = {}): number {
  const cpus = options.cpus ?? 1;
  const pins = options.ioapicPins ?? 24;
  return FPS_SIZE + HEADER_SIZE + cpus * PROC_SIZE + BUS_SIZE + IOAPIC_SIZE + pins * INT_SIZE + 2 * LINT_SIZE;
}

function checksum(bytes: Uint8Array, start: number, end: number): number {
  let sum = 0;
  for (let i = start; i < end; i++) sum = (sum + (bytes[i] as number)) & 0xff;
  return (0x100 - sum) & 0xff;
}

/**
 * Writes an MP table into guest memory (all-or-nothing: validated first).
 * @throws InvalidArgumentError - bad CPU or pin counts, a misaligned address, or a table that
 *   would not fit in RAM below 1 MiB.
 */
export function writeMpTable(memory: GuestMemory, options: MpTableOptions = {}): MpTableResult {
  const cpus = options.cpus ?? 1;
  const pins = options.ioapicPins ?? 24;
  const address = options.address ?? MPTABLE_DEFAULT_ADDRESS;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > MAX_CPUS) throw new InvalidArgumentError('cpus', `must be 1..${MAX_CPUS}, got ${String(cpus)}`);
  if (!Number.isInteger(pins) || pins < 16 || pins > 120) throw new InvalidArgumentError('ioapicPins', `must be 16..120, got ${String(pins)}`);
  if (!Number.isInteger(address) || address < 0 || address % 16 !== 0) throw new InvalidArgumentError('address', `must be a 16-byte aligned address, got ${String(address)}`);
  const size = mpTableSize({ cpus, ioapicPins: pins });
  if (address + size > 0x100000) throw new InvalidArgumentError('address', `an MP table at ${hex(address)} (${size} bytes) must end below 1 MiB`);
  if (!memory.contains(address, size)) throw new InvalidArgumentError('address', `[${hex(address)}, +${size}) is not guest RAM`);

  const w = new StructWriter(size);
  const cfg = FPS_SIZE;
  const ioapicId = cpus;
  const ascii = (o: number, s: string, n: number): void => { for (let i = 0; i < n; i++) w.u8(o + i, i < s.length ? s.charCodeAt(i) : 0x20); };
  // Floating pointer structure.
  ascii(0, '_MP_', 4);
  w.u32(4, address + cfg);
  w.u8(8, 1); // length in 16-byte units
  w.u8(9, 4); // spec revision 1.4
  // 11..15: feature bytes 0 → a configuration table is present; no IMCR.
  // Configuration table.
  let o = cfg + HEADER_SIZE;
  for (let id = 0; id < cpus; id++, o += PROC_SIZE) {
    w.u8(o, 0); // processor
    w.u8(o + 1, id);
    w.u8(o + 2, 0x14); // local APIC version
    w.u8(o + 3, 0x01 | (id === 0 ? 0x02 : 0)); // enabled, bootstrap processor
    w.u32(o + 4, 0x600); // CPU signature: family 6
    w.u32(o + 8, 0x201); // features: FPU, APIC
  }
  w.u8(o, 1); // bus
  w.u8(o + 1, 0);
  ascii(o + 2, 'ISA', 6);
  o += BUS_SIZE;
  w.u8(o, 2); // I/O APIC
  w.u8(o + 1, ioapicId);
  w.u8(o + 2, 0x11);
  w.u8(o + 3, 1); // enabled
  w.u32(o + 4, IOAPIC_DEFAULT_ADDRESS);
  o += IOAPIC_SIZE;
  for (let pin = 0; pin < pins; pin++, o += INT_SIZE) {
    w.u8(o, 3); // I/O interrupt assignment
    w.u8(o + 1, 0); // INT
    w.u16(o + 2, 0); // polarity/trigger: conform to the bus
    w.u8(o + 4, 0); // source bus: ISA
    w.u8(o + 5, pin);
    w.u8(o + 6, ioapicId);
    w.u8(o + 7, pin);
  }
  w.u8(o, 4); // local interrupt: LINT0 = ExtINT (the 8259 in virtual-wire mode)
  w.u8(o + 1, 3);
  w.u8(o + 6, 0xff);
  w.u8(o + 7, 0);
  o += LINT_SIZE;
  w.u8(o, 4); // LINT1 = NMI
  w.u8(o + 1, 1);
  w.u8(o + 6, 0xff);
  w.u8(o + 7, 1);
  o += LINT_SIZE;
  // Header, then the checksums.
  ascii(cfg, 'PCMP', 4);
  w.u16(cfg + 4, size - FPS_SIZE);
  w.u8(cfg + 6, 4);
  ascii(cfg + 8, 'TSVM', 8);
  ascii(cfg + 16, 'TSVM MPTABLE', 12);
  w.u16(cfg + 34, cpus + 1 + 1 + pins + 2);
  w.u32(cfg + 36, LAPIC_DEFAULT_ADDRESS);
  w.u8(cfg + 7, checksum(w.bytes, cfg, size));
  w.u8(10, checksum(w.bytes, 0, FPS_SIZE));
  memory.write(address, w.bytes);
  return { address, size, ioapicId };
}
