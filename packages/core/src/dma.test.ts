import { describe, expect, it } from 'vitest';
import { DeviceMemory, DmaDeniedError, DmaGate } from './dma.js';
import { GuestMemoryError, InvalidArgumentError } from './errors.js';
import { GuestMemory } from './memory.js';
import { gpa } from './address.js';

function ram(size = 0x10000): GuestMemory {
  const m = new GuestMemory();
  m.addRegion({ slot: 0, start: gpa(0), size, readonly: false, name: 'ram' }, { bytes: new Uint8Array(size), hostAddress: 0n, fd: -1, close() {} });
  return m;
}

describe('DmaGate / DeviceMemory', () => {
  it('one gate per memory; writes pass mediate hooks in order, then observe hooks with what was written', () => {
    const m = ram();
    expect(DmaGate.of(m)).toBe(DmaGate.of(m));
    const log: string[] = [];
    DmaGate.of(m).add({ name: 'a', mediate: (w) => { log.push(`a ${w.device} ${w.address} ${w.length}`); return { verdict: 'replace', data: Uint8Array.of(9, 9) }; } });
    DmaGate.of(m).add({ name: 'b', mediate: () => { log.push('b'); return undefined; }, observe: (w) => log.push(`obs ${[...w.data]}`) });
    new DeviceMemory(m, 'dev').write(0x10n, Uint8Array.of(1, 2));
    expect(log).toEqual(['a dev 16 2', 'obs 9,9']);
    expect(m.readUint(0x10, 2)).toBe(0x0909);
  });

  it('deny leaves RAM untouched and names device, range and hook; out-of-RAM writes never reach hooks', () => {
    const m = ram();
    let calls = 0;
    DmaGate.of(m).add({ name: 'guard', mediate: () => { calls++; return { verdict: 'deny', reason: 'no' }; } });
    const d = new DeviceMemory(m, 'blk');
    const e = (() => { try { d.writeUint(0x20n, 4, 0xdeadbeef); } catch (x) { return x; } return undefined; })();
    expect(e).toBeInstanceOf(DmaDeniedError);
    expect(e).toMatchObject({ device: 'blk', address: 0x20n, length: 4, hook: 'guard' });
    expect(m.readUint(0x20, 4)).toBe(0);
    expect(() => d.write(0xfffen, new Uint8Array(4))).toThrow(GuestMemoryError);
    expect(calls).toBe(1);
  });

  it('counts bytes moved; a bad replacement is a host bug; hooks are validated', () => {
    const m = ram();
    const d = new DeviceMemory(m, 'x');
    d.read(0n, 10);
    d.write(0n, new Uint8Array(6));
    expect(d.bytesMoved).toBe(16);
    const off = DmaGate.of(m).add({ name: 'bad', mediate: () => ({ verdict: 'replace', data: new Uint8Array(1) }) });
    expect(() => d.write(0n, new Uint8Array(2))).toThrow(InvalidArgumentError);
    off();
    expect(DmaGate.of(m).active).toBe(false);
    expect(() => DmaGate.of(m).add({ name: 'empty' })).toThrow(InvalidArgumentError);
    expect(() => new DeviceMemory(m, '')).toThrow(InvalidArgumentError);
  });
});
