/**
 * ACPI fixed hardware behind the port block a FADT from `writeAcpiTables({ power })` points at:
 * PM1a_EVT (PM1_STS, write-1-to-clear, and PM1_EN), PM1a_CNT (SCI_EN, SLP_TYP, SLP_EN) and the
 * 3.579545 MHz PM timer, 32 bits wide (the FADT sets `TMR_VAL_EXT`).
 *
 * Sleep states: SLP_EN written with the S5 type (`ACPI_SLEEP_TYPE.S5`) ends the run with a
 * `poweroff` stop; with the S3 type, with a `suspend` stop, and the machine can be resumed by
 * calling `run()` again — the vCPU continues at the instruction after the write, with
 * PM1_STS.WAK_STS set, as Linux expects when the sleep call "returns" (its `do_suspend_lowlevel`
 * then takes the resume path; ACPICA's `acpi_hw_legacy_sleep` polls WAK_STS). CPU context, RAM
 * and devices are kept: nothing loses power. The stop carries the FACS waking vector (read
 * through `wakingVector`), for a host that would rather re-enter the guest there. SLP_EN with
 * any other type (S0, or one the DSDT does not declare) is ignored, as QEMU does.
 *
 * The timer counts host monotonic time (an injectable nanosecond clock). It is *not*
 * deterministic: two runs read different values. Record/replay needs nothing more, because a
 * timer read is a port read and a recording keeps every value the guest read; a run that must be
 * reproducible without a recording injects a fake clock. A snapshot stores the counter's value
 * and a restore continues counting from it (the time between snapshot and restore is not seen).
 *
 * The SCI is raised (level) while a status bit and its enable bit are both set and SCI_EN is
 * on: today that is the power button ({@link AcpiPm.pressPowerButton}). Timer carries set
 * TMR_STS when the guest looks (the device has no host timer of its own), so TMR_EN never
 * raises the SCI on its own.
 * @module
 */
import {
  type Access, type AccessSize, ACPI_PM_DEFAULT_BASE, ACPI_PM_LAYOUT, ACPI_SLEEP_TYPE,
  type Device, InvalidArgumentError, type IrqLine,
} from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';
import { SnapshotReader } from './snapshot-fields.js';

/** A monotonic clock in nanoseconds (`process.hrtime.bigint` by default). */
export type MonotonicClock = () => bigint;

/** The host's monotonic clock. */
export const hostMonotonicClock: MonotonicClock = () => process.hrtime.bigint();

/** The PM timer's rate in Hz (the ACPI-defined 3.579545 MHz). */
export const PM_TIMER_HZ = 3_579_545;

/** PM1_STS / PM1_EN bits. */
export const Pm1Event = {
  /** Timer carry (bit 31 of the counter changed). */
  TMR: 1 << 0,
  /** Bus master status (never set here). */
  BM: 1 << 4,
  /** Global lock release. */
  GBL: 1 << 5,
  /** Power button pressed. */
  PWRBTN: 1 << 8,
  /** Sleep button pressed (none here). */
  SLPBTN: 1 << 9,
  /** RTC alarm. */
  RTC: 1 << 10,
  /** The platform woke from a sleep state (status only). */
  WAK: 1 << 15,
} as const;

/** PM1_CNT bits. */
export const Pm1Control = {
  /** SCI interrupts enabled; always 1 (no SMI_CMD: the platform is fixed in ACPI mode). */
  SCI_EN: 1 << 0,
  /** Bus master reload. */
  BM_RLD: 1 << 1,
  /** Global lock release (write-only). */
  GBL_RLS: 1 << 2,
  /** Shift of the 3-bit sleep type. */
  SLP_TYP_SHIFT: 10,
  /** Sleep enable (write-only): enter the state SLP_TYP names. */
  SLP_EN: 1 << 13,
} as const;

const STS_MASK = Pm1Event.TMR | Pm1Event.BM | Pm1Event.GBL | Pm1Event.PWRBTN | Pm1Event.SLPBTN | Pm1Event.RTC | Pm1Event.WAK;
const EN_MASK = Pm1Event.TMR | Pm1Event.GBL | Pm1Event.PWRBTN | Pm1Event.SLPBTN | Pm1Event.RTC;
const CNT_STORED = Pm1Control.BM_RLD | (7 << Pm1Control.SLP_TYP_SHIFT);
const NS_PER_S = 1_000_000_000n;
const HZ = BigInt(PM_TIMER_HZ);

/** Options of an {@link AcpiPm}. */
export interface AcpiPmOptions {
  /** Device name. Default `acpi-pm`. */
  readonly name?: string;
  /** Time source of the PM timer. Default {@link hostMonotonicClock}. */
  readonly clock?: MonotonicClock;
  /** The SCI line (IRQ 9 unless the tables say otherwise). Without it, no SCI is raised. */
  readonly sci?: IrqLine;
  /**
   * Reads the FACS firmware waking vector for a `suspend` stop, e.g.
   * `() => BigInt(vm.memory.readUint(acpi.facsAddress + 12, 4))`. Default: none (the stop says 0).
   */
  readonly wakingVector?: () => bigint;
}

/** Guest-visible state of an {@link AcpiPm}. */
export interface AcpiPmState {
  /** Format version. */
  readonly version: 1;
  /** PM1_STS. */
  readonly status: number;
  /** PM1_EN. */
  readonly enable: number;
  /** PM1_CNT (the stored bits). */
  readonly control: number;
  /** The PM timer's full count at snapshot time (ticks since power-on, may exceed 32 bits). */
  readonly ticks: number;
}

/** How often each sleep request happened, for a test or a trace. */
export interface AcpiPmStats {
  /** SLP_EN writes with the S3 type. */
  readonly suspends: number;
  /** SLP_EN writes with the S5 type. */
  readonly poweroffs: number;
  /** SLP_EN writes with a type no state is declared for (ignored). */
  readonly ignoredSleeps: number;
}

/** The ACPI PM1a event/control registers and PM timer. */
export class AcpiPm implements Device {
  /** The first port of the block, as the FADT's default. */
  static readonly defaultPort = ACPI_PM_DEFAULT_BASE;

  /** Device name. */
  readonly name: string;
  readonly #clock: MonotonicClock;
  readonly #sci: IrqLine | undefined;
  readonly #wakingVector: (() => bigint) | undefined;
  #status = 0;
  #enable = 0;
  #control = 0;
  /** Clock reading at which the count was `#ticksAtBase`. */
  #base = 0n;
  #ticksAtBase = 0n;
  /** Carry period (ticks >> 31) the guest was last told about through TMR_STS. */
  #period = 0n;
  #sciLevel = false;
  #stats = { suspends: 0, poweroffs: 0, ignoredSleeps: 0 };

  /** @param options - name, clock, SCI line and waking-vector reader. */
  constructor(options: AcpiPmOptions = {}) {
    if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    if (options.clock !== undefined && typeof options.clock !== 'function') throw new InvalidArgumentError('clock', 'must be a function returning nanoseconds as a bigint');
    if (options.wakingVector !== undefined && typeof options.wakingVector !== 'function') throw new InvalidArgumentError('wakingVector', 'must be a function');
    this.name = options.name ?? 'acpi-pm';
    this.#clock = options.clock ?? hostMonotonicClock;
    this.#sci = options.sci;
    this.#wakingVector = options.wakingVector;
    this.reset();
  }

  /** The mapping at `base` (default {@link ACPI_PM_DEFAULT_BASE}): PM1a_EVT, PM1a_CNT, PM_TMR. */
  mappings(base: number = AcpiPm.defaultPort): DeviceMapping[] {
    return [{ range: { port: base, size: ACPI_PM_LAYOUT.size }, device: this }];
  }

  /** Sleep requests seen so far. */
  get stats(): AcpiPmStats {
    return { ...this.#stats };
  }

  /** The PM timer's current 32-bit value. */
  get timer(): number {
    return Number(this.#ticks() & 0xffff_ffffn);
  }

  /** Presses the fixed-feature power button: PWRBTN_STS, and the SCI if the guest enabled it. */
  pressPowerButton(): void {
    this.#status |= Pm1Event.PWRBTN;
    this.#updateSci();
  }

  /** Reads `size` bytes at `offset`; a timer read samples the clock once for all its bytes. */
  read(offset: number, size: AccessSize, _access?: Access): number {
    let timer: number | undefined;
    let v = 0;
    for (let i = 0; i < size; i++) {
      const o = offset + i;
      let byte: number;
      if (o >= ACPI_PM_LAYOUT.timer && o < ACPI_PM_LAYOUT.timer + 4) {
        timer ??= this.timer;
        byte = (timer >>> (8 * (o - ACPI_PM_LAYOUT.timer))) & 0xff;
      } else {
        byte = (this.#register(o) >>> (8 * (o & 1))) & 0xff;
      }
      v |= byte << (8 * i);
    }
    return v >>> 0;
  }

  /**
   * Writes `size` bytes at `offset`. PM1_STS bits are cleared by writing 1; PM1_EN and PM1_CNT
   * keep their defined bits; the timer is read-only. SLP_EN acts on the SLP_TYP of the same write.
   */
  write(offset: number, value: number, size: AccessSize, access: Access): void {
    // Collect the bytes per 16-bit register first, so SLP_TYP and SLP_EN of one write act together.
    const written = [0, 0, 0]; // byte masks of PM1_STS, PM1_EN, PM1_CNT
    const values = [0, 0, 0];
    for (let i = 0; i < size; i++) {
      const o = offset + i;
      if (o >= ACPI_PM_LAYOUT.pm1Control + 2) continue; // the timer and past it
      const reg = o >> 1;
      const shift = 8 * (o & 1);
      written[reg] = (written[reg] as number) | (0xff << shift);
      values[reg] = (values[reg] as number) | (((value >>> (8 * i)) & 0xff) << shift);
    }
    const [sm, em, cm] = written as [number, number, number];
    const [sv, ev, cv] = values as [number, number, number];
    if (sm) {
      const clear = sv & sm & STS_MASK;
      if (clear & Pm1Event.TMR) this.#period = this.#ticks() >> 31n;
      this.#status &= ~clear;
    }
    if (em) this.#enable = (this.#enable & ~em) | (ev & em & EN_MASK);
    if (sm || em) this.#updateSci();
    if (cm) {
      this.#control = (this.#control & ~(cm & CNT_STORED)) | (cv & cm & CNT_STORED);
      if (cv & cm & Pm1Control.SLP_EN) this.#sleep(access);
    }
  }

  /** Power-on state: nothing pending or enabled, SCI_EN on, the timer counting from 0. */
  reset(): void {
    this.#status = 0;
    this.#enable = 0;
    this.#control = 0;
    this.#base = this.#clock();
    this.#ticksAtBase = 0n;
    this.#period = 0n;
    this.#updateSci();
  }

  /** State as JSON. */
  snapshot(): AcpiPmState {
    this.#refreshTimerStatus();
    return { version: 1, status: this.#status, enable: this.#enable, control: this.#control, ticks: Number(this.#ticks()) };
  }

  /** Restores {@link AcpiPm.snapshot} output (the timer continues from its count); throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    const status = r.int('status', 0, 0xffff);
    const enable = r.int('enable', 0, 0xffff);
    const control = r.int('control', 0, 0xffff);
    const ticks = r.int('ticks', 0, Number.MAX_SAFE_INTEGER);
    this.#status = status & STS_MASK;
    this.#enable = enable & EN_MASK;
    this.#control = control & CNT_STORED;
    this.#base = this.#clock();
    this.#ticksAtBase = BigInt(ticks);
    this.#period = this.#ticksAtBase >> 31n;
    this.#updateSci();
  }

  /** Ticks since power-on (not wrapped). */
  #ticks(): bigint {
    const elapsed = this.#clock() - this.#base;
    return this.#ticksAtBase + (elapsed > 0n ? (elapsed * HZ) / NS_PER_S : 0n);
  }

  #refreshTimerStatus(): void {
    const period = this.#ticks() >> 31n;
    if (period !== this.#period) {
      this.#status |= Pm1Event.TMR;
      this.#period = period;
    }
  }

  /** PM1_STS (offset 0), PM1_EN (2) or PM1_CNT (4) containing byte `o`. */
  #register(o: number): number {
    switch (o >> 1) {
      case 0:
        this.#refreshTimerStatus();
        return this.#status;
      case 1: return this.#enable;
      default: return this.#control | Pm1Control.SCI_EN;
    }
  }

  #sleep(access: Access): void {
    const typ = (this.#control >> Pm1Control.SLP_TYP_SHIFT) & 7;
    if (typ === ACPI_SLEEP_TYPE.S5) {
      this.#stats.poweroffs++;
      access.requestStop({ reason: 'poweroff' });
    } else if (typ === ACPI_SLEEP_TYPE.S3) {
      this.#stats.suspends++;
      this.#status |= Pm1Event.WAK; // what the guest finds when it runs again
      access.requestStop({ reason: 'suspend', wakingVector: this.#wakingVector?.() ?? 0n });
    } else {
      this.#stats.ignoredSleeps++;
    }
  }

  #updateSci(): void {
    const level = (this.#status & this.#enable & EN_MASK) !== 0;
    if (level === this.#sciLevel) return;
    this.#sciLevel = level;
    this.#sci?.set(level);
  }
}
