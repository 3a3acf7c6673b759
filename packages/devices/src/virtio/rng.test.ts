import { describe, expect, it } from 'vitest';
import { MmioReg } from './constants.js';
import { attach } from './devices.fixture.js';
import { MAX_ENTROPY_PER_REQUEST, VirtioRng } from './rng.js';

describe('VirtioRng', () => {
  it('is device 4 and fills writable buffers from the injected source', () => {
    const { drv, memory } = attach(new VirtioRng({ source: (b) => b.fill(0xab) }));
    expect(drv.read32(MmioReg.DeviceId)).toBe(4);
    const q = drv.queue(0);
    const { addrs } = q.addChain([{ writable: 8 }, { writable: 8 }]);
    q.kick();
    expect(q.takeUsed()).toEqual([{ id: 0, len: 16 }]);
    expect([...memory.read(addrs[1] as bigint, 8)]).toEqual(new Array(8).fill(0xab));
  });

  it('uses host entropy by default', () => {
    const { drv, memory } = attach(new VirtioRng());
    const q = drv.queue(0);
    const { addrs } = q.addChain([{ writable: 64 }]);
    q.kick();
    expect(memory.read(addrs[0] as bigint, 64).some((b) => b !== 0)).toBe(true);
  });

  it('caps one request and ignores readable buffers', () => {
    const { drv } = attach(new VirtioRng({ source: (b) => b.fill(1) }));
    const q = drv.queue(0);
    q.addChain([{ data: new Uint8Array(4) }, { writable: MAX_ENTROPY_PER_REQUEST + 100 }]);
    q.kick();
    expect(q.takeUsed()).toEqual([{ id: 0, len: MAX_ENTROPY_PER_REQUEST }]);
  });
});
