import { SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { I8042 } from './i8042.js';
import { recordingAccess } from './testing/fakes.js';

describe('I8042', () => {
  it('maps two one-port views at 0x60 and 0x64, not the ports between', () => {
    const k = new I8042();
    const m = k.mappings();
    expect(m.map((x) => [x.base, x.size])).toEqual([[0x60n, 1], [0x64n, 1]]);
  });

  it('status reads a sane value, data reads 0', () => {
    const [data, cmd] = new I8042().mappings().map((m) => m.device);
    const a = recordingAccess();
    expect(cmd?.read?.(0, 1, a)).toBe(0x14); // system flag, keyboard unlocked, output buffer empty
    expect(data?.read?.(0, 1, a)).toBe(0);
  });

  it('0xFE on the command port requests a reset stop', () => {
    const [, cmd] = new I8042().mappings().map((m) => m.device);
    const a = recordingAccess();
    cmd?.write?.(0, 0xfe, 1, a);
    expect(a.stops).toEqual([{ reason: 'reset' }]);
  });

  it('self test and config byte round-trip through the views', () => {
    const k = new I8042();
    const [data, cmd] = k.mappings().map((m) => m.device);
    const a = recordingAccess();
    cmd?.write?.(0, 0xaa, 1, a);
    expect((cmd?.read?.(0, 1, a) ?? 0) & 1).toBe(1);
    expect(data?.read?.(0, 1, a)).toBe(0x55);
    cmd?.write?.(0, 0x60, 1, a);
    data?.write?.(0, 0x47, 1, a);
    cmd?.write?.(0, 0x20, 1, a);
    expect(data?.read?.(0, 1, a)).toBe(0x47);
    expect(a.stops).toEqual([]);
  });

  it('snapshot/restore and reset', () => {
    const k = new I8042();
    const a = recordingAccess();
    k.write(4, 0x60, 1, a);
    k.write(0, 0x11, 1, a);
    const k2 = new I8042();
    k2.restore(JSON.parse(JSON.stringify(k.snapshot())));
    k2.write(4, 0x20, 1, a);
    expect(k2.read(0, 1)).toBe(0x11);
    k2.reset();
    expect(k2.snapshot()).toEqual(new I8042().snapshot());
    expect(() => k2.restore({ version: 1, config: 1 })).toThrow(SnapshotFormatError);
  });
});
