import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend, inExit, mmioExit, outExit, type MockStep } from './testing/mock.js';
import { InvalidArgumentError } from './errors.js';
import type { VcpuExit } from './exits.js';
import type { ExitHook, HookDecision } from './hooks.js';

const MiB = 1024 * 1024;

async function run(exit: VcpuExit, decision: () => unknown) {
  const backend = new MockBackend();
  const vcpu = backend.script(exit as MockStep, { kind: 'hlt' });
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', read: () => 1, write: () => {} });
  vm.mmio.register({ address: 0x10000000n, size: 0x1000 }, { name: 'dev', read: () => 1, write: () => {} });
  const hook: ExitHook = { name: 'picky', mode: 'mediate', matches: (e) => e.kind !== 'hlt', handle: () => decision() as HookDecision };
  vm.addHook(hook);
  const stop = await vm.run({ timeout: 2000 });
  await vm.close();
  return { stop, vcpu };
}

const rdmsr: VcpuExit = { kind: 'msr', direction: 'read', index: 0x10, data: 0n, reason: 0 };
const bad: Array<[string, VcpuExit, unknown]> = [
  ['emulate(1.5) on an in', inExit(0x60), { verdict: 'emulate', value: 1.5 }],
  ['emulate(NaN) on an in', inExit(0x60), { verdict: 'emulate', value: NaN }],
  ['emulate without a value', inExit(0x60), { verdict: 'emulate' }],
  ['emulate(0x100) on a 1-byte in', inExit(0x60), { verdict: 'emulate', value: 0x100 }],
  ['emulate(-1) on a 1-byte in', inExit(0x60), { verdict: 'emulate', value: -1 }],
  ['emulate(0x1_0000) on a 2-byte in', inExit(0x60, 2), { verdict: 'emulate', value: 0x1_0000 }],
  ['emulate(2^32) on a 4-byte MMIO read', mmioExit(0x10000000n, 4), { verdict: 'emulate', value: 2 ** 32 }],
  ['emulate(2^64) on an MSR read', rdmsr, { verdict: 'emulate', value: 1n << 64n }],
  ['emulate("1") on an MSR read', rdmsr, { verdict: 'emulate', value: '1' }],
  ['emulate(1.5) on an out', outExit(0x60, 1), { verdict: 'emulate', value: 1.5 }],
  ['a verdict nobody knows', outExit(0x60, 1), { verdict: 'maybe' }],
  ['a deny with an unknown effect', outExit(0x60, 1), { verdict: 'deny', effect: 'explode' }],
  ['a deny with a non-string reason', outExit(0x60, 1), { verdict: 'deny', reason: 42 }],
  ['a bare number', outExit(0x60, 1), 7],
  ['a string', outExit(0x60, 1), 'allow'],
];

describe('a malformed hook decision is a hook-error stop naming the hook, never a raw RangeError/TypeError from run()', () => {
  it.each(bad)('%s (sync)', async (_name, exit, decision) => {
    const { stop, vcpu } = await run(exit, () => decision);
    expect(stop).toMatchObject({ reason: 'hook-error', hook: 'picky', error: expect.any(InvalidArgumentError) });
    expect(vcpu.reads).toEqual([]); // nothing was completed with a truncated value
    expect(vcpu.msrs).toEqual([]);
  });

  it.each(bad)('%s (async)', async (_name, exit, decision) => {
    const { stop } = await run(exit, async () => decision);
    expect(stop).toMatchObject({ reason: 'hook-error', hook: 'picky', error: expect.any(InvalidArgumentError) });
  });

  it('values at the edge of each width are accepted', async () => {
    expect((await run(inExit(0x60), () => ({ verdict: 'emulate', value: 0xff }))).vcpu.reads).toEqual([new Uint8Array([0xff])]);
    expect((await run(inExit(0x60, 4), () => ({ verdict: 'emulate', value: 0xffff_ffff }))).vcpu.reads).toEqual([new Uint8Array([0xff, 0xff, 0xff, 0xff])]);
    expect((await run(rdmsr, () => ({ verdict: 'emulate', value: (1n << 64n) - 1n }))).vcpu.msrs).toEqual([{ data: (1n << 64n) - 1n, error: false }]);
  });

  it('two async hooks in a row are both awaited (the second outcome is not mistaken for resume)', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script(inExit(0x60), { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', read: () => 1 });
    vm.addHook({ name: 'a', mode: 'mediate', matches: (e) => e.kind === 'io', handle: async () => ({ verdict: 'allow' }) });
    vm.addHook({ name: 'b', mode: 'mediate', matches: (e) => e.kind === 'io', handle: async () => ({ verdict: 'emulate', value: 0x2a }) });
    expect((await vm.run({ timeout: 2000 })).reason).toBe('halt');
    expect(vcpu.reads).toEqual([new Uint8Array([0x2a])]);
    await vm.close();
  });
});

describe('string I/O (rep insb/outsb): one exit, count elements, one decision for all of them', () => {
  const insb: VcpuExit = { kind: 'io', direction: 'in', port: 0x60, size: 1, count: 1024, data: new Uint8Array(0) };
  const outsw: VcpuExit = { kind: 'io', direction: 'out', port: 0x60, size: 2, count: 3, data: new Uint8Array([1, 0, 2, 0, 3, 0]) };

  async function withHook(exit: VcpuExit, decision: HookDecision) {
    const backend = new MockBackend();
    const vcpu = backend.script(exit, { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    const written: number[] = [];
    vm.io.register({ port: 0x60, size: 2 }, { name: 'dev', read: () => 7, write: (_o, v) => { written.push(v); } });
    const seen: number[] = [];
    const hook: ExitHook = { name: 'h', mode: 'mediate', matches: (e) => e.kind === 'io', handle: (e) => { if (e.kind === 'io') seen.push(e.count); return decision; } };
    vm.addHook(hook);
    const stop = await vm.run({ timeout: 2000 });
    const stats = vm.hookStats().get(hook);
    await vm.close();
    return { stop, vcpu, written, seen, stats };
  }

  it('the hook sees the count and its stats record every element', async () => {
    const r = await withHook(insb, undefined);
    expect(r.seen).toEqual([1024]);
    expect(r.stats).toMatchObject({ calls: 1, elements: 1024 });
    expect(r.vcpu.reads[0]).toEqual(new Uint8Array(1024).fill(7));
  });

  it('emulate fills every element; deny-ignore reads all ones for every element and drops every write', async () => {
    expect((await withHook(insb, { verdict: 'emulate', value: 0x33 })).vcpu.reads[0]).toEqual(new Uint8Array(1024).fill(0x33));
    expect((await withHook(insb, { verdict: 'deny', effect: 'ignore' })).vcpu.reads[0]).toEqual(new Uint8Array(1024).fill(0xff));
    const w = await withHook(outsw, { verdict: 'deny', effect: 'ignore' });
    expect(w.written).toEqual([]);
    expect(w.stop.reason).toBe('halt');
    expect((await withHook(outsw, { verdict: 'emulate', value: 0 })).written).toEqual([]);
    expect((await withHook(outsw, undefined)).written).toEqual([1, 2, 3]);
  });

  it('deny-gp faults the instruction once (no element reached the device); deny-stop names the count', async () => {
    const g = await withHook(outsw, { verdict: 'deny', effect: 'gp' });
    expect(g.vcpu.faults).toEqual([{ vector: 13, errorCode: 0, rip: 0xfff0n }]);
    expect(g.written).toEqual([]);
    const s = await withHook(outsw, { verdict: 'deny' });
    expect(s.stop).toMatchObject({ reason: 'violation' });
    if (s.stop.reason === 'violation') expect(s.stop.violation.message).toMatch(/x3/);
  });
});

describe('every hook failure mode is a hook-error, every device misfit a device-error', () => {
  it('a throwing matches() (mediate and observe) is that hook\'s hook-error', async () => {
    for (const mode of ['mediate', 'observe'] as const) {
      const backend = new MockBackend();
      backend.script(outExit(0x60, 1), { kind: 'hlt' });
      const vm = await Machine.create({ memory: 2 * MiB, backend });
      vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', write: () => {} });
      vm.addHook({ name: 'bad-filter', mode, matches: () => { throw new TypeError('filter'); }, handle: () => undefined });
      expect(await vm.run({ timeout: 2000 })).toMatchObject({ reason: 'hook-error', hook: 'bad-filter' });
      await vm.close();
    }
  });

  it('a thenable that is not a Promise is awaited like one', async () => {
    const { stop, vcpu } = await run(inExit(0x60), () => ({ then: (ok: (d: HookDecision) => void) => ok({ verdict: 'emulate', value: 9 }) }));
    expect(stop.reason).toBe('halt');
    expect(vcpu.reads).toEqual([new Uint8Array([9])]);
  });

  it("a thenable that also says verdict 'allow' is still awaited: its settled decision counts, not the allow", async () => {
    const { stop, vcpu } = await run(inExit(0x60), () => ({ verdict: 'allow', then: (ok: (d: HookDecision) => void) => ok({ verdict: 'emulate', value: 7 }) }));
    expect(stop.reason).toBe('halt');
    expect(vcpu.reads).toEqual([new Uint8Array([7])]);
  });

  it.each([[0x100], [-1], [1.5], [undefined], ['1']])('a device read() returning %j for a 1-byte in is a device-error, not a truncated value', async (v) => {
    const backend = new MockBackend();
    const vcpu = backend.script(inExit(0x61), { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.io.register({ port: 0x61, size: 1 }, { name: 'odd', read: () => v as number });
    expect(await vm.run({ timeout: 2000 })).toMatchObject({ reason: 'device-error', device: 'odd', error: expect.any(InvalidArgumentError) });
    expect(vcpu.reads).toEqual([]);
    await vm.close();
  });
});
