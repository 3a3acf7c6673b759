// Property: whatever the guest puts in RAM and whatever it writes to the registers, the
// transport and the device models behind it never throw out of read/write.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { recordingAccess, RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { VirtioMmioTestDriver } from '../testing/virtio-driver.js';
import { VirtioBlock } from './block.js';
import { VirtioConsole } from './console.js';
import { MmioReg } from './constants.js';
import type { VirtioDevice } from './device.js';
import { VirtioMmio } from './mmio.js';
import { VirtioRng } from './rng.js';

const RAM = 64 * 1024;

const models: [string, () => VirtioDevice][] = [
  ['block', () => new VirtioBlock({ buffer: new Uint8Array(16 * 512), serial: 'p' })],
  ['console', () => new VirtioConsole({ sink: () => {}, output: { autoFlush: false } })],
  ['rng', () => new VirtioRng({ source: (b) => b.fill(7) })],
];

const registerOffsets = Object.values(MmioReg);
const offsetArb = fc.oneof(
  fc.constantFrom(...registerOffsets),
  fc.integer({ min: 0, max: 0x1ff }),
);
const valueArb = fc.oneof(
  fc.integer({ min: 0, max: 0xffffffff }),
  fc.constantFrom(0, 1, 2, 4, 8, 0x0f, 0x40, 0x80, 0xff, 0x1000, RAM - 16, 0xffffffff),
  fc.integer({ min: 0, max: 16 }),
);
const sizeArb = fc.constantFrom(1 as const, 2 as const, 4 as const);

type Op =
  | { kind: 'write'; offset: number; value: number; size: 1 | 2 | 4 }
  | { kind: 'read'; offset: number; size: 1 | 2 | 4 }
  | { kind: 'poke'; address: number; bytes: Uint8Array }
  | { kind: 'kick'; queue: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ kind: fc.constant('write' as const), offset: offsetArb, value: valueArb, size: sizeArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('read' as const), offset: offsetArb, size: sizeArb }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('poke' as const), address: fc.integer({ min: 0, max: RAM - 64 }), bytes: fc.uint8Array({ minLength: 1, maxLength: 64 }) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('kick' as const), queue: fc.integer({ min: 0, max: 2 }) }) },
);

function run(model: () => VirtioDevice, seedRam: Uint8Array, init: boolean, ops: readonly Op[]): VirtioMmio {
  const memory = testGuestMemory(RAM);
  memory.write(0, seedRam);
  const access = recordingAccess('mmio');
  const t = new VirtioMmio({ device: model(), memory, irq: new RecordingIrq() });
  const drv = new VirtioMmioTestDriver(t, memory, { access });
  if (init) drv.init();
  for (const op of ops) {
    switch (op.kind) {
      case 'write': t.write(op.offset, op.value, op.size, access); break;
      case 'read': t.read(op.offset, op.size, access); break;
      case 'poke': memory.write(op.address, op.bytes); break;
      case 'kick': t.write(MmioReg.QueueNotify, op.queue, 4, access); break;
    }
  }
  // A host bug would have surfaced as a device-error stop request: there must be none.
  expect(access.stops).toEqual([]);
  return t;
}

describe.each(models)('virtio-mmio %s under random input', (_name, model) => {
  it('random RAM + random register traffic never throws', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 4096 }), fc.array(opArb, { maxLength: 60 }), (ram, ops) => {
        expect(() => run(model, ram, false, ops)).not.toThrow();
      }),
      { numRuns: 300 },
    );
  });

  it('an initialised device with scribbled rings never throws', () => {
    // The driver's rings live from 0x1000; aim pokes there so chains are actually parsed.
    const ringPoke = fc.record({
      kind: fc.constant('poke' as const),
      address: fc.integer({ min: 0x1000, max: 0x1000 + 8 * 1024 }),
      bytes: fc.uint8Array({ minLength: 1, maxLength: 32 }),
    });
    const ops = fc.array(fc.oneof({ weight: 4, arbitrary: ringPoke }, { weight: 4, arbitrary: fc.record({ kind: fc.constant('kick' as const), queue: fc.integer({ min: 0, max: 1 }) }) }, { weight: 1, arbitrary: opArb }), { maxLength: 80 });
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 2048 }), ops, (ram, list) => {
        const t = run(model, ram, true, list);
        const status = t.status;
        expect(status & ~0xff).toBe(0);
      }),
      { numRuns: 300 },
    );
  });
});
