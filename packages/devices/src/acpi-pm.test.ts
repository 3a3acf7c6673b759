import { ACPI_SLEEP_TYPE, SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { AcpiPm, PM_TIMER_HZ, Pm1Control, Pm1Event } from './acpi-pm.js';
import { RecordingIrq, recordingAccess } from './testing/fakes.js';

/** A clock the test moves by hand (nanoseconds). */
function fakeClock(start = 1_000_000_000n): { now: bigint; clock: () => bigint } {
  const c = { now: start, clock: () => c.now };
  return c;
}
const STS = 0;
const EN = 2;
const CNT = 4;
const TMR = 8;
const slp = (typ: number): number => (typ << Pm1Control.SLP_TYP_SHIFT) | Pm1Control.SLP_EN;

describe('AcpiPm', () => {
  it('maps 12 ports at 0x600 by default', () => {
    const d = new AcpiPm();
    expect(d.mappings()).toEqual([{ range: { port: 0x600, size: 12 }, device: d }]);
    expect(d.mappings(0xb000)[0]?.range).toEqual({ port: 0xb000, size: 12 });
  });

  it('counts at 3.579545 MHz from the injected clock, 32 bits wide', () => {
    const c = fakeClock();
    const d = new AcpiPm({ clock: c.clock });
    expect(d.read(TMR, 4)).toBe(0);
    c.now += 1_000_000_000n; // 1 s
    expect(d.read(TMR, 4)).toBe(PM_TIMER_HZ);
    c.now += 1_000n; // 1 µs more: 3.58 ticks
    expect(d.read(TMR, 4)).toBe(PM_TIMER_HZ + 3);
    // Byte and word reads see the same counter.
    const v = d.read(TMR, 4);
    expect(d.read(TMR, 2) | (d.read(TMR + 2, 2) << 16)).toBe(v);
    expect(d.read(TMR + 3, 1)).toBe(v >>> 24);
    // Past 2^32 ticks (~20 min) it wraps, and bit 31's carries set TMR_STS.
    c.now += 1200n * 1_000_000_000n;
    const ticks = Math.floor((1_000_000_000 + 1000 + 1200e9) * PM_TIMER_HZ / 1e9);
    expect(d.read(TMR, 4)).toBe(ticks % 2 ** 32);
    expect(d.read(STS, 2) & Pm1Event.TMR).toBe(Pm1Event.TMR);
    d.write(STS, Pm1Event.TMR, 2, recordingAccess());
    expect(d.read(STS, 2) & Pm1Event.TMR).toBe(0);
    // Writes to the timer change nothing.
    const before = d.read(TMR, 4);
    d.write(TMR, 0, 4, recordingAccess());
    expect(d.read(TMR, 4)).toBe(before);
  });

  it('SLP_TYP=S5 with SLP_EN requests a poweroff stop; S3 a suspend with WAK_STS and the waking vector', () => {
    const d = new AcpiPm({ wakingVector: () => 0x9a000n });
    const a = recordingAccess();
    // ACPICA writes SLP_TYP first, then SLP_TYP | SLP_EN: only the second stops.
    d.write(CNT, ACPI_SLEEP_TYPE.S5 << Pm1Control.SLP_TYP_SHIFT, 2, a);
    expect(a.stops).toEqual([]);
    d.write(CNT, slp(ACPI_SLEEP_TYPE.S5), 2, a);
    expect(a.stops).toEqual([{ reason: 'poweroff' }]);
    // SLP_EN is write-only; SLP_TYP reads back; SCI_EN is always on.
    expect(d.read(CNT, 2)).toBe((ACPI_SLEEP_TYPE.S5 << Pm1Control.SLP_TYP_SHIFT) | Pm1Control.SCI_EN);
    const b = recordingAccess();
    expect(d.read(STS, 2) & Pm1Event.WAK).toBe(0);
    d.write(CNT + 1, slp(ACPI_SLEEP_TYPE.S3) >> 8, 1, b); // the high byte alone carries both
    expect(b.stops).toEqual([{ reason: 'suspend', wakingVector: 0x9a000n }]);
    expect(d.read(STS, 2) & Pm1Event.WAK).toBe(Pm1Event.WAK);
    d.write(STS, Pm1Event.WAK, 2, b);
    expect(d.read(STS, 2) & Pm1Event.WAK).toBe(0);
    // S0 and undeclared types are ignored, as QEMU does.
    const c = recordingAccess();
    d.write(CNT, slp(0), 2, c);
    d.write(CNT, slp(7), 2, c);
    expect(c.stops).toEqual([]);
    expect(d.stats).toEqual({ suspends: 1, poweroffs: 1, ignoredSleeps: 2 });
  });

  it('a 4-byte write at PM1a_EVT sets PM1_EN and clears PM1_STS bits written as 1', () => {
    const sci = new RecordingIrq(9);
    const d = new AcpiPm({ sci });
    d.pressPowerButton();
    expect(sci.level).toBe(false); // not enabled yet
    expect(d.read(STS, 4)).toBe(Pm1Event.PWRBTN);
    d.write(STS, Pm1Event.PWRBTN << 16, 4, recordingAccess()); // enable only
    expect(sci.level).toBe(true);
    expect(d.read(EN, 2)).toBe(Pm1Event.PWRBTN);
    d.write(STS, Pm1Event.PWRBTN | (Pm1Event.PWRBTN << 16), 4, recordingAccess()); // ack, keep enabled
    expect(sci.level).toBe(false);
    expect(d.read(STS, 4)).toBe(Pm1Event.PWRBTN << 16);
    expect(sci.history).toEqual([true, false]);
  });

  it('snapshot/restore keeps registers and continues the timer from its count', () => {
    const c = fakeClock();
    const d = new AcpiPm({ clock: c.clock });
    d.write(EN, Pm1Event.PWRBTN, 2, recordingAccess());
    d.write(CNT, 3 << Pm1Control.SLP_TYP_SHIFT, 2, recordingAccess());
    c.now += 2_000_000_000n;
    const s = d.snapshot();
    expect(s.ticks).toBe(2 * PM_TIMER_HZ);
    const c2 = fakeClock(77n);
    const e = new AcpiPm({ clock: c2.clock });
    e.restore(JSON.parse(JSON.stringify(s)));
    expect(e.read(TMR, 4)).toBe(2 * PM_TIMER_HZ);
    c2.now += 1_000_000_000n;
    expect(e.read(TMR, 4)).toBe(3 * PM_TIMER_HZ);
    expect(e.read(EN, 2)).toBe(Pm1Event.PWRBTN);
    expect(e.read(CNT, 2)).toBe((3 << Pm1Control.SLP_TYP_SHIFT) | 1);
    expect(() => e.restore({ ...s, version: 2 })).toThrow(SnapshotFormatError);
    expect(() => e.restore({ ...s, ticks: -1 })).toThrow(/ticks/);
  });
});
