import { describe, expect, it } from 'vitest';
import { DeviceMemory, DmaDeniedError, Machine } from '@tsvm/core';
import { MockBackend } from '@tsvm/core/testing';
import { Monitor } from './monitor.js';
import { allow, deny, emulate } from './decisions.js';
import type { MonitorEvent } from './events.js';

const MiB = 1024 * 1024;

async function setup() {
  const backend = new MockBackend();
  backend.script({ kind: 'hlt' });
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000, mode: 'long' });
  const lines: string[] = [];
  const mon = new Monitor(vm, { audit: lines });
  // What a device model gets from its transport.
  const dev = new DeviceMemory(vm.memory, 'virtio-rng');
  return { vm, mon, dev, lines };
}

describe('write-watch sees device DMA', () => {
  it('mediate: a DMA write into the watched range is decided (deny → typed fault, RAM untouched) and audited as source dma', async () => {
    const { vm, mon, dev, lines } = await setup();
    const seen: MonitorEvent[] = [];
    mon.mediate({ event: 'write-watch', range: [0x20000, 0x20fff] }, (ev) => {
      seen.push(ev);
      return ev.event === 'write-watch' && ev.address === 0x20100n ? deny({ reason: 'key page' }) : allow();
    });
    dev.write(0x20000n, new Uint8Array(16).fill(1));
    expect(() => dev.write(0x20100n, new Uint8Array(64).fill(2))).toThrow(DmaDeniedError);
    dev.write(0x30000n, Uint8Array.of(3)); // outside: no event
    expect(seen).toEqual([
      { event: 'write-watch', address: 0x20000n, size: 16, value: undefined, source: 'dma', device: 'virtio-rng' },
      { event: 'write-watch', address: 0x20100n, size: 64, value: undefined, source: 'dma', device: 'virtio-rng' },
    ]);
    expect(vm.memory.read(0x20000, 16).every((b) => b === 1)).toBe(true);
    expect(vm.memory.read(0x20100, 64).every((b) => b === 0)).toBe(true);
    const audit = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(audit).toHaveLength(2);
    expect(audit[1]).toMatchObject({ event: 'write-watch', source: 'dma', device: 'virtio-rng', address: '0x20100', length: 64, decision: 'deny' });
  });

  it('mediate: emulate replaces a short DMA write and denies a long one; an async verdict denies', async () => {
    const { vm, mon, dev } = await setup();
    mon.mediate({ event: 'write-watch', range: [0x20000, 0x20fff] }, (ev) =>
      ev.event === 'write-watch' && ev.address === 0x20800n ? Promise.resolve(allow()) : emulate(0x4433));
    dev.writeUint(0x20010n, 2, 0xffff);
    expect(vm.memory.readUint(0x20010, 2)).toBe(0x4433);
    expect(() => dev.write(0x20020n, new Uint8Array(9))).toThrow(/cannot replace a 9-byte/);
    expect(() => dev.write(0x20800n, new Uint8Array(4).fill(9))).toThrow(/asynchronously/);
    expect(vm.memory.readUint(0x20800, 4)).toBe(0);
  });

  it('observe: DMA writes are delivered with their exact range (the dirty log never sees them)', async () => {
    const { mon, dev } = await setup();
    const seen: MonitorEvent[] = [];
    mon.observe({ event: 'write-watch', range: [0x40000, 0x40fff] }, (ev) => void seen.push(ev));
    dev.write(0x40ff0n, new Uint8Array(32)); // straddles the end of the range: still reported, whole
    expect(seen).toEqual([{ event: 'write-watch', address: 0x40ff0n, size: 32, value: undefined, source: 'dma', device: 'virtio-rng' }]);
  });

  it('without write-watch hooks the monitor adds nothing to the DMA path', async () => {
    const { dev, vm } = await setup();
    dev.write(0x20000n, Uint8Array.of(1, 2));
    expect(vm.memory.readUint(0x20000, 2)).toBe(0x0201);
  });
});
