import { SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { type Clock, CmosRtc, fixedClock, hostClock } from './cmos-rtc.js';

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
    expect(() => b.dev.restore({ version: 1, ram: '', index: 0, nmiDisabled: false, offsetMs: 0 })).toThrow(SnapshotFormatError);
  });
});
