// Hostile rings against every virtio device: one kick must cause a bounded amount of host work,
// the rest must run later (outside the exit), and device DMA must pass the DMA gate.
import { DmaGate, InvalidArgumentError, type DmaWrite } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { type TestQueue, VirtioMmioTestDriver } from '../testing/virtio-driver.js';
import { BlockRequest, BlockStatus, VirtioBlock } from './block.js';
import { DEFAULT_VIRTIO_BUDGET } from './budget.js';
import { VirtioConsole } from './console.js';
import { DescFlag, MmioReg, Status } from './constants.js';
import type { VirtioDevice } from './device.js';
import { VirtioMmio, type VirtioMmioOptions } from './mmio.js';
import { VirtioRng } from './rng.js';

const MiB = 1 << 20;
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

function attach(device: VirtioDevice, options: Partial<VirtioMmioOptions> = {}) {
  const memory = testGuestMemory(8 * MiB);
  const transport = new VirtioMmio({ device, memory, irq: new RecordingIrq(), ...options });
  const drv = new VirtioMmioTestDriver(transport, memory);
  drv.init();
  return { memory, transport, drv, q: drv.queue(device.name === 'virtio-console' ? 1 : 0) };
}

/**
 * The attack of the review: descriptor 0..n-1 each name the same `len` bytes at `addr`, chained,
 * and every avail slot points at head 0 — the ring describes RAM `size × n` times over.
 */
function amplify(q: TestQueue, addr: bigint, len: number, flags: number, descriptors = q.size): void {
  for (let i = 0; i < descriptors; i++) q.writeDesc(i, { addr, len, flags: flags | (i < descriptors - 1 ? DescFlag.Next : 0), next: i + 1 });
  for (let i = 0; i < q.size; i++) q.publish(0);
}

describe('per-notify budget', () => {
  it('console: one kick of 256 × 256 × 2 MiB transmits a bounded amount; the rest runs in later turns; kicks meanwhile buy nothing', async () => {
    let out = 0;
    const dev = new VirtioConsole({ sink: (b) => { out += b.length; }, output: { autoFlush: false } });
    const { transport, q } = attach(dev);
    amplify(q, 0x400000n, 2 * MiB, 0);
    q.kick();
    dev.flush();
    const first = out;
    expect(first).toBeGreaterThan(0);
    expect(first).toBeLessThanOrEqual(DEFAULT_VIRTIO_BUDGET.bytes + 64 * 1024);
    expect(transport.busy).toBe(true);
    q.kick();
    q.kick();
    dev.flush();
    expect(out).toBe(first);
    let turns = 0;
    while (transport.busy && turns < 1000) {
      const before = out;
      await turn();
      dev.flush();
      expect(out - before).toBeLessThanOrEqual(DEFAULT_VIRTIO_BUDGET.bytes + 64 * 1024);
      turns++;
    }
    expect(transport.busy).toBe(false);
    expect(q.takeUsed()).toHaveLength(256);
    expect(out).toBe(256 * 64 * 1024); // each chain capped at maxTransmitBytes
    expect(dev.droppedOutput).toBe(256 * (256 * 2 * MiB - 64 * 1024));
    expect(transport.stats.deferrals).toBeGreaterThan(1);
    expect(transport.stats.needsReset).toBe(0);
  });

  it('rng: 256 requests of 256 × 1 MiB each fill at most a budget per turn', async () => {
    let filled = 0;
    const { transport, q } = attach(new VirtioRng({ source: (b) => { filled += b.length; b.fill(7); } }));
    amplify(q, 0x400000n, MiB, DescFlag.Write);
    q.kick();
    expect(filled).toBeLessThanOrEqual(DEFAULT_VIRTIO_BUDGET.bytes + 64 * 1024);
    while (transport.busy) await turn();
    expect(q.takeUsed()).toHaveLength(256);
  });

  it('block: a request describing more than maxRequestBytes fails with IOERR without moving its data', () => {
    const image = new Uint8Array(64 * MiB);
    let read = 0;
    const backing = { size: image.length, readAt: (into: Uint8Array) => { read += into.length; }, writeAt: () => {}, flush: () => {}, close: () => {} };
    const { memory, q } = attach(new VirtioBlock({ backing }));
    const hdr = 0x300000n, status = 0x300100n;
    memory.write(hdr, Uint8Array.of(BlockRequest.In, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
    q.writeDesc(0, { addr: hdr, len: 16, flags: DescFlag.Next, next: 1 });
    for (let i = 1; i < 255; i++) q.writeDesc(i, { addr: 0x400000n, len: 2 * MiB, flags: DescFlag.Write | DescFlag.Next, next: i + 1 });
    q.writeDesc(255, { addr: status, len: 1, flags: DescFlag.Write, next: 0 });
    q.publish(0);
    q.kick();
    expect(q.takeUsed()).toEqual([{ id: 0, len: 1 }]);
    expect(memory.readUint(status, 1)).toBe(BlockStatus.IoErr);
    expect(read).toBe(0);
  });

  it('block: advertises seg_max × size_max within maxRequestBytes', () => {
    const dev = new VirtioBlock({ buffer: new Uint8Array(4096), maxRequestBytes: 256 * 1024 });
    const { drv } = attach(dev);
    const sizeMax = drv.read32(MmioReg.Config + 8), segMax = drv.read32(MmioReg.Config + 12);
    expect(sizeMax).toBeGreaterThanOrEqual(4096);
    expect(sizeMax * segMax).toBeLessThanOrEqual(256 * 1024);
  });

  it('a chain looping back on itself is a guest fault (NEEDS_RESET), not host work', () => {
    const { transport, drv, q } = attach(new VirtioRng());
    q.writeDesc(0, { addr: 0x400000n, len: MiB, flags: DescFlag.Write | DescFlag.Next, next: 0 });
    q.publish(0);
    q.kick();
    expect(drv.status() & Status.DeviceNeedsReset).toBeTruthy();
    expect(transport.lastError?.message).toMatch(/loop/);
  });

  it('a device reset drops deferred work', async () => {
    let filled = 0;
    const { transport, drv, q } = attach(new VirtioRng({ source: (b) => { filled += b.length; } }), { budget: { chains: 1 } });
    amplify(q, 0x400000n, 4096, DescFlag.Write, 1);
    q.kick();
    expect(transport.busy).toBe(true);
    drv.write32(MmioReg.Status, 0);
    const at = filled;
    await turn();
    expect(transport.busy).toBe(false);
    expect(filled).toBe(at);
  });

  it('budgets and caps are validated', () => {
    const memory = testGuestMemory(MiB);
    expect(() => new VirtioMmio({ device: new VirtioRng(), memory, budget: { bytes: 0 } })).toThrow(InvalidArgumentError);
    expect(() => new VirtioMmio({ device: new VirtioRng(), memory, budget: { chains: 1.5 } })).toThrow(/budget.chains/);
    expect(() => new VirtioConsole({ maxTransmitBytes: -1 })).toThrow(InvalidArgumentError);
    expect(() => new VirtioBlock({ buffer: new Uint8Array(512), maxRequestBytes: 100 })).toThrow(/maxRequestBytes/);
  });
});

describe('device DMA passes the DMA gate', () => {
  function watch(memory: ReturnType<typeof testGuestMemory>, deny: (w: DmaWrite) => boolean) {
    const seen: DmaWrite[] = [];
    const remove = DmaGate.of(memory).add({
      name: 'test-watch',
      mediate: (w) => (deny(w) ? { verdict: 'deny', reason: 'watched' } : undefined),
      observe: (w) => void seen.push({ ...w, data: w.data.slice() }),
    });
    return { seen, remove };
  }

  it('rng: a denied fill leaves RAM untouched and puts the device into NEEDS_RESET', () => {
    const { memory, drv, q } = attach(new VirtioRng({ source: (b) => b.fill(0xab) }));
    const { addrs } = q.addChain([{ writable: 32 }]);
    const buf = addrs[0] as bigint;
    watch(memory, (w) => w.address <= buf && buf < w.address + BigInt(w.length));
    q.kick();
    expect([...memory.read(buf, 32)]).toEqual(new Array(32).fill(0));
    expect(drv.status() & Status.DeviceNeedsReset).toBeTruthy();
    expect(q.takeUsed()).toEqual([]);
  });

  it('rng: observers see the device name and the exact range of each write, data and used ring', () => {
    const { memory, q } = attach(new VirtioRng({ source: (b) => b.fill(0xab) }));
    const { addrs } = q.addChain([{ writable: 24 }]);
    const { seen } = watch(memory, () => false);
    q.kick();
    const data = seen.filter((w) => w.address === addrs[0]);
    expect(data).toHaveLength(1);
    expect(data[0]).toMatchObject({ device: 'virtio-rng', length: 24 });
    expect([...(data[0]?.data ?? [])]).toEqual(new Array(24).fill(0xab));
    // Everything else is the device's ring bookkeeping (used ring, avail_event): DMA too.
    const rest = seen.filter((w) => w.address !== addrs[0]);
    expect(rest.length).toBeGreaterThan(0);
    expect(rest.every((w) => w.address >= q.used && w.address < q.used + 8n * BigInt(q.size) + 6n)).toBe(true);
  });

  it('block: a denied read DMA fails the request with IOERR; RAM untouched', () => {
    const { memory, q } = attach(new VirtioBlock({ buffer: new Uint8Array(4096).fill(5) }));
    const hdr = new Uint8Array(16);
    const { addrs } = q.addChain([{ data: hdr }, { writable: 512 }, { writable: 1 }]);
    const data = addrs[1] as bigint;
    watch(memory, (w) => w.address === data);
    q.kick();
    expect(memory.readUint(addrs[2] as bigint, 1)).toBe(BlockStatus.IoErr);
    expect(memory.read(data, 512).every((b) => b === 0)).toBe(true);
    expect(q.takeUsed()).toEqual([{ id: 0, len: 1 }]);
  });

  it('console: a denied receive DMA puts the device into NEEDS_RESET; RAM untouched', () => {
    const dev = new VirtioConsole();
    const { memory, drv } = attach(dev);
    const rx = drv.queue(0);
    const { addrs } = rx.addChain([{ writable: 8 }]);
    watch(memory, (w) => w.address === addrs[0]);
    rx.kick();
    dev.receive('secret');
    expect(memory.read(addrs[0] as bigint, 8).every((b) => b === 0)).toBe(true);
    expect(drv.status() & Status.DeviceNeedsReset).toBeTruthy();
  });

  it('a removed hook no longer sees writes', () => {
    const { memory, q } = attach(new VirtioRng());
    const { seen, remove } = watch(memory, () => false);
    remove();
    q.addChain([{ writable: 8 }]);
    q.kick();
    expect(seen).toEqual([]);
  });
});
