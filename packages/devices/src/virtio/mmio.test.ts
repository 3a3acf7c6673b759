import { SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { VirtioMmioTestDriver } from '../testing/virtio-driver.js';
import { Feature, Interrupt, MmioReg, Status } from './constants.js';
import { EchoDevice } from './echo-device.fixture.js';
import { VirtioMmio } from './mmio.js';

function setup(options: { queueMax?: number; indirect?: boolean; eventIdx?: boolean } = {}) {
  const memory = testGuestMemory(1 << 20);
  const irq = new RecordingIrq(5);
  const dev = new EchoDevice(options.queueMax ?? 8);
  const t = new VirtioMmio({
    device: dev, memory, irq,
    ...(options.indirect === undefined ? {} : { indirect: options.indirect }),
    ...(options.eventIdx === undefined ? {} : { eventIdx: options.eventIdx }),
  });
  const drv = new VirtioMmioTestDriver(t, memory);
  return { memory, irq, dev, t, drv };
}

const enc = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);

describe('VirtioMmio registers', () => {
  it('identifies as a modern virtio-mmio device', () => {
    const { drv } = setup();
    expect(drv.read32(MmioReg.MagicValue)).toBe(0x74726976);
    expect(drv.read32(MmioReg.Version)).toBe(2);
    expect(drv.read32(MmioReg.DeviceId)).toBe(0x7f);
    expect(drv.read32(MmioReg.VendorId)).toBe(0x4d565354);
    expect(drv.read32(MmioReg.QueueNumMax)).toBe(8);
    drv.write32(MmioReg.QueueSel, 1);
    expect(drv.read32(MmioReg.QueueNumMax)).toBe(0);
  });

  it('offers VERSION_1, INDIRECT_DESC, EVENT_IDX and the device features', () => {
    const { drv } = setup();
    expect(drv.deviceFeatures()).toBe(Feature.Version1 | Feature.RingIndirectDesc | Feature.RingEventIdx | 1n);
    const { drv: d2 } = setup({ indirect: false, eventIdx: false });
    expect(d2.deviceFeatures()).toBe(Feature.Version1 | 1n);
  });

  it('non-32-bit register accesses read 0 and are ignored', () => {
    const { t } = setup();
    expect(t.read(MmioReg.MagicValue, 2)).toBe(0);
    t.write(MmioReg.Status, 1, 1);
    expect(t.status).toBe(0);
    expect(t.stats.ignoredAccesses).toBe(2);
  });

  it('config space is byte-addressable at 0x100 and any width', () => {
    const { t } = setup();
    expect(t.read(0x100, 1)).toBe(1);
    expect(t.read(0x102, 2)).toBe(0x0403);
    expect(t.read(0x104, 4)).toBe(0x08070605);
    t.write(0x100, 0x99, 1);
    expect(t.read(0x100, 1)).toBe(0x99);
  });

  it('mappings and kernel parameter', () => {
    const { t } = setup();
    expect(t.mappings(0xd0000000n)).toEqual([{ range: { address: 0xd0000000n, size: 0x200 }, device: t }]);
    expect(VirtioMmio.kernelParameter(0xd0000000n, 5)).toBe('virtio_mmio.device=512@0xd0000000:5');
  });
});

describe('VirtioMmio negotiation', () => {
  it('full handshake reaches DRIVER_OK', () => {
    const { drv, t } = setup();
    drv.init();
    expect(drv.status()).toBe(Status.Acknowledge | Status.Driver | Status.FeaturesOk | Status.DriverOk);
    expect(t.negotiatedFeatures & Feature.Version1).toBe(Feature.Version1);
  });

  it('refuses FEATURES_OK without VERSION_1', () => {
    const { drv } = setup();
    drv.init({ features: Feature.RingIndirectDesc, skipDriverOk: true });
    expect(drv.status() & Status.FeaturesOk).toBe(0);
  });

  it('refuses FEATURES_OK with features that were not offered', () => {
    const { drv } = setup();
    drv.init({ features: Feature.Version1 | (1n << 40n), skipDriverOk: true });
    expect(drv.status() & Status.FeaturesOk).toBe(0);
  });

  it('ignores DriverFeatures writes after FEATURES_OK', () => {
    const { drv, t } = setup();
    drv.init({ features: Feature.Version1 });
    drv.writeDriverFeatures(Feature.Version1 | Feature.RingEventIdx);
    expect(t.negotiatedFeatures).toBe(Feature.Version1);
  });

  it('DRIVER_OK without FEATURES_OK sets DEVICE_NEEDS_RESET and raises a config interrupt', () => {
    const { drv, irq } = setup();
    drv.write32(MmioReg.Status, Status.Acknowledge | Status.Driver | Status.DriverOk);
    expect(drv.needsReset()).toBe(true);
    expect(drv.read32(MmioReg.InterruptStatus)).toBe(Interrupt.ConfigChange);
    expect(irq.level).toBe(true);
  });

  it('the guest cannot set or clear DEVICE_NEEDS_RESET itself; writing 0 resets', () => {
    const { drv, dev, irq } = setup();
    drv.write32(MmioReg.Status, Status.DeviceNeedsReset | Status.Acknowledge);
    expect(drv.needsReset()).toBe(false);
    drv.write32(MmioReg.Status, Status.DriverOk);
    expect(drv.needsReset()).toBe(true);
    drv.write32(MmioReg.Status, Status.Acknowledge);
    expect(drv.needsReset()).toBe(true);
    drv.write32(MmioReg.Status, 0);
    expect(drv.status()).toBe(0);
    expect(dev.resets).toBe(1);
    expect(irq.level).toBe(false);
  });
});

describe('VirtioMmio queues', () => {
  it('processes a chain, asserts the IRQ, and InterruptACK lowers it', () => {
    const { drv, irq } = setup();
    drv.init();
    const q = drv.queue(0);
    q.setUsedEvent(0);
    const { head, addrs } = q.addChain([{ data: enc('hello') }, { writable: 5 }]);
    q.kick();
    expect(q.takeUsed()).toEqual([{ id: head, len: 5 }]);
    expect(dec(drv.memory.read(addrs[1] as bigint, 5))).toBe('olleh');
    expect(irq.level).toBe(true);
    expect(drv.ackInterrupts()).toBe(Interrupt.UsedBuffer);
    expect(irq.level).toBe(false);
  });

  it('handles indirect chains', () => {
    const { drv, dev } = setup();
    drv.init();
    const q = drv.queue(0);
    const { addrs } = q.addChain([{ data: enc('ab') }, { data: enc('cd') }, { writable: 2 }, { writable: 2 }], { indirect: true });
    q.kick();
    expect(dev.chains[0]?.readableLength).toBe(4);
    expect(dec(drv.memory.read(addrs[2] as bigint, 2)) + dec(drv.memory.read(addrs[3] as bigint, 2))).toBe('dcba');
  });

  it('notifications before DRIVER_OK are ignored; the work is done after DRIVER_OK', () => {
    const { drv, t, dev } = setup();
    drv.init({ skipDriverOk: true });
    const q = drv.queue(0);
    q.addChain([{ data: enc('x') }, { writable: 1 }]);
    q.kick();
    expect(q.usedIdx()).toBe(0);
    expect(dev.chains.length).toBe(0);
    expect(t.stats.ignoredNotifies).toBe(1);
    expect(drv.needsReset()).toBe(false);
    drv.write32(MmioReg.Status, drv.status() | Status.DriverOk);
    q.kick();
    expect(q.usedIdx()).toBe(1);
  });

  it('notifications for unknown queues are ignored', () => {
    const { drv, t } = setup();
    drv.init();
    drv.write32(MmioReg.QueueNotify, 7);
    drv.write32(MmioReg.QueueNotify, 0xffffffff);
    expect(t.stats.ignoredNotifies).toBe(2);
    expect(drv.needsReset()).toBe(false);
  });

  it.each([
    ['not a power of two', 6],
    ['larger than QueueNumMax', 16],
    ['zero', 0],
  ])('queue size %s → DEVICE_NEEDS_RESET at QueueReady', (_why, size) => {
    const { drv, irq, t } = setup();
    drv.init({ queueSizes: [size], skipDriverOk: true });
    expect(drv.needsReset()).toBe(true);
    expect(irq.level).toBe(true);
    drv.write32(MmioReg.QueueSel, 0);
    expect(drv.read32(MmioReg.QueueReady)).toBe(0);
    expect(t.lastError?.message).toMatch(/power of two/);
  });

  it('rings outside RAM or misaligned → DEVICE_NEEDS_RESET at QueueReady', () => {
    for (const [reg, value] of [[MmioReg.QueueDescLow, 0x200000], [MmioReg.QueueDeviceLow, 0x2002], [MmioReg.QueueDriverHigh, 1]] as const) {
      const { drv, t } = setup();
      drv.init({ skipDriverOk: true, skipQueues: true });
      drv.write32(MmioReg.QueueSel, 0);
      drv.write32(MmioReg.QueueNum, 8);
      drv.write32(MmioReg.QueueDescLow, 0x1000);
      drv.write32(MmioReg.QueueDriverLow, 0x1100);
      drv.write32(MmioReg.QueueDeviceLow, 0x1200);
      drv.write32(reg, value);
      drv.write32(MmioReg.QueueReady, 1);
      expect(drv.needsReset()).toBe(true);
      expect(t.lastError?.message).toMatch(/aligned|inside guest RAM/);
    }
  });

  it('queue layout registers are ignored while the queue is ready', () => {
    const { drv, dev } = setup();
    drv.init();
    drv.write32(MmioReg.QueueSel, 0);
    drv.write32(MmioReg.QueueDescLow, 0xdead000);
    drv.write32(MmioReg.QueueNum, 3);
    const q = drv.queue(0);
    q.addChain([{ writable: 1 }]);
    q.kick();
    expect(dev.chains.length).toBe(1);
  });

  it('without EVENT_IDX, VIRTQ_AVAIL_F_NO_INTERRUPT suppresses the used-buffer interrupt', () => {
    const { drv, irq } = setup();
    drv.init({ features: Feature.Version1 });
    const q = drv.queue(0);
    q.setAvailFlags(1);
    q.addChain([{ writable: 1 }]);
    q.kick();
    expect(q.usedIdx()).toBe(1);
    expect(irq.level).toBe(false);
    q.setAvailFlags(0);
    q.addChain([{ writable: 1 }]);
    q.kick();
    expect(irq.level).toBe(true);
  });

  it('with EVENT_IDX, interrupts only when used.idx passes used_event, and avail_event is published', () => {
    const { drv, irq } = setup();
    drv.init();
    const q = drv.queue(0);
    q.setUsedEvent(1); // interrupt once the second buffer is used
    q.addChain([{ writable: 1 }]);
    q.kick();
    expect(irq.level).toBe(false);
    expect(q.availEvent()).toBe(1);
    q.addChain([{ writable: 1 }]);
    q.kick();
    expect(irq.level).toBe(true);
  });

  it('a wrapped free-running index keeps working past 65535', () => {
    const { drv } = setup({ queueMax: 2 });
    drv.init();
    const q = drv.queue(0);
    for (let i = 0; i < 70000; i++) {
      q.addChain([{ writable: 1 }]);
      if (i % 2 === 1) q.kick();
      if (i % 1000 === 0) q.takeUsed();
    }
    expect(drv.needsReset()).toBe(false);
    expect(q.usedIdx()).toBe(70000 & 0xffff);
  }, 30_000);

  it('reset by writing 0 lets the driver start over', () => {
    const { drv, dev } = setup();
    drv.init();
    drv.queue(0).setAvailIdx(100);
    drv.queue(0).kick();
    expect(drv.needsReset()).toBe(true);
    drv.init();
    expect(drv.needsReset()).toBe(false);
    const q = drv.queue(0);
    q.addChain([{ writable: 1 }]);
    q.kick();
    expect(dev.chains.length).toBe(1);
  });
});

describe('VirtioMmio snapshot', () => {
  it('restores a live transport that keeps processing the same rings', () => {
    const a = setup();
    a.drv.init();
    const q = a.drv.queue(0);
    q.addChain([{ data: enc('1') }, { writable: 1 }]);
    q.kick();
    const snap = JSON.parse(JSON.stringify(a.t.snapshot())) as unknown;
    // Same guest memory, fresh transport: as if the machine were restored.
    const dev2 = new EchoDevice(8);
    const t2 = new VirtioMmio({ device: dev2, memory: a.memory });
    t2.restore(snap);
    expect(t2.status).toBe(a.t.status);
    q.addChain([{ data: enc('2') }, { writable: 1 }]);
    t2.write(MmioReg.QueueNotify, 0, 4);
    expect(dev2.chains.length).toBe(1);
    expect(q.takeUsed().length).toBe(2);
  });

  it('rejects bad snapshots with SnapshotFormatError', () => {
    const { t } = setup();
    const good = t.snapshot() as Record<string, unknown>;
    expect(() => t.restore({ ...good, version: 9 })).toThrow(SnapshotFormatError);
    expect(() => t.restore({ ...good, queues: [] })).toThrow(SnapshotFormatError);
    expect(() => t.restore({ ...good, driverFeatures: 12 })).toThrow(SnapshotFormatError);
    expect(() => t.restore({ ...good, queues: [{ num: 8 }] })).toThrow(SnapshotFormatError);
  });
});
