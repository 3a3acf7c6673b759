// Hostile drivers: every structural violation must end in DEVICE_NEEDS_RESET + a config
// interrupt, never in an exception out of the register file, and never reach the device model.
import { describe, expect, it } from 'vitest';
import { RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { type TestQueue, VirtioMmioTestDriver } from '../testing/virtio-driver.js';
import { DescFlag, Feature, Interrupt, MmioReg } from './constants.js';
import { EchoDevice } from './echo-device.fixture.js';
import { VirtioMmio } from './mmio.js';
import { MAX_INDIRECT_ENTRIES } from './virtqueue.js';

const RAM = 1 << 20;
const { Next, Write, Indirect } = DescFlag;

function setup(features?: bigint) {
  const memory = testGuestMemory(RAM);
  const irq = new RecordingIrq();
  const dev = new EchoDevice(8);
  const t = new VirtioMmio({ device: dev, memory, irq });
  const drv = new VirtioMmioTestDriver(t, memory);
  drv.init(features === undefined ? {} : { features });
  const q = drv.queue(0);
  const buf = drv.alloc(4096, 16); // a valid scratch buffer
  return { memory, irq, dev, t, drv, q, buf };
}

type Env = ReturnType<typeof setup>;

function expectNeedsReset(env: Env, pattern: RegExp): void {
  expect(() => env.q.kick()).not.toThrow();
  expect(env.drv.needsReset()).toBe(true);
  expect(env.drv.read32(MmioReg.InterruptStatus) & Interrupt.ConfigChange).toBe(Interrupt.ConfigChange);
  expect(env.irq.level).toBe(true);
  expect(env.dev.chains).toEqual([]);
  expect(env.q.usedIdx()).toBe(0);
  expect(env.t.lastError?.message).toMatch(pattern);
  // A broken device ignores further kicks until reset.
  const ignored = env.t.stats.ignoredNotifies;
  env.q.kick();
  expect(env.t.stats.ignoredNotifies).toBe(ignored + 1);
}

function indirectHead(env: Env, q: TestQueue, table: bigint, len: number, flags: number = Indirect): void {
  q.writeDesc(0, { addr: table, len, flags, next: 0 });
  q.publish(0);
}

describe('split virtqueue against a hostile driver', () => {
  it('baseline: a well-formed chain works', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: env.buf, len: 4, flags: Next, next: 1 });
    env.q.writeDesc(1, { addr: env.buf + 64n, len: 4, flags: Write, next: 0 });
    env.q.publish(0);
    env.q.kick();
    expect(env.drv.needsReset()).toBe(false);
    expect(env.q.takeUsed()).toEqual([{ id: 0, len: 4 }]);
  });

  it('a chain that loops', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: env.buf, len: 4, flags: Next, next: 1 });
    env.q.writeDesc(1, { addr: env.buf, len: 4, flags: Next, next: 0 });
    env.q.publish(0);
    expectNeedsReset(env, /loop/);
  });

  it('a self-loop', () => {
    const env = setup();
    env.q.writeDesc(3, { addr: env.buf, len: 4, flags: Next, next: 3 });
    env.q.publish(3);
    expectNeedsReset(env, /loop/);
  });

  it('a next index beyond the queue size', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: env.buf, len: 4, flags: Next, next: 8 });
    env.q.publish(0);
    expectNeedsReset(env, /outside a table of 8/);
  });

  it('a head index beyond the queue size', () => {
    const env = setup();
    env.q.publish(200);
    expectNeedsReset(env, /head descriptor 200/);
  });

  it('a buffer outside guest RAM', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: RAM - 2, len: 4, flags: 0, next: 0 });
    env.q.publish(0);
    expectNeedsReset(env, /not inside guest RAM/);
  });

  it('a buffer far beyond RAM', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: 1n << 50n, len: 1, flags: Write, next: 0 });
    env.q.publish(0);
    expectNeedsReset(env, /not inside guest RAM/);
  });

  it('addr + len overflowing 64 bits', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: (1n << 64n) - 8n, len: 16, flags: 0, next: 0 });
    env.q.publish(0);
    expectNeedsReset(env, /overflows 64 bits/);
  });

  it('a device-readable descriptor after a device-writable one', () => {
    const env = setup();
    env.q.writeDesc(0, { addr: env.buf, len: 4, flags: Write | Next, next: 1 });
    env.q.writeDesc(1, { addr: env.buf, len: 4, flags: 0, next: 0 });
    env.q.publish(0);
    expectNeedsReset(env, /readable descriptor 1 follows a device-writable/);
  });

  it('avail.idx jumping by more than the queue size', () => {
    const env = setup();
    env.q.setAvailIdx(9);
    expectNeedsReset(env, /more than the queue size/);
  });

  it('avail.idx moving backwards (a jump of ~65535)', () => {
    const env = setup();
    env.q.setAvailIdx(0xffff);
    expectNeedsReset(env, /more than the queue size/);
  });

  describe('indirect descriptors', () => {
    it('indirect with the NEXT flag', () => {
      const env = setup();
      indirectHead(env, env.q, env.buf, 32, Indirect | Next);
      expectNeedsReset(env, /also has the NEXT flag/);
    });

    it('a table length that is not a multiple of 16', () => {
      const env = setup();
      indirectHead(env, env.q, env.buf, 24);
      expectNeedsReset(env, /not a positive multiple of 16/);
    });

    it('a zero-length table', () => {
      const env = setup();
      indirectHead(env, env.q, env.buf, 0);
      expectNeedsReset(env, /not a positive multiple of 16/);
    });

    it('a table that is too long', () => {
      const env = setup();
      indirectHead(env, env.q, 0x10000n, (MAX_INDIRECT_ENTRIES + 1) * 16);
      expectNeedsReset(env, /exceeds 1024/);
    });

    it('a table outside guest RAM', () => {
      const env = setup();
      indirectHead(env, env.q, BigInt(RAM - 16), 32);
      expectNeedsReset(env, /indirect table.*not inside guest RAM/);
    });

    it('nested indirect', () => {
      const env = setup();
      env.q.writeDesc(0, { addr: env.buf + 512n, len: 16, flags: Indirect, next: 0 }, env.buf);
      indirectHead(env, env.q, env.buf, 16);
      expectNeedsReset(env, /nested indirect/);
    });

    it('an indirect descriptor that is not the head', () => {
      const env = setup();
      env.q.writeDesc(0, { addr: env.buf, len: 4, flags: Next, next: 1 });
      env.q.writeDesc(1, { addr: env.buf + 512n, len: 16, flags: Indirect, next: 0 });
      env.q.publish(0);
      expectNeedsReset(env, /not the head/);
    });

    it('a loop inside the indirect table', () => {
      const env = setup();
      env.q.writeDesc(0, { addr: env.buf + 1024n, len: 4, flags: Next, next: 1 }, env.buf);
      env.q.writeDesc(1, { addr: env.buf + 1024n, len: 4, flags: Next, next: 0 }, env.buf);
      indirectHead(env, env.q, env.buf, 32);
      expectNeedsReset(env, /loop/);
    });

    it('a next index beyond the indirect table', () => {
      const env = setup();
      env.q.writeDesc(0, { addr: env.buf + 1024n, len: 4, flags: Next, next: 2 }, env.buf);
      indirectHead(env, env.q, env.buf, 32);
      expectNeedsReset(env, /outside a table of 2/);
    });

    it('indirect used without negotiating VIRTIO_RING_F_INDIRECT_DESC', () => {
      const env = setup(Feature.Version1);
      env.q.writeDesc(0, { addr: env.buf + 1024n, len: 4, flags: Write, next: 0 }, env.buf);
      indirectHead(env, env.q, env.buf, 16);
      expectNeedsReset(env, /not negotiated/);
    });

    it('the WRITE flag on the indirect descriptor itself is ignored (spec 2.7.5.3.2)', () => {
      const env = setup();
      env.q.writeDesc(0, { addr: env.buf + 1024n, len: 4, flags: Write, next: 0 }, env.buf);
      indirectHead(env, env.q, env.buf, 16, Indirect | Write);
      env.q.kick();
      expect(env.drv.needsReset()).toBe(false);
      expect(env.q.takeUsed()).toEqual([{ id: 0, len: 0 }]);
    });
  });

  it('chains completed before a bad one are still returned to the driver', () => {
    const env = setup();
    env.q.addChain([{ writable: 1 }]);
    env.q.writeDesc(7, { addr: env.buf, len: 4, flags: Next, next: 7 });
    env.q.publish(7);
    env.q.kick();
    expect(env.drv.needsReset()).toBe(true);
    expect(env.q.takeUsed().length).toBe(1);
  });
});
