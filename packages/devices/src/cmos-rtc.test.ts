import { SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { type Clock, CmosRtc, fixedClock, hostClock, RTC_UIP_WINDOW_NS } from './cmos-rtc.js';
import { RecordingIrq } from './testing/fakes.js';

// Tuesday 2024-03-05 13:07:09 UTC
const T = new Date(Date.UTC(2024, 2, 5, 13, 7, 9));

function rtc(clock: Clock = fixedClock(T)) {
  const dev = new CmosRtc({ clock });
  const get = (reg: number, nmi = 0) => {
    dev.write(0, reg | nmi, 1);
    return dev.read(1, 1);
  };
  const set = (reg: number, v: number) => {
    dev.write(0, reg, 1);
    dev.write(1, v, 1);
  };
  return { dev, get, set };
}

describe('CmosRtc', () => {
  it('maps 0x70-0x71', () => {
    const d = new CmosRtc();
    expect(d.mappings()).toEqual([{ range: { port: 0x70, size: 2 }, device: d }]);
    expect(CmosRtc.defaultIrq).toBe(8);
  });

  it('reads the time in BCD, 24 h by default', () => {
    const { get } = rtc();
    expect([get(0), get(2), get(4), get(6), get(7), get(8), get(9), get(0x32)]).toEqual([0x09, 0x07, 0x13, 0x03, 0x05, 0x03, 0x24, 0x20]);
    expect(get(0x0b)).toBe(0x02);
    expect(get(0x0d)).toBe(0x80);
    expect(get(0x0a) & 0x80).toBe(0);
    expect(get(0x0c)).toBe(0);
  });

  it('binary mode and 12 h mode per status B', () => {
    const { get, set } = rtc();
    set(0x0b, 0x06);
    expect([get(0), get(4), get(9), get(0x32)]).toEqual([9, 13, 24, 20]);
    set(0x0b, 0x04); // binary, 12 h
    expect(get(4)).toBe(0x81); // 1 PM
    set(0x0b, 0x00); // BCD, 12 h
    expect(get(4)).toBe(0x81);
  });

  it('masks the NMI-disable bit out of the index and remembers it', () => {
    const { dev, get } = rtc();
    expect(get(0x00, 0x80)).toBe(0x09);
    expect(dev.nmiDisabled).toBe(true);
    get(0);
    expect(dev.nmiDisabled).toBe(false);
  });

  it('a fixed clock does not advance; the host clock does', () => {
    const { get } = rtc();
    expect(get(0)).toBe(get(0));
    let now = T.getTime();
    const { get: get2 } = rtc(() => new Date(now));
    now += 2000;
    expect(get2(0)).toBe(0x11);
    expect(hostClock().getTime()).toBeGreaterThan(T.getTime());
  });

  it('guest can set the time with SET; the offset persists against the clock', () => {
    let now = T.getTime();
    const { get, set } = rtc(() => new Date(now));
    set(0x0b, 0x82); // SET, 24 h, BCD
    set(4, 0x22);
    set(2, 0x30);
    expect(get(4)).toBe(0x22); // frozen while SET
    set(0x0b, 0x02);
    expect([get(4), get(2), get(0)]).toEqual([0x22, 0x30, 0x09]);
    now += 60_000;
    expect(get(2)).toBe(0x31);
  });

  it('CMOS RAM bytes are stored; C and D are read-only', () => {
    const { get, set } = rtc();
    set(0x40, 0xab);
    expect(get(0x40)).toBe(0xab);
    set(0x0d, 0);
    expect(get(0x0d)).toBe(0x80);
    expect(new CmosRtc().read(0, 1)).toBe(0xff);
  });

  it('snapshot/restore/reset', () => {
    const a = rtc();
    a.set(0x40, 7);
    a.set(0x0b, 0x06);
    const b = rtc();
    b.dev.restore(JSON.parse(JSON.stringify(a.dev.snapshot())));
    expect(b.get(0x40)).toBe(7);
    expect(b.get(0)).toBe(9);
    b.dev.reset();
    expect(b.get(0x40)).toBe(0);
    expect(() => b.dev.restore({ version: 2, ram: '', index: 0, nmiDisabled: false, offsetMs: 0, updatedSecond: 0 })).toThrow(SnapshotFormatError);
    expect(() => b.dev.restore({ ...a.dev.snapshot(), version: 3 })).toThrow(SnapshotFormatError);
    // A version-1 state (saved before the update cycle existed) still restores: RAM and clock as saved.
    const v1: Record<string, unknown> = { ...(JSON.parse(JSON.stringify(a.dev.snapshot())) as Record<string, unknown>), version: 1 };
    delete v1['updatedSecond'];
    const c = rtc();
    c.dev.restore(v1);
    expect([c.get(0x40), c.get(0)]).toEqual([7, 9]);
    expect(c.dev.snapshot().version).toBe(2);
  });

  describe('update cycle', () => {
    const SEC = 1_000_000_000n;
    const t0 = BigInt(T.getTime()) * 1_000_000n; // 13:07:09.000
    function clocked(start: bigint, irq?: RecordingIrq) {
      const c = { now: start };
      const dev = new CmosRtc({ preciseClock: () => c.now, ...(irq ? { irq } : {}) });
      const get = (reg: number) => {
        dev.write(0, reg, 1);
        return dev.read(1, 1);
      };
      const set = (reg: number, v: number) => {
        dev.write(0, reg, 1);
        dev.write(1, v, 1);
      };
      return { c, dev, get, set };
    }

    it('UIP is 1 exactly in the 244 µs before each second boundary, while the seconds still read the old value', () => {
      const { c, get } = clocked(t0 + SEC - RTC_UIP_WINDOW_NS - 1n);
      expect(get(0x0a) & 0x80).toBe(0);
      c.now += 1n; // window starts
      expect(get(0x0a) & 0x80).toBe(0x80);
      expect(get(0x0a) & 0x7f).toBe(0x26); // the rest of A unchanged
      expect(get(0)).toBe(0x09);
      c.now = t0 + SEC - 1n;
      expect(get(0x0a) & 0x80).toBe(0x80);
      c.now = t0 + SEC; // the update: UIP falls, seconds move
      expect(get(0x0a) & 0x80).toBe(0);
      expect(get(0)).toBe(0x10);
    });

    it('a guest polling for the edge (wait for UIP=1, then UIP=0) sees it within one second of fake time', () => {
      const { c, get } = clocked(t0 + 123_456_789n);
      const step = 50_000n; // 50 µs per poll, as a guest's port reads would take
      let rises = 0;
      let falls = 0;
      let last = 0;
      for (let i = 0; i < 40_000; i++) {
        const uip = get(0x0a) & 0x80;
        if (uip && !last) rises++;
        if (!uip && last) falls++;
        last = uip;
        c.now += step;
      }
      // 40 000 × 50 µs = 2 s: two updates, each a rise and a fall.
      expect([rises, falls]).toEqual([2, 2]);
    });

    it('status C: UF set at each update end, cleared by reading; no updates with SET or a stopped divider', () => {
      const { c, get, set } = clocked(t0 + 500_000_000n);
      expect(get(0x0c)).toBe(0);
      c.now += SEC;
      expect(get(0x0c)).toBe(0x10);
      expect(get(0x0c)).toBe(0);
      set(0x0b, 0x82); // SET
      c.now += SEC;
      expect(get(0x0a) & 0x80).toBe(0);
      c.now = (c.now / SEC + 1n) * SEC - 1000n; // inside a window
      expect(get(0x0a) & 0x80).toBe(0);
      expect(get(0x0c)).toBe(0);
      set(0x0b, 0x02);
      set(0x0a, 0x66); // divider reset: the chip stops updating
      c.now += SEC;
      expect(get(0x0c)).toBe(0);
      set(0x0a, 0x26);
      c.now += SEC;
      expect(get(0x0c)).toBe(0x10);
    });

    it('with UIE, IRQF is set and IRQ 8 asserted until C is read', () => {
      const irq = new RecordingIrq(8);
      const { c, dev, get, set } = clocked(t0 + 100_000_000n, irq);
      set(0x0b, 0x12); // UIE, 24 h
      expect(irq.level).toBe(false);
      c.now += SEC;
      expect(dev.poll()).toBe(true); // what the update timer does at the boundary
      expect(irq.level).toBe(true);
      expect(get(0x0c)).toBe(0x90);
      expect(irq.level).toBe(false);
      expect(irq.history).toEqual([true, false]);
      set(0x0b, 0x02);
      dev.close();
    });

    it('a snapshot keeps pending flags and the last update accounted for', () => {
      const a = clocked(t0 + 100_000_000n);
      a.c.now += SEC;
      const s = a.dev.snapshot();
      expect(s.version).toBe(2);
      const b = clocked(a.c.now);
      b.dev.restore(JSON.parse(JSON.stringify(s)));
      expect(b.get(0x0c)).toBe(0x10); // the update before the snapshot, not yet read
      expect(b.get(0x0c)).toBe(0);
      expect(() => b.dev.restore({ ...s, updatedSecond: 'x' })).toThrow(SnapshotFormatError);
    });
  });
});
