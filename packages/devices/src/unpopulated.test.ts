import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '@tsvm/core';
import { MockBackend } from '@tsvm/core/testing';
import { Machine } from '@tsvm/core';
import { PC_PROBED_RANGES, Unpopulated } from './unpopulated.js';

describe('Unpopulated', () => {
  it('reads all ones at every width and drops writes, counting both', () => {
    const d = new Unpopulated({ port: 0x2f8, size: 8, name: 'COM2' });
    expect(d.name).toBe('unpopulated:COM2');
    expect(d.read(0, 1)).toBe(0xff);
    expect(d.read(1, 2)).toBe(0xffff);
    expect(d.read(0, 4)).toBe(0xffffffff);
    d.write();
    expect([d.reads, d.writes]).toEqual([3, 1]);
    d.reset();
    expect([d.reads, d.writes]).toEqual([0, 0]);
  });

  it('rejects bad ranges with typed errors', () => {
    for (const r of [{ port: -1, size: 1, name: 'x' }, { port: 0xffff, size: 2, name: 'x' }, { port: 0, size: 0, name: 'x' }, { port: 0, size: 1, name: '' }]) {
      expect(() => new Unpopulated(r)).toThrow(InvalidArgumentError);
    }
  });

  it('the PC set does not overlap itself and attaches to a machine next to the PC devices', async () => {
    const sorted = [...PC_PROBED_RANGES].sort((a, b) => a.port - b.port);
    for (let i = 1; i < sorted.length; i++) {
      const p = sorted[i - 1]!, c = sorted[i]!;
      expect(c.port, `${p.name} overlaps ${c.name}`).toBeGreaterThanOrEqual(p.port + p.size);
    }
    const vm = await Machine.create({ memory: 1 << 20, backend: new MockBackend() });
    for (const d of Unpopulated.ranges()) vm.attachDevice(d);
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'com1', read: () => 0, write: () => {} });
    vm.io.register({ port: 0x70, size: 2 }, { name: 'cmos', read: () => 0, write: () => {} });
    vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', read: () => 0, write: () => {} });
    expect(vm.io.find(0xcfcn)?.device.name).toBe('unpopulated:PCI config (mechanism #1)');
    await vm.close();
  });
});
