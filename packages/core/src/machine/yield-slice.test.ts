// yieldSlice(): a device that hands work to another machine ends the running slice after the
// exit in progress, so the other machine's run loop runs next (MockBackend; the KVM version with
// a halted receiver is devices/src/net/wake.kvm.test.ts).
import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { MockBackend, outExit, type MockVcpu } from '../testing/mock.js';
import { yieldSlice } from './run-loop.js';

const MiB = 1024 * 1024;

/** A mock machine spinning on `out port` whose port device logs `name:n` and may yield. */
async function spinner(name: string, port: number, log: string[], yieldAt: (n: number) => boolean) {
  const backend = new MockBackend();
  backend.script().whenEmpty = outExit(port, 1);
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  let n = 0;
  vm.attach({ port, size: 1 }, { name: `${name}-port`, write: () => { n++; log.push(`${name}:${n}`); if (yieldAt(n)) yieldSlice(); } });
  const perSlice: number[] = [];
  let last = 0;
  vm.events.on('slice', () => { perSlice.push(n - last); last = n; });
  return { vm, perSlice };
}

describe('yieldSlice', () => {
  it('ends the running slice after the exit that asked, and the other machine on the thread runs next', async () => {
    const log: string[] = [];
    const a = await spinner('a', 0x80, log, (n) => n === 3);
    const b = await spinner('b', 0x81, log, () => false);
    const [sa, sb] = await Promise.all([a.vm.run({ timeout: 30 }), b.vm.run({ timeout: 30 })]);
    expect(sa.reason).toBe('timeout');
    expect(sb.reason).toBe('timeout');
    // A's first slice ended right after its third exit (a 10 ms mock slice holds thousands)...
    expect(a.perSlice[0]).toBe(3);
    // ...and the next exit handled on this thread was B's, not A's.
    expect(log.slice(0, 4)).toEqual(['a:1', 'a:2', 'a:3', 'b:1']);
    // Later slices of A (no more yields) run to their timer again.
    expect(Math.max(...a.perSlice.slice(1))).toBeGreaterThan(100);
    await a.vm.close();
    await b.vm.close();
  });

  it('outside a slice it does nothing: a yield requested between runs does not cut the next slice', async () => {
    const log: string[] = [];
    const a = await spinner('a', 0x80, log, () => false);
    yieldSlice();
    const stop = await a.vm.run({ timeout: 15 });
    expect(stop.reason).toBe('timeout');
    expect(a.perSlice[0]).toBeGreaterThan(100);
    await a.vm.close();
  });

  it('a yield that ends a slice leaves the exit completed: an `in` after it still gets its value', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script(outExit(0x80, 7), { kind: 'io', direction: 'in', port: 0x80, size: 1, count: 1, data: new Uint8Array(0) }, { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    const seen: number[] = [];
    vm.attach({ port: 0x80, size: 1 }, { name: 'p', write: (_o, v) => { seen.push(v); yieldSlice(); }, read: () => 0x42 });
    let slices = 0;
    vm.events.on('slice', () => { slices++; });
    const stop = await vm.run({ timeout: 1000 });
    expect(stop.reason).toBe('halt');
    expect(seen).toEqual([7]);
    expect(slices).toBeGreaterThanOrEqual(2);
    expect(vcpu.reads.map((r) => r[0])).toEqual([0x42]);
    await vm.close();
  });

  it('a vCPU halted in the kernel gets short slices while another machine runs on the thread, full ones alone', async () => {
    /** A mock machine with an irqchip whose vCPU stays halted with IF = 1; records slice lengths. */
    const halted = async () => {
      const backend = new MockBackend();
      const v: MockVcpu = backend.script();
      v.halted = true;
      v.regs = { ...v.regs, rflags: 0x202n };
      v.whenEmpty = { kind: 'intr' };
      const lengths: number[] = [];
      const begin = v.beginSlice.bind(v);
      v.beginSlice = (ns: number) => { lengths.push(ns / 1e6); begin(ns); };
      const vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true });
      return { vm, lengths };
    };
    // Stop after a few slices, far from the deadline (a slice never outlasts the time left).
    const stopAfter = (vm: Machine, n: number, ac: AbortController) => { let k = 0; vm.events.on('slice', () => { if (++k === n) ac.abort(); }); };
    const alone = await halted();
    const a1 = new AbortController();
    stopAfter(alone.vm, 5, a1);
    await alone.vm.run({ timeout: 5000, sliceMs: 10, signal: a1.signal });
    expect(alone.lengths).toEqual([10, 10, 10, 10, 10]);
    await alone.vm.close();

    const idle = await halted();
    const busy = await spinner('b', 0x81, [], () => false);
    const a2 = new AbortController();
    stopAfter(idle.vm, 5, a2);
    await Promise.all([idle.vm.run({ timeout: 5000, sliceMs: 10, signal: a2.signal }), busy.vm.run({ timeout: 5000, sliceMs: 10, signal: a2.signal })]);
    // The first slice is full (nothing was known yet), later ones are 1 ms at most.
    expect(idle.lengths).toEqual([10, 1, 1, 1, 1]);
    await idle.vm.close();
    await busy.vm.close();
  });
});
