import { InvalidArgumentError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { DebugExit } from './debug-exit.js';
import { recordingAccess } from './testing/fakes.js';

describe('DebugExit', () => {
  it('defaults to port 0xf4, one byte wide', () => {
    const d = new DebugExit();
    expect(DebugExit.defaultPort).toBe(0xf4);
    expect(d.mappings()).toEqual([{ range: { port: 0xf4, size: 1 }, device: d }]);
  });

  it.each([
    [0, 1],
    [1, 3],
    [0x10, 0x21],
    [0xff, 0x1ff],
  ])('write %i → debug-exit code %i (QEMU (v<<1)|1)', (v, code) => {
    const a = recordingAccess();
    new DebugExit().write(0, v, 1, a);
    expect(a.stops).toEqual([{ reason: 'debug-exit', code }]);
  });

  it('truncates to the port width', () => {
    const a = recordingAccess();
    new DebugExit({ size: 1 }).write(0, 0x1234, 2, a);
    new DebugExit({ size: 2 }).write(0, 0x1234, 2, a);
    new DebugExit({ size: 4 }).write(0, 0x12345678, 4, a);
    expect(a.stops.map((s) => (s.reason === 'debug-exit' ? s.code : -1))).toEqual([0x69, 0x2469, 0x2468acf1]);
  });

  it('reads all ones', () => {
    expect(new DebugExit().read(0, 1)).toBe(0xff);
    expect(new DebugExit({ size: 4 }).read(0, 4)).toBe(0xffffffff);
  });

  it('rejects a bad size', () => {
    expect(() => new DebugExit({ size: 3 as never })).toThrow(InvalidArgumentError);
  });
});
