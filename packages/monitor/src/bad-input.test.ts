import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Machine } from '@tsvm/core';
import { MockBackend, inExit, outExit, type MockStep } from '@tsvm/core/testing';
import { Monitor } from './monitor.js';
import { allow, deny, emulate } from './decisions.js';
import { AuditLog } from './audit.js';
import type { EventSpec } from './events.js';

const MiB = 1024 * 1024;

async function setup(...steps: MockStep[]) {
  const backend = new MockBackend();
  backend.script(...steps);
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
  return { vm, mon: new Monitor(vm) };
}

describe('bad input', () => {
  it('a mediate hook that throws stops the machine with hook-error, the error kept as cause; the process lives on', async () => {
    const { vm, mon } = await setup(outExit(0x3f8, 1), { kind: 'hlt' });
    const boom = new Error('boom');
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => { throw boom; }, { name: 'thrower' });
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'hook-error', hook: 'thrower' });
    if (stop.reason === 'hook-error') expect(stop.error).toBe(boom);
    expect((await vm.run()).reason).toBe('halt'); // the machine is still usable
  });

  it('an observe hook that throws, a rejected Promise, and a malformed decision all stop with hook-error', async () => {
    const a = await setup(outExit(0x3f8, 1));
    a.mon.observe({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => { throw new RangeError('observer'); });
    expect(await a.vm.run()).toMatchObject({ reason: 'hook-error', error: expect.any(RangeError) });
    const b = await setup(outExit(0x3f8, 1));
    b.mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, async () => { throw new Error('async boom'); });
    expect(await b.vm.run()).toMatchObject({ reason: 'hook-error', error: expect.objectContaining({ message: 'async boom' }) });
    const c = await setup(outExit(0x3f8, 1));
    c.mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => ({ verdict: 'maybe' }) as never);
    const s = await c.vm.run();
    expect(s).toMatchObject({ reason: 'hook-error', error: expect.any(InvalidArgumentError) });
    if (s.reason === 'hook-error') expect((s.error as Error).message).toMatch(/decision\.verdict: must be 'allow', 'deny' or 'emulate'/);
  });

  it('a mediate hook that never settles is bounded by the run timeout', async () => {
    const { vm, mon } = await setup(outExit(0x3f8, 1), { kind: 'hlt' });
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => new Promise(() => {}));
    const t0 = performance.now();
    const stop = await vm.run({ timeout: 100 });
    expect(stop.reason).toBe('timeout');
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  it('async hooks that do settle are awaited, in order', async () => {
    const { vm, mon } = await setup(outExit(0x3f8, 1), { kind: 'hlt' });
    const order: string[] = [];
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, async () => { await new Promise((r) => setTimeout(r, 5)); order.push('a'); return allow(); });
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff] }, () => { order.push('b'); return allow(); });
    expect((await vm.run({ timeout: 1000 })).reason).toBe('halt');
    expect(order).toEqual(['a', 'b']);
  });

  it.each([
    [{ event: 'pio', ports: [0x3f8] }, /spec\.ports: must be an inclusive/],
    [{ event: 'pio', ports: [0x3ff, 0x3f8] }, /below first/],
    [{ event: 'pio', ports: [0, 0x10000] }, /spec\.ports\[1\]/],
    [{ event: 'pio', ports: [1, 2], direction: 'sideways' }, /spec\.direction/],
    [{ event: 'msr', indices: [] }, /spec\.indices/],
    [{ event: 'exec', address: -1 }, /spec\.address/],
    [{ event: 'exec', address: 0x4000_0000 }, /not guest RAM/],
    [{ event: 'teleport' }, /spec\.event: must be one of/],
    [{ event: 'step', cpl: 1 }, /spec\.cpl/],
  ])('refuses the spec %j with InvalidArgumentError naming the field', async (spec, msg) => {
    const { mon } = await setup();
    const f = (): unknown => mon.observe(spec as unknown as EventSpec, () => {});
    expect(f).toThrow(InvalidArgumentError);
    expect(f).toThrow(msg);
  });

  it('refuses a non-function hook and a closed monitor', async () => {
    const { mon } = await setup();
    expect(() => mon.mediate({ event: 'halt' }, 42 as never)).toThrow(/fn: must be a function/);
    mon.close();
    mon.close();
    expect(() => mon.mediate({ event: 'halt' }, () => allow())).toThrow(/closed/);
  });

  it.each([
    ['emulate(1.5)', () => emulate(1.5)],
    ['emulate(NaN)', () => emulate(NaN)],
    ['emulate() without a value', () => (emulate as (v?: number) => unknown)()],
    ['emulate(0x100) for a 1-byte in', () => emulate(0x100)],
    ['emulate(-1) for a 1-byte in', () => emulate(-1)],
    ['a hand-made decision with a fractional value', () => ({ verdict: 'emulate', value: 0.5 })],
    ['deny with an unknown effect', () => deny({ effect: 'explode' as never })],
  ])('%s stops with hook-error naming the hook (sync and async), never a raw RangeError', async (_n, make) => {
    for (const wrap of [(f: () => unknown) => f, (f: () => unknown) => async () => f()]) {
      const backend = new MockBackend();
      backend.script(inExit(0x60), { kind: 'hlt' });
      const vm = await Machine.create({ memory: 2 * MiB, backend });
      vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', read: () => 0 });
      const mon = new Monitor(vm);
      mon.mediate({ event: 'pio', ports: [0x60, 0x60] }, wrap(make) as never, { name: 'kbd-filter' });
      const stop = await vm.run({ timeout: 2000 });
      expect(stop).toMatchObject({ reason: 'hook-error', hook: expect.stringContaining('kbd-filter'), error: expect.any(InvalidArgumentError) });
      await vm.close();
    }
  });

  it('a rep insb exit is one decision for all its elements: the hook sees count, the audit line records it, emulate fills every element', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script({ kind: 'io', direction: 'in', port: 0x60, size: 1, count: 300, data: new Uint8Array(0) }, { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    const lines: string[] = [];
    const mon = new Monitor(vm, { audit: new AuditLog(lines) });
    const counts: number[] = [];
    mon.mediate({ event: 'pio', ports: [0x60, 0x60] }, (ev) => { if (ev.event === 'pio') counts.push(ev.count); return emulate(0x5a); }, { name: 'kbd' });
    expect((await vm.run({ timeout: 2000 })).reason).toBe('halt');
    expect(counts).toEqual([300]);
    expect(vcpu.reads[0]).toEqual(new Uint8Array(300).fill(0x5a));
    expect(JSON.parse(lines[0] as string)).toMatchObject({ event: 'pio', decision: 'emulate', count: 300 });
    await vm.close();
  });
});

describe('explainInternalError', () => {
  it('disassembles KVM\'s bytes when it reported them, else the code read at RIP', async () => {
    const { explainInternalError } = await import('./decode.js');
    const base = { reason: 'internal-error', suberror: 1, message: 'KVM internal error, suberror 1', data: [], rip: 0x1000n, vcpu: 0, exits: 1, elapsedMs: 1, bitness: 64 } as const;
    expect(explainInternalError({ ...base, instruction: new Uint8Array([0xcc]), code: new Uint8Array([0x90]) })).toMatch(/at 0x1000: int3 \[cc\] \(bytes from KVM\)/);
    expect(explainInternalError({ ...base, instruction: undefined, code: new Uint8Array([0x0f, 0x0b, 0x90]) })).toMatch(/ud2 \[0f 0b\] \(bytes read at RIP\)/);
    expect(explainInternalError({ ...base, instruction: undefined, code: new Uint8Array(0) })).toMatch(/code unreadable/);
  });
});
