import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend } from './testing/mock.js';
import { InvalidArgumentError, TsvmError } from './errors.js';
import { Bus } from './bus.js';

const MiB = 1024 * 1024;

async function machine(): Promise<Machine> {
  return Machine.create({ memory: 2 * MiB, backend: new MockBackend(), irqchip: true });
}

/** Calls `f`; passes when it returns (or resolves) or throws a TsvmError; fails on anything else. */
async function onlyTyped(f: () => unknown): Promise<void> {
  try {
    await f();
  } catch (e) {
    if (!(e instanceof TsvmError)) throw new Error(`untyped ${(e as Error)?.constructor?.name}: ${(e as Error)?.message}`, { cause: e });
  }
}

describe('wrong-typed arguments at the public boundary are InvalidArgumentErrors', () => {
  it.each([
    ['memory.write(addr, null)', (m: Machine) => m.memory.write(0x1000, null as never)],
    ['memory.write(null, data)', (m: Machine) => m.memory.write(null as never, new Uint8Array(1))],
    ['memory.readInto(addr, {})', (m: Machine) => m.memory.readInto(0, {} as never)],
    ['memory.writeUint(addr, 3, 1)', (m: Machine) => m.memory.writeUint(0, 3 as never, 1)],
    ['memory.writeUint(addr, 1, 0x100)', (m: Machine) => m.memory.writeUint(0, 1, 0x100)],
    ['memory.writeU64(addr, 1)', (m: Machine) => m.memory.writeU64(0, 1 as never)],
    ['memory.fill(addr, 1, 256)', (m: Machine) => m.memory.fill(0, 1, 256)],
    ['memory.readCString(Symbol())', (m: Machine) => m.memory.readCString(Symbol('x') as never)],
    ['vcpu.setSregs(null)', (m: Machine) => m.vcpu(0).setSregs(null as never)],
    ['vcpu.setSregs({ ...sregs, cr0: 1 })', (m: Machine) => m.vcpu(0).setSregs({ ...m.vcpu(0).getSregs(), cr0: 1 as never })],
    ['vcpu.setRegs(null)', (m: Machine) => m.vcpu(0).setRegs(null as never)],
    ['vcpu.setMsrs([{ index: 1, data: 1 }])', (m: Machine) => m.vcpu(0).setMsrs([{ index: 1, data: 1 as never }])],
    ['vcpu.getMsrs("x")', (m: Machine) => m.vcpu(0).getMsrs('x' as never)],
    ['vcpu.setCpuid([null])', (m: Machine) => m.vcpu(0).setCpuid([null as never])],
    ['vcpu.setGuestDebug(1.5)', (m: Machine) => m.vcpu(0).setGuestDebug(1.5)],
    ["enter({ rip: 'x' })", (m: Machine) => m.enter({ mode: 'long64', rip: 'x', registers: {} } as never)],
    ['enter({ registers: { rsi: 1 } })', (m: Machine) => m.enter({ mode: 'long64', rip: 0x1000n, registers: { rsi: 1 } } as never)],
    ['addRegion(null)', (m: Machine) => m.addRegion(null as never)],
    ['attach(null, dev)', (m: Machine) => m.attach(null as never, { name: 'd' })],
    ['attachDevice(null)', (m: Machine) => m.attachDevice(null as never)],
    ['coalesce(null)', (m: Machine) => m.coalesce(null as never)],
    ['setRegionFlags(0, null)', (m: Machine) => m.setRegionFlags(0, null as never)],
    ['interceptMsrs([1.5], [])', (m: Machine) => m.interceptMsrs([1.5], [])],
    ['irqLine(Symbol())', (m: Machine) => m.irqLine(Symbol('x') as never)],
    ['vcpu(Symbol())', (m: Machine) => m.vcpu(Symbol('x') as never)],
    ['io.register(null, dev)', (m: Machine) => m.io.register(null as never, { name: 'd' })],
    ['io.find(1)', (m: Machine) => m.io.find(1 as never)],
  ])('%s', async (_n, f) => {
    const m = await machine();
    expect(() => f(m)).toThrow(InvalidArgumentError);
    await m.close();
  });

  it('run(null) rejects with InvalidArgumentError', async () => {
    const m = await machine();
    await expect(m.run(null as never)).rejects.toBeInstanceOf(InvalidArgumentError);
    await m.close();
  });
});

// Every public method with arguments, called with arbitrary values: only TsvmError subclasses may
// come out (or nothing). `close` and the lifecycle are excluded; `run` is exercised with options.
const arb = fc.oneof(
  fc.anything({ withBigInt: true, withTypedArray: true, withNullPrototype: true, withMap: true, withSet: true }),
  fc.bigInt(), fc.integer(), fc.double(), fc.constant(null), fc.constant(undefined), fc.constant(Symbol('s')),
  fc.uint8Array({ maxLength: 16 }),
);
const args = fc.array(arb, { maxLength: 4 });

const TARGETS: Array<[string, (m: Machine) => object, readonly string[]]> = [
  ['Machine', (m) => m, ['vcpu', 'addRegion', 'removeRegion', 'dirtyPages', 'loadFlat', 'enter', 'irqLine', 'attach', 'attachDevice', 'addHook', 'coalesce', 'setRegionFlags', 'interceptMsrs', 'run']],
  ['GuestMemory', (m) => m.memory, ['contains', 'regionAt', 'read', 'readInto', 'write', 'fill', 'readUint', 'readU64', 'writeUint', 'writeU64', 'readCString', 'addRegion', 'removeRegion']],
  ['Vcpu', (m) => m.vcpu(0), ['setRegs', 'setSregs', 'getMsrs', 'setMsrs', 'setCpuid', 'setGuestDebug']],
  ['Bus', (m) => m.io, ['register', 'find']],
  ['Bus (mmio)', () => new Bus('mmio'), ['register', 'find']],
];

describe('property: arbitrary values thrown at public methods only ever produce TsvmErrors', () => {
  it.each(TARGETS)('%s', async (_name, target, methods) => {
    const m = await machine();
    const obj = target(m) as Record<string, (...a: unknown[]) => unknown>;
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...methods), args, async (method, a) => {
        await onlyTyped(() => (obj[method] as (...x: unknown[]) => unknown).apply(obj, a));
      }),
      { numRuns: Number(process.env.TSVM_PROPERTY_RUNS ?? 300) },
    );
    await m.close();
  });
});
