import { describe, expect, it } from 'vitest';
import { Bus } from './bus.js';
import { InvalidArgumentError } from './errors.js';
import { RESERVED_PORTS } from './reserved.js';

const dev = (name: string) => ({ name, write: () => {} });

describe('Bus', () => {
  it('rejects zero-sized, out-of-space and overlapping ranges, naming both devices', () => {
    const bus = new Bus('pio');
    bus.register({ port: 0x3f8, size: 8 }, dev('uart'));
    expect(() => bus.register({ port: 0x3fc, size: 2 }, dev('other'))).toThrow(/'other' overlaps 'uart'/);
    expect(() => bus.register({ port: 0x10, size: 0 }, dev('z'))).toThrow(InvalidArgumentError);
    expect(() => bus.register({ port: 0xffff, size: 2 }, dev('edge'))).toThrow(/outside the pio space/);
    expect(() => bus.register({ address: 0x1000n, size: 1 }, dev('wrong-shape'))).toThrow(/PIO ranges/);
  });

  it.each(RESERVED_PORTS.map((r) => [r.owner, r.port] as const))("refuses tsvm's reserved %s port 0x%s to a device, and gives it to its owner", (owner, port) => {
    const bus = new Bus('pio');
    expect(() => bus.register({ port: port - 1, size: 4 }, dev('greedy'))).toThrow(new RegExp(`reserved port 0x${port.toString(16)} \\(${owner}`));
    expect(bus.find(BigInt(port))).toBeUndefined();
    bus.register({ port, size: 1 }, dev(owner), { claim: owner });
    expect(bus.find(BigInt(port))?.device.name).toBe(owner);
  });

  it('reserves nothing on the MMIO bus', () => {
    const bus = new Bus('mmio');
    expect(() => bus.register({ address: 0xe5n, size: 1 }, dev('low-mmio'))).not.toThrow();
  });
});

describe('sealing', () => {
  it('refuses devices after seal, but not the reserved port tsvm claims for itself (no order trap for loadFlat)', () => {
    const bus = new Bus('pio');
    bus.seal();
    expect(() => bus.register({ port: 0x3f8, size: 8 }, dev('late'))).toThrow(/sealed/);
    expect(() => bus.register({ port: 0xee0, size: 1 }, dev('tsvm-exception-reporter'), { claim: 'exception' })).not.toThrow();
  });
});

describe('findNumber (the exit path lookup)', () => {
  it('finds the same entry as find for every port and access size, also after an unregister', () => {
    const bus = new Bus('pio');
    bus.register({ port: 0x60, size: 1 }, dev('kbd'));
    const drop = bus.register({ port: 0x3f8, size: 8 }, dev('uart'));
    bus.register({ port: 0x500, size: 4 }, dev('sink'));
    // Every port and size: the mismatches, collected (one expect per lookup would be slow).
    const same = (): void => {
      const bad: string[] = [];
      for (let p = 0; p < 0x10000; p++) {
        for (const size of [1, 2, 4]) {
          const sp = bus.findNumber(p, size);
          if (sp?.entry !== bus.find(BigInt(p), size) || (sp && sp.lo !== Number(sp.entry.start))) bad.push(`${p}/${size}`);
        }
      }
      expect(bad).toEqual([]);
    };
    same();
    expect(bus.findNumber(0x3fb, 4)?.entry.device.name).toBe('uart');
    expect(bus.findNumber(0x3fe, 4)).toBeUndefined(); // runs past the end
    drop();
    same();
    expect(bus.findNumber(0x3f8, 1)).toBeUndefined();
  });

  it('finds MMIO ranges high in the 52-bit space exactly', () => {
    const bus = new Bus('mmio');
    bus.register({ address: 0xf_ffff_ffff_f000n, size: 0x1000 }, dev('top'));
    expect(bus.findNumber(0xf_ffff_ffff_fffc, 4)?.entry.device.name).toBe('top');
    expect(bus.findNumber(0xf_ffff_ffff_fffd, 4)).toBeUndefined();
    expect(bus.findNumber(0xf_ffff_ffff_efff, 1)).toBeUndefined();
  });
});
