import { SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { I8042 } from './i8042.js';
import { RecordingIrq, recordingAccess } from './testing/fakes.js';

const STATUS = 4;
const DATA = 0;

describe('I8042', () => {
  it('maps two one-port views at 0x60 and 0x64, not the ports between', () => {
    const k = new I8042();
    const m = k.mappings();
    expect(m.map((x) => x.range)).toEqual([{ port: 0x60, size: 1 }, { port: 0x64, size: 1 }]);
  });

  it('status after power-on: system flag, keyboard unlocked, output buffer empty', () => {
    const [data, cmd] = new I8042().mappings().map((m) => m.device);
    const a = recordingAccess();
    expect(cmd?.read?.(0, 1, a)).toBe(0x14);
    expect(data?.read?.(0, 1, a)).toBe(0);
  });

  it('0xFE (and any pulse command with bit 0 clear) on the command port requests a reset stop', () => {
    const [, cmd] = new I8042().mappings().map((m) => m.device);
    const a = recordingAccess();
    cmd?.write?.(0, 0xfe, 1, a);
    cmd?.write?.(0, 0xff, 1, a); // bit 0 set: pulses nothing
    cmd?.write?.(0, 0xf0, 1, a);
    expect(a.stops).toEqual([{ reason: 'reset' }, { reason: 'reset' }]);
  });

  it('controller commands answer through the output buffer as Linux expects', () => {
    const k = new I8042();
    const a = recordingAccess();
    const ask = (command: number, operand?: number): number[] => {
      k.write(STATUS, command, 1, a);
      if (operand !== undefined) k.write(DATA, operand, 1, a);
      const out: number[] = [];
      while (k.read(STATUS, 1) & 1) out.push(k.read(DATA, 1));
      return out;
    };
    expect(ask(0xaa)).toEqual([0x55]); // self-test
    expect(ask(0xab)).toEqual([0x00]); // keyboard interface test
    expect(ask(0xa9)).toEqual([0x00]); // aux interface test
    ask(0x60, 0x47); // write config
    expect(ask(0x20)).toEqual([0x47]);
    ask(0xa7); // disable aux → config bit 5
    expect(ask(0x20)).toEqual([0x67]);
    ask(0xa8);
    ask(0xad); // disable keyboard → bit 4
    expect(ask(0x20)).toEqual([0x57]);
    expect(ask(0xd3, 0x5a)).toEqual([0x5a]); // aux loop-back
    expect(ask(0xd2, 0x33)).toEqual([0x33]); // keyboard loop-back
    expect(a.stops).toEqual([]);
  });

  it('with nothing plugged in, a byte for the keyboard or the mouse comes back as 0xFE with the timeout bit', () => {
    const k = new I8042();
    const a = recordingAccess();
    k.write(DATA, 0xf2, 1, a); // GETID to the keyboard
    expect(k.read(STATUS, 1) & 0x61).toBe(0x41); // OBF + timeout, not aux
    expect(k.read(DATA, 1)).toBe(0xfe);
    k.write(STATUS, 0xd4, 1, a);
    k.write(DATA, 0xff, 1, a); // reset to the mouse
    expect(k.read(STATUS, 1) & 0x61).toBe(0x61); // OBF + timeout + aux
    expect(k.read(DATA, 1)).toBe(0xfe);
    k.write(STATUS, 0xd3, 1, a);
    k.write(DATA, 1, 1, a);
    expect(k.read(STATUS, 1) & 0x40).toBe(0); // a loop-back clears the timeout bit
  });

  it('raises IRQ 1 / IRQ 12 while its data waits and the config byte enables it, lowers it on read', () => {
    const kbd = new RecordingIrq(1);
    const aux = new RecordingIrq(12);
    const k = new I8042({ kbdIrq: kbd, auxIrq: aux });
    const a = recordingAccess();
    k.write(DATA, 0xf4, 1, a); // interrupts disabled by the power-on config: no edge
    expect(kbd.level).toBe(false);
    k.read(DATA, 1);
    k.write(STATUS, 0x60, 1, a);
    k.write(DATA, 0x03, 1, a); // KBD_INT | AUX_INT
    k.write(DATA, 0xf4, 1, a);
    expect([kbd.level, aux.level]).toEqual([true, false]);
    k.read(DATA, 1);
    expect(kbd.level).toBe(false);
    k.write(STATUS, 0xd3, 1, a);
    k.write(DATA, 0xa5, 1, a);
    expect([kbd.level, aux.level]).toEqual([false, true]);
    expect(k.read(DATA, 1)).toBe(0xa5);
    expect(aux.level).toBe(false);
  });

  it('snapshot/restore round-trips the queue and operand; reset returns to power-on; bad shapes are rejected', () => {
    const k = new I8042();
    const a = recordingAccess();
    k.write(STATUS, 0x60, 1, a);
    k.write(DATA, 0x11, 1, a);
    k.write(STATUS, 0xd2, 1, a);
    k.write(DATA, 0x99, 1, a);
    k.write(STATUS, 0xd3, 1, a); // operand pending
    const k2 = new I8042();
    k2.restore(JSON.parse(JSON.stringify(k.snapshot())));
    expect(k2.snapshot()).toEqual(k.snapshot());
    k2.write(DATA, 0x42, 1, a);
    expect([k2.read(DATA, 1), k2.read(DATA, 1)]).toEqual([0x99, 0x42]);
    k2.reset();
    expect(k2.snapshot()).toEqual(new I8042().snapshot());
    for (const bad of [{ version: 1, config: 1 }, { ...k.snapshot(), operand: 'x' }, { ...k.snapshot(), output: [{ byte: 300, aux: false }] }, { ...k.snapshot(), output: 'no' }]) {
      expect(() => k2.restore(bad)).toThrow(SnapshotFormatError);
    }
  });
});
