/**
 * The MC146818 CMOS real-time clock behind ports 0x70 (index) and 0x71 (data). Time is read
 * from an injectable clock (UTC fields), formatted as BCD or binary and 12 h or 24 h per
 * status register B. A guest that sets the time moves an offset against the clock, so
 * `fixedClock` stays deterministic.
 *
 * The once-per-second update cycle is modelled as on the chip, from the clock alone (no host
 * timer runs unless an update interrupt is wanted): status A's UIP bit reads 1 during the
 * {@link RTC_UIP_WINDOW_NS} (244 µs, 8 cycles of the 32.768 kHz base) before each second
 * boundary — the time registers still hold the old second then, and change at the boundary —
 * and status C's UF flag is set at each update's end and cleared by reading C. With UIE (status
 * B bit 4) also set, IRQF is set and, given an `irq` line, IRQ 8 is asserted until C is read;
 * a host timer (unref'd) fires at each second boundary only while UIE is on. No update runs,
 * and UIP stays 0, while SET is on or the divider (status A bits 6–4) is not the normal 010.
 * The default clock has nanosecond resolution (host wall time when the device was made, moved
 * on by the monotonic clock), so a guest polling UIP sees the edge; a `Clock` of `Date`s has
 * millisecond resolution, in which the 244 µs window never comes (`fixedClock` never moves at
 * all): use `preciseClock` to drive the window by hand. Not emulated: alarm and periodic
 * interrupts (AF, PF stay 0).
 * @module
 */
import type { Access, AccessSize, Device, IrqLine } from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';
import { encodeBytes, SnapshotReader } from './snapshot-fields.js';

/** A source of wall-clock time. */
export type Clock = () => Date;

/** The host's clock. */
export const hostClock: Clock = () => new Date();

/** A clock that always returns `date` (copied), for deterministic runs. */
export function fixedClock(date: Date): Clock {
  const t = date.getTime();
  return () => new Date(t);
}

/** Wall-clock time in nanoseconds since the Unix epoch. */
export type PreciseClock = () => bigint;

/**
 * A nanosecond wall clock for the host: `Date.now()` sampled once, moved on by
 * `process.hrtime` (monotonic, so it ignores later steps of the host's clock).
 */
export function hostPreciseClock(): PreciseClock {
  const anchorNs = BigInt(Date.now()) * 1_000_000n;
  const anchorHr = process.hrtime.bigint();
  return () => anchorNs + (process.hrtime.bigint() - anchorHr);
}

/** How long before each second boundary UIP reads 1: 8 periods of 32.768 kHz (244.140625 µs). */
export const RTC_UIP_WINDOW_NS = 244_141n;
const NS_PER_S = 1_000_000_000n;
/** Floor division and its non-negative remainder (a guest may set a date before 1970). */
const floorDiv = (a: bigint, b: bigint): bigint => (a >= 0n ? a / b : -((-a + b - 1n) / b));
const floorMod = (a: bigint, b: bigint): bigint => a - floorDiv(a, b) * b;

const REG_SECONDS = 0x00;
const REG_MINUTES = 0x02;
const REG_HOURS = 0x04;
const REG_WEEKDAY = 0x06;
const REG_DAY = 0x07;
const REG_MONTH = 0x08;
const REG_YEAR = 0x09;
const REG_A = 0x0a;
const REG_B = 0x0b;
const REG_C = 0x0c;
const REG_D = 0x0d;
const REG_CENTURY = 0x32;
const A_UIP = 0x80;
const A_DIVIDER = 0x70;
const A_DIVIDER_NORMAL = 0x20;
const B_24H = 0x02;
const B_BINARY = 0x04;
const B_UIE = 0x10;
const B_SET = 0x80;
const C_UF = 0x10;
const C_IRQF = 0x80;
const D_VALID_RAM = 0x80;
const TIME_REGS = new Set([REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY]);

/** Options of a {@link CmosRtc}. */
export interface CmosRtcOptions {
  /** Device name. Default `rtc`. */
  readonly name?: string;
  /** Time source in milliseconds. Default: the host's, at nanosecond resolution ({@link hostPreciseClock}). */
  readonly clock?: Clock;
  /** Time source in nanoseconds; wins over `clock`. Drives the UIP window in tests. */
  readonly preciseClock?: PreciseClock;
  /** IRQ 8, for the update-ended interrupt (UIE). Without it IRQF is set but no line is driven. */
  readonly irq?: IrqLine;
}

/** Guest-visible state of a {@link CmosRtc}. */
export interface CmosRtcState {
  /** Format version. */
  readonly version: 2;
  /** The 128 bytes of CMOS RAM (base64); time registers hold their last written value, C its pending flags. */
  readonly ram: string;
  /** Selected register. */
  readonly index: number;
  /** Whether the guest set the NMI-disable bit (kept, not acted on). */
  readonly nmiDisabled: boolean;
  /** Guest time minus clock time, in milliseconds. */
  readonly offsetMs: number;
  /** The guest second (seconds since the epoch, guest time) whose update was last accounted for. */
  readonly updatedSecond: number;
}

/** CMOS RTC and 114 bytes of battery-backed RAM. */
export class CmosRtc implements Device {
  /** Index port; the data port is the next one. */
  static readonly defaultPort = 0x70;
  /** ISA IRQ of the RTC (raised only for the update-ended interrupt, given an `irq` line). */
  static readonly defaultIrq = 8;

  /** Device name. */
  readonly name: string;
  readonly #ns: PreciseClock;
  readonly #irq: IrqLine | undefined;
  #ram: Uint8Array = new Uint8Array(128);
  #index = 0;
  #nmiDisabled = false;
  #offsetMs = 0;
  /** Guest second (since the epoch) whose end-of-update has been accounted for in register C. */
  #updated = 0n;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #irqLevel = false;

  /** @param options - name, clock and IRQ line. */
  constructor(options: CmosRtcOptions = {}) {
    this.name = options.name ?? 'rtc';
    const ms = options.clock;
    this.#ns = options.preciseClock ?? (ms === undefined || ms === hostClock ? hostPreciseClock() : () => BigInt(ms().getTime()) * 1_000_000n);
    this.#irq = options.irq;
    this.reset();
  }

  /** The two-port mapping at `base` (default 0x70). */
  mappings(base: number = CmosRtc.defaultPort): DeviceMapping[] {
    return [{ range: { port: base, size: 2 }, device: this }];
  }

  /** Whether the guest last wrote the index port with bit 7 (NMI disable) set. */
  get nmiDisabled(): boolean {
    return this.#nmiDisabled;
  }

  /** Offset 0 reads 0xff (write-only on real hardware, as QEMU); offset 1 reads the selected register. */
  read(offset: number, _size: AccessSize, _access?: Access): number {
    if (offset !== 1) return 0xff;
    return this.#readRegister(this.#index);
  }

  /** Offset 0 selects a register (bit 7 is the NMI mask, not part of the index); offset 1 writes it. */
  write(offset: number, value: number, _size: AccessSize, _access?: Access): void {
    const v = value & 0xff;
    if (offset === 0) {
      this.#index = v & 0x7f;
      this.#nmiDisabled = (v & 0x80) !== 0;
    } else if (offset === 1) {
      this.#writeRegister(this.#index, v);
    }
  }

  /** Power-on state: BCD, 24 h, valid RAM; guest time offset and RAM contents cleared. */
  reset(): void {
    this.#ram = new Uint8Array(128);
    this.#ram[REG_A] = 0x26; // 32.768 kHz divider, 1024 Hz rate: what firmware programs
    this.#ram[REG_B] = B_24H;
    this.#ram[REG_D] = D_VALID_RAM;
    this.#index = 0;
    this.#nmiDisabled = false;
    this.#offsetMs = 0;
    this.#updated = floorDiv(this.#guestNs(), NS_PER_S);
    this.#syncIrq();
  }

  /**
   * Accounts for the updates the clock has passed since the last look: sets UF (and IRQF with
   * UIE, asserting IRQ 8) in status C. Guest accesses do this themselves; the update timer calls
   * it at each second boundary while UIE is on. Returns whether an update had ended.
   */
  poll(): boolean {
    const second = floorDiv(this.#guestNs(), NS_PER_S);
    if (second <= this.#updated) return false;
    this.#updated = second;
    if (!this.#updating()) return false;
    const b = this.#ram[REG_B] as number;
    this.#ram[REG_C] = (this.#ram[REG_C] as number) | C_UF | (b & B_UIE ? C_IRQF : 0);
    this.#syncIrq();
    return true;
  }

  /** Stops the update timer. */
  close(): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** State as JSON. */
  snapshot(): CmosRtcState {
    this.poll();
    return { version: 2, ram: encodeBytes(this.#ram), index: this.#index, nmiDisabled: this.#nmiDisabled, offsetMs: this.#offsetMs, updatedSecond: Number(this.#updated) };
  }

  /** Restores {@link CmosRtc.snapshot} output; throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void {
    // Version 1 (before the update cycle) had no update second: it counts as updated now.
    const v1 = typeof state === 'object' && state !== null && (state as { version?: unknown }).version === 1;
    const r = new SnapshotReader(this.name, state, v1 ? 1 : 2);
    const ram = r.bytes('ram', 128, 128);
    const index = r.int('index', 0, 0x7f);
    const nmi = r.bool('nmiDisabled');
    const offset = r.int('offsetMs', -Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
    const updated = v1 ? undefined : r.int('updatedSecond', -Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
    this.#ram = ram;
    this.#index = index;
    this.#nmiDisabled = nmi;
    this.#offsetMs = offset;
    this.#updated = updated === undefined ? floorDiv(this.#guestNs(), NS_PER_S) : BigInt(updated);
    this.#syncIrq();
  }

  #guestNs(): bigint {
    return this.#ns() + BigInt(this.#offsetMs) * 1_000_000n;
  }

  #now(): Date {
    return new Date(Number(floorDiv(this.#guestNs(), 1_000_000n)));
  }

  /** Whether the chip runs its update cycle: divider in normal operation and SET off. */
  #updating(): boolean {
    return ((this.#ram[REG_A] as number) & A_DIVIDER) === A_DIVIDER_NORMAL && !((this.#ram[REG_B] as number) & B_SET);
  }

  /** IRQ 8 follows IRQF; the update timer runs only while UIE is on and an IRQ line exists. */
  #syncIrq(): void {
    const level = ((this.#ram[REG_C] as number) & C_IRQF) !== 0;
    if (level !== this.#irqLevel) {
      this.#irqLevel = level;
      this.#irq?.set(level);
    }
    const want = this.#irq !== undefined && ((this.#ram[REG_B] as number) & B_UIE) !== 0;
    if (!want) {
      this.close();
    } else if (this.#timer === undefined) {
      this.#arm();
    }
  }

  #arm(): void {
    const left = NS_PER_S - floorMod(this.#guestNs(), NS_PER_S);
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.poll();
      if (this.#timer === undefined) this.#syncIrq(); // re-arms while UIE stays on
    }, Math.max(1, Math.ceil(Number(left) / 1e6)));
    this.#timer.unref?.();
  }

  #readRegister(index: number): number {
    this.poll();
    if (index === REG_C) {
      const c = this.#ram[REG_C] as number;
      this.#ram[REG_C] = 0; // reading clears the flags and releases IRQ 8
      if (c) this.#syncIrq();
      return c;
    }
    if (index === REG_A) {
      const a = (this.#ram[REG_A] as number) & 0x7f;
      const inWindow = NS_PER_S - floorMod(this.#guestNs(), NS_PER_S) <= RTC_UIP_WINDOW_NS;
      return inWindow && this.#updating() ? a | A_UIP : a;
    }
    if (!TIME_REGS.has(index)) return this.#ram[index] ?? 0xff;
    // While SET is on, the guest sees what it wrote, not a clock that moves under it.
    if ((this.#ram[REG_B] as number) & B_SET) return this.#ram[index] ?? 0;
    return this.#encode(index, this.#fieldOf(this.#now(), index));
  }

  #writeRegister(index: number, v: number): void {
    if (index === REG_C || index === REG_D) return; // read-only
    this.poll(); // updates before this write happened under the old settings
    if (index === REG_A) {
      this.#ram[REG_A] = v & 0x7f;
      return;
    }
    if (index === REG_B) {
      const wasSet = ((this.#ram[REG_B] as number) & B_SET) !== 0;
      if (!wasSet && v & B_SET) this.#latchTime(v);
      this.#ram[REG_B] = v;
      if (wasSet && !(v & B_SET)) this.#commitTime();
      this.#syncIrq();
      return;
    }
    if (!TIME_REGS.has(index)) {
      this.#ram[index] = v;
      return;
    }
    this.#ram[index] = v;
    // Without SET the write takes effect at once (the chip would apply it at the next update).
    if (!((this.#ram[REG_B] as number) & B_SET)) this.#commitTime(true, index);
  }

  /** Copies the current time into the RAM bytes so a SET-mode guest edits from "now". */
  #latchTime(newB: number): void {
    const now = this.#now();
    const saveB = this.#ram[REG_B] as number;
    this.#ram[REG_B] = newB & ~B_SET;
    for (const reg of TIME_REGS) this.#ram[reg] = this.#encode(reg, this.#fieldOf(now, reg));
    this.#ram[REG_B] = saveB;
  }

  /**
   * Recomputes the guest-time offset from the time registers. With `single`, only `index` comes
   * from RAM and the other fields from the running clock.
   */
  #commitTime(single = false, index = -1): void {
    const now = this.#now();
    const field = (reg: number): number =>
      !single || reg === index ? this.#decode(reg, this.#ram[reg] as number) : this.#fieldOf(now, reg);
    const year = field(REG_CENTURY) * 100 + field(REG_YEAR);
    const ms = Date.UTC(year, field(REG_MONTH) - 1, field(REG_DAY), field(REG_HOURS), field(REG_MINUTES), field(REG_SECONDS));
    if (Number.isFinite(ms)) {
      this.#offsetMs = ms + now.getUTCMilliseconds() - Number(floorDiv(this.#ns(), 1_000_000n));
      // A new time is not an update: the next one is at the next boundary of the new time.
      this.#updated = floorDiv(this.#guestNs(), NS_PER_S);
    }
  }

  #fieldOf(d: Date, reg: number): number {
    switch (reg) {
      case REG_SECONDS: return d.getUTCSeconds();
      case REG_MINUTES: return d.getUTCMinutes();
      case REG_HOURS: return d.getUTCHours();
      case REG_WEEKDAY: return d.getUTCDay() + 1; // 1 = Sunday
      case REG_DAY: return d.getUTCDate();
      case REG_MONTH: return d.getUTCMonth() + 1;
      case REG_YEAR: return d.getUTCFullYear() % 100;
      default: return Math.floor(d.getUTCFullYear() / 100) % 100; // century
    }
  }

  #encode(reg: number, value: number): number {
    const b = this.#ram[REG_B] as number;
    let v = value;
    let pm = 0;
    if (reg === REG_HOURS && !(b & B_24H)) {
      pm = v >= 12 ? 0x80 : 0;
      v = v % 12 === 0 ? 12 : v % 12;
    }
    const enc = b & B_BINARY ? v : toBcd(v);
    return enc | pm;
  }

  #decode(reg: number, raw: number): number {
    const b = this.#ram[REG_B] as number;
    if (reg === REG_HOURS && !(b & B_24H)) {
      const pm = (raw & 0x80) !== 0;
      const h = b & B_BINARY ? raw & 0x7f : fromBcd(raw & 0x7f);
      return (h % 12) + (pm ? 12 : 0);
    }
    return b & B_BINARY ? raw : fromBcd(raw);
  }
}

function toBcd(v: number): number {
  return ((Math.floor(v / 10) % 10) << 4) | (v % 10);
}

function fromBcd(v: number): number {
  return (v >> 4) * 10 + (v & 0x0f);
}
