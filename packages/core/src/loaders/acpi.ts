/**
 * Minimal ACPI tables for a firmware-less guest: RSDP (revision 2) → XSDT → MADT, and with
 * `power` also a FADT (revision 6) → DSDT + FACS. The MADT lists each vCPU's local APIC, KVM's
 * in-kernel I/O APIC (GSI n = ISA IRQ n, KVM's default routing) and LINT1 as NMI. That is all a
 * kernel needs to run its interrupt controllers in symmetric I/O mode, as it does under QEMU;
 * kernels built without `CONFIG_X86_MPPARSE` (Debian's cloud kernel) read no MP table, only this.
 *
 * Without `power` there is no FADT/DSDT: a guest's ACPI interpreter finds nothing to load and
 * the kernel falls back to legacy devices. With `power` the FADT promises ACPI fixed hardware
 * at a port block ({@link ACPI_PM_DEFAULT_BASE}): PM1a event (status/enable), PM1a control
 * (SCI_EN, SLP_TYP, SLP_EN) and a 32-bit PM timer (`TMR_VAL_EXT`) — `AcpiPm` in
 * `@tsvm/devices` implements them and must be attached, or the guest's first access is an
 * `unhandled-exit`. That is why the FADT is opt-in. The DSDT is hand-assembled AML holding only
 * the sleep-type packages `_S0_`, `_S3_` and `_S5_` ({@link ACPI_SLEEP_TYPE}); no SMI command
 * port (the platform is always in ACPI mode, SCI_EN reads 1), no GPE blocks, no reset register.
 * The SCI is ISA IRQ 9, declared level-triggered active-high by an interrupt source override,
 * as QEMU does (KVM's I/O APIC does not invert active-low lines).
 * @module
 */
import { InvalidArgumentError } from '../errors.js';
import type { GuestMemory } from '../memory.js';
import { hex } from '../address.js';
import { StructWriter } from './bytes.js';
import { IOAPIC_DEFAULT_ADDRESS, LAPIC_DEFAULT_ADDRESS } from './mptable.js';

/** Default home of the tables: the BIOS area, where a guest may also scan for the RSDP. */
export const ACPI_DEFAULT_ADDRESS = 0xe0000;

/**
 * Default first port of the ACPI fixed-hardware block (QEMU's PIIX4 uses the same): PM1a_EVT
 * at +0 (4 bytes: status, enable), PM1a_CNT at +4 (2 bytes), PM_TMR at +8 (4 bytes).
 */
export const ACPI_PM_DEFAULT_BASE = 0x600;

/** Offsets inside the fixed-hardware port block and its length. */
export const ACPI_PM_LAYOUT = {
  /** PM1a_STS (2 bytes) followed by PM1a_EN (2 bytes). */
  pm1Event: 0,
  /** PM1a_CNT (2 bytes). */
  pm1Control: 4,
  /** PM_TMR (4 bytes, 32-bit counter). */
  timer: 8,
  /** Ports the block spans. */
  size: 12,
} as const;

/**
 * SLP_TYP values the DSDT's `_Sx_` packages declare (PM1_CNT bits 10–12). The numbers are the
 * state's own (S3 → 3, S5 → 5) so a trace is readable; ACPI lets the platform choose them.
 */
export const ACPI_SLEEP_TYPE = { S0: 0, S3: 3, S5: 5 } as const;

/** The SCI: ISA IRQ 9 (as on a PIIX4), level-triggered active-high. */
export const ACPI_DEFAULT_SCI_IRQ = 9;

/** The ACPI power-management part of {@link writeAcpiTables}: a FADT, DSDT and FACS. */
export interface AcpiPowerOptions {
  /** First port of the fixed-hardware block ({@link ACPI_PM_LAYOUT}). Default {@link ACPI_PM_DEFAULT_BASE}. */
  readonly pmBase?: number;
  /** ISA IRQ of the SCI, 3..15. Default {@link ACPI_DEFAULT_SCI_IRQ}. */
  readonly sciIrq?: number;
}

/** Options of {@link writeAcpiTables}. */
export interface AcpiOptions {
  /** Number of vCPUs (APIC ids 0..cpus-1). Default 1. */
  readonly cpus?: number;
  /** Guest-physical address of the RSDP (16-byte aligned, below 1 MiB). Default {@link ACPI_DEFAULT_ADDRESS}. */
  readonly address?: number;
  /**
   * Also write a FADT (with a DSDT and FACS) describing ACPI fixed hardware: PM timer, PM1
   * event/control registers and the S3/S5 sleep states. `true` takes the defaults. Attach
   * `AcpiPm` from `@tsvm/devices` at the same `pmBase`. Default off.
   */
  readonly power?: boolean | AcpiPowerOptions;
}

/** Where {@link writeAcpiTables} put the tables. */
export interface AcpiResult {
  /** RSDP address: hand it to the guest (`loadPvh({ rsdpAddress })`, `loadLinux({ rsdpAddress })`). */
  readonly rsdpAddress: number;
  /** XSDT address. */
  readonly xsdtAddress: number;
  /** MADT address. */
  readonly madtAddress: number;
  /** FADT address (signature `FACP`), when `power` was asked for. */
  readonly fadtAddress: number | undefined;
  /** DSDT address, when `power` was asked for. */
  readonly dsdtAddress: number | undefined;
  /** FACS address (64-byte aligned; its waking vector is at +12), when `power` was asked for. */
  readonly facsAddress: number | undefined;
  /** The fixed-hardware block the FADT points at, when `power` was asked for. */
  readonly power: { readonly pmBase: number; readonly sciIrq: number } | undefined;
  /** Bytes used from `address`. */
  readonly size: number;
}

const RSDP_SIZE = 36;
const HEADER = 36;
/** FADT revision 6 (ACPI 6.0+): 276 bytes, the last field the hypervisor vendor id. */
const FADT_REVISION = 6;
const FADT_SIZE = 276;
const FACS_SIZE = 64;
/** FADT flags: WBINVD (0), PROC_C1 (2), SLP_BUTTON (5: no fixed sleep button), TMR_VAL_EXT (8: 32-bit PM timer). */
const FADT_FLAGS = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 8);
/** IAPC_BOOT_ARCH: LEGACY_DEVICES (0), 8042 (1), VGA not present (2). */
const IAPC_BOOT_ARCH = (1 << 0) | (1 << 1) | (1 << 2);
/** Offset of the century register in CMOS, as the RTC device implements it. */
const CMOS_CENTURY = 0x32;

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

/** A Generic Address Structure for a port range: space 1 (system I/O), `bits` wide, `access` size code. */
function gasIo(w: StructWriter, o: number, port: number, bits: number, access: number): void {
  w.u8(o, 1);
  w.u8(o + 1, bits);
  w.u8(o + 2, 0);
  w.u8(o + 3, access);
  w.u64(o + 4, BigInt(port));
}

/** AML for an integer: ZeroOp/OneOp, or BytePrefix + byte (every value here is below 256). */
function amlInteger(v: number): number[] {
  return v === 0 ? [0x00] : v === 1 ? [0x01] : [0x0a, v];
}

/** `Name(<name>, Package() { a, b, 0, 0 })`: the `_Sx_` shape (SLP_TYPa, SLP_TYPb, reserved, reserved). */
function amlSleepPackage(name: string, typ: number): number[] {
  const elements = [...amlInteger(typ), ...amlInteger(typ), 0x00, 0x00];
  const body = [4, ...elements]; // NumElements, then the elements
  // PkgLength counts itself; one byte (bits 7-6 = 0) encodes up to 63.
  return [0x08, ...Array.from(name, (c) => c.charCodeAt(0)), 0x12, body.length + 1, ...body];
}

/** The DSDT's AML: the sleep-type packages of the states the platform offers. */
export function sleepStatesAml(): Uint8Array {
  return Uint8Array.from([
    ...amlSleepPackage('_S0_', ACPI_SLEEP_TYPE.S0),
    ...amlSleepPackage('_S3_', ACPI_SLEEP_TYPE.S3),
    ...amlSleepPackage('_S5_', ACPI_SLEEP_TYPE.S5),
  ]);
}

function powerOptions(p: AcpiOptions['power']): { pmBase: number; sciIrq: number } | undefined {
  if (p === undefined || p === false) return undefined;
  if (p !== true && (p === null || typeof p !== 'object')) throw new InvalidArgumentError('power', `must be a boolean or an object, got ${String(p)}`);
  const o = p === true ? {} : p;
  const pmBase = o.pmBase ?? ACPI_PM_DEFAULT_BASE;
  const sciIrq = o.sciIrq ?? ACPI_DEFAULT_SCI_IRQ;
  if (!Number.isInteger(pmBase) || pmBase < 0 || pmBase + ACPI_PM_LAYOUT.size > 0x10000) throw new InvalidArgumentError('power.pmBase', `must be a port with ${ACPI_PM_LAYOUT.size} ports after it below 0x10000, got ${String(pmBase)}`);
  if (!Number.isInteger(sciIrq) || sciIrq < 3 || sciIrq > 15 || sciIrq === 8) throw new InvalidArgumentError('power.sciIrq', `must be an ISA IRQ in 3..15 other than 8 (the RTC), got ${String(sciIrq)}`);
  return { pmBase, sciIrq };
}

const align = (v: number, a: number): number => Math.ceil(v / a) * a;

/**
 * Writes RSDP, XSDT and MADT (and with `power` a FADT, DSDT and FACS) into guest memory
 * (validated first, written at once).
 * @throws InvalidArgumentError - bad CPU count or power options, a misaligned address, or
 *   tables that would not fit in RAM below 1 MiB.
 */
export function writeAcpiTables(memory: GuestMemory, options: AcpiOptions = {}): AcpiResult {
  const cpus = options.cpus ?? 1;
  const address = options.address ?? ACPI_DEFAULT_ADDRESS;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 254) throw new InvalidArgumentError('cpus', `must be 1..254, got ${String(cpus)}`);
  if (!Number.isInteger(address) || address < 0 || address % 16 !== 0) throw new InvalidArgumentError('address', `must be a 16-byte aligned address, got ${String(address)}`);
  const power = powerOptions(options.power);
  const aml = power ? sleepStatesAml() : undefined;
  const xsdtOff = 48; // after the RSDP, 16-aligned
  const xsdtLen = HEADER + 8 * (power ? 2 : 1);
  const madtOff = xsdtOff + 64;
  const madtLen = HEADER + 8 + cpus * 8 + 12 + 6 + (power ? 10 : 0);
  const fadtOff = align(madtOff + madtLen, 8);
  const dsdtOff = fadtOff + FADT_SIZE;
  const dsdtLen = HEADER + (aml?.length ?? 0);
  const facsOff = align(dsdtOff + dsdtLen, 64); // FACS must be 64-byte aligned
  const size = power ? facsOff + FACS_SIZE : madtOff + madtLen;
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
  o += 6;
  if (power) {
    // Without it Linux defaults the SCI to level, active-low, which KVM's I/O APIC would see
    // as always asserted.
    w.u8(o, 2); // interrupt source override
    w.u8(o + 1, 10);
    w.u8(o + 2, 0); // ISA
    w.u8(o + 3, power.sciIrq);
    w.u32(o + 4, power.sciIrq); // GSI = IRQ (KVM's routing)
    w.u16(o + 8, 0x0d); // polarity 01 (active high), trigger 11 (level)
  }
  w.u8(madtOff + 9, checksum(w.bytes, madtOff, madtOff + madtLen));
  if (power && aml) writePower(w, address, power, aml, { fadtOff, dsdtOff, dsdtLen, facsOff });
  // XSDT
  header(w, xsdtOff, 'XSDT', xsdtLen, 1);
  w.u64(xsdtOff + HEADER, BigInt(address + madtOff));
  if (power) w.u64(xsdtOff + HEADER + 8, BigInt(address + fadtOff));
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
  return {
    rsdpAddress: address, xsdtAddress: address + xsdtOff, madtAddress: address + madtOff,
    fadtAddress: power ? address + fadtOff : undefined,
    dsdtAddress: power ? address + dsdtOff : undefined,
    facsAddress: power ? address + facsOff : undefined,
    power,
    size,
  };
}

/** FADT (offsets as in ACPI 6.x table 5.9), DSDT and FACS. */
function writePower(
  w: StructWriter, address: number, power: { pmBase: number; sciIrq: number }, aml: Uint8Array,
  at: { fadtOff: number; dsdtOff: number; dsdtLen: number; facsOff: number },
): void {
  const { fadtOff: f, dsdtOff, dsdtLen, facsOff } = at;
  const evt = power.pmBase + ACPI_PM_LAYOUT.pm1Event;
  const cnt = power.pmBase + ACPI_PM_LAYOUT.pm1Control;
  const tmr = power.pmBase + ACPI_PM_LAYOUT.timer;
  // DSDT
  header(w, dsdtOff, 'DSDT', dsdtLen, 2); // revision 2: 64-bit AML integers
  w.set(dsdtOff + HEADER, aml);
  w.u8(dsdtOff + 9, checksum(w.bytes, dsdtOff, dsdtOff + dsdtLen));
  // FACS: no checksum; the waking vector (+12, +24) stays 0 until the guest writes it.
  ascii(w, facsOff, 'FACS', 4);
  w.u32(facsOff + 4, FACS_SIZE);
  w.u8(facsOff + 32, 2); // version
  // FADT
  header(w, f, 'FACP', FADT_SIZE, FADT_REVISION);
  w.u32(f + 36, address + facsOff); // FIRMWARE_CTRL
  w.u32(f + 40, address + dsdtOff); // DSDT
  w.u8(f + 45, 0); // preferred PM profile: unspecified
  w.u16(f + 46, power.sciIrq); // SCI_INT
  w.u32(f + 48, 0); // SMI_CMD 0: always in ACPI mode
  w.u32(f + 56, evt); // PM1a_EVT_BLK
  w.u32(f + 64, cnt); // PM1a_CNT_BLK
  w.u32(f + 76, tmr); // PM_TMR_BLK
  w.u8(f + 88, 4); // PM1_EVT_LEN
  w.u8(f + 89, 2); // PM1_CNT_LEN
  w.u8(f + 91, 4); // PM_TMR_LEN
  w.u16(f + 96, 101); // P_LVL2_LAT > 100: C2 not supported
  w.u16(f + 98, 1001); // P_LVL3_LAT > 1000: C3 not supported
  w.u8(f + 108, CMOS_CENTURY); // CENTURY
  w.u16(f + 109, IAPC_BOOT_ARCH);
  w.u32(f + 112, FADT_FLAGS);
  w.u8(f + 131, 0); // FADT minor version
  w.u64(f + 132, BigInt(address + facsOff)); // X_FIRMWARE_CTRL (the same as FIRMWARE_CTRL)
  w.u64(f + 140, BigInt(address + dsdtOff)); // X_DSDT
  gasIo(w, f + 148, evt, 32, 2); // X_PM1a_EVT_BLK: word accesses (status, enable)
  gasIo(w, f + 172, cnt, 16, 2); // X_PM1a_CNT_BLK
  gasIo(w, f + 208, tmr, 32, 3); // X_PM_TMR_BLK: dword
  ascii(w, f + 268, 'TSVM', 8); // hypervisor vendor identity
  w.u8(f + 9, checksum(w.bytes, f, f + FADT_SIZE));
}
