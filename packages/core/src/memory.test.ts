import { describe, expect, it } from 'vitest';
import { GuestMemory, type HostMemory } from './memory.js';
import { GuestMemoryError } from './errors.js';

function host(size: number): HostMemory {
  return { bytes: new Uint8Array(size), hostAddress: 0n, fd: -1, close: () => {} };
}

function twoRegions(): GuestMemory {
  const m = new GuestMemory();
  m.addRegion({ slot: 0, start: 0n as never, size: 0x2000, readonly: false, name: 'low' }, host(0x2000));
  m.addRegion({ slot: 1, start: 0x10000n as never, size: 0x1000, readonly: true, name: 'rom' }, host(0x1000));
  return m;
}

describe('GuestMemory', () => {
  it('regionAt checks a range like every access and describes the region without handing out its bytes', () => {
    const m = twoRegions();
    const r = m.regionAt(0x10010n, 16);
    expect(r).toEqual({ slot: 1, start: 0x10000n, size: 0x1000, readonly: true, name: 'rom' });
    expect(Object.values(r).some((v) => v instanceof Uint8Array)).toBe(false);
    expect(() => m.regionAt(0x1ff0, 0x20)).toThrow(GuestMemoryError); // runs past 'low'
    expect(() => m.regionAt(0x3000, 1)).toThrow(GuestMemoryError); // a hole
    expect(() => m.regionAt(-1, 1)).toThrow(GuestMemoryError);
  });

  it('has no public method that returns a view of guest RAM: reads are copies', () => {
    const m = twoRegions();
    expect('translate' in m).toBe(false);
    m.write(0x100, Uint8Array.of(1, 2, 3));
    const copy = m.read(0x100, 3);
    copy[0] = 99;
    expect(m.read(0x100, 1)[0]).toBe(1);
  });

  it('writePages copies whole pages of one region, marks them as host writes, and refuses what is not a page of it', () => {
    const m = twoRegions();
    const written = m.trackHostWrites();
    const src = new Uint8Array(0x3000).map((_, i) => (i >> 12) + 1);
    m.writePages(0n, 0x2000, src, 0x1000, [0x1000, 0]);
    expect(m.read(0, 1)[0]).toBe(2);
    expect(m.read(0x1fff, 1)[0]).toBe(3);
    expect([...written].sort()).toEqual([0n, 0x1000n]);
    expect(() => m.writePages(0n, 0x2000, src, 0, [0x800])).toThrow(/not a page/);
    expect(() => m.writePages(0n, 0x2000, src, 0, [0x2000])).toThrow(/not a page/);
    expect(() => m.writePages(0n, 0x2000, src, 0x2000, [0x1000])).toThrow(/has no page/);
    expect(() => m.writePages(0n, 0x3000, src, 0, [0])).toThrow(GuestMemoryError); // not one region
  });
});
