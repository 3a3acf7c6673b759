import { describe, expect, it, vi } from 'vitest';
import { Machine } from '@tsvm/core';
import { MockBackend, mmioExit } from '@tsvm/core/testing';
import { Monitor } from './monitor.js';
import { allow, deny, emulate } from './decisions.js';

const MiB = 1024 * 1024;

async function setup(...steps: Parameters<MockBackend['script']>) {
  const backend = new MockBackend();
  const vcpu = backend.script(...steps);
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000, mode: 'long' });
  return { vm, vcpu, backend };
}

describe('write-watch', () => {
  it('mediate: the watched pages become a read-only slot (contents kept); writes are decided, then performed by the monitor', async () => {
    const { vm } = await setup(mmioExit(0x10008n, 4, 0x11223344), mmioExit(0x10010n, 4, 0x55), mmioExit(0x10ff0n, 4, 1), mmioExit(0x10020n, 1, 9));
    vm.memory.write(0x10000, Uint8Array.of(1, 2, 3, 4));
    const mon = new Monitor(vm);
    const seen: string[] = [];
    mon.mediate({ event: 'write-watch', range: [0x10000, 0x10fef] }, (ev) => {
      if (ev.event !== 'write-watch') return allow();
      seen.push(`${ev.address.toString(16)}=${ev.value?.toString(16)}`);
      return ev.address === 0x10010n ? emulate(0x66) : ev.address === 0x10020n ? deny({ reason: 'no' }) : allow();
    });
    const regions = vm.memory.regions();
    expect(regions.map((r) => [Number(r.start), r.size, r.readonly])).toEqual([[0, 0x10000, false], [0x10000, 0x1000, true], [0x11000, 2 * MiB - 0x11000, false]]);
    expect(Array.from(vm.memory.read(0x10000, 4))).toEqual([1, 2, 3, 4]);
    expect(vm.memory.readUint(0x1000, 1)).toBe(0xf4);
    const stop = await vm.run();
    expect(seen).toEqual(['10008=11223344', '10010=55', '10020=9']); // 0x10ff0 is on the page but outside the range: written through
    expect(vm.memory.readUint(0x10008, 4)).toBe(0x11223344);
    expect(vm.memory.readUint(0x10010, 4)).toBe(0x66);
    expect(vm.memory.readUint(0x10ff0, 4)).toBe(1);
    expect(stop.reason).toBe('violation');
    expect(vm.memory.readUint(0x10020, 1)).toBe(0);
    expect(mon.plan()[0]).toMatchObject({ mechanism: 'ro-slot-write' });
  });

  it('refuses to watch the host system area (page tables must stay writable)', async () => {
    const { vm } = await setup();
    const mon = new Monitor(vm);
    const sys = vm.layout.systemArea ?? 0;
    expect(() => mon.mediate({ event: 'write-watch', range: [sys, sys + 10] }, () => allow())).toThrow(/system area/);
  });

  it('observe: the dirty log is sampled at slice boundaries and delivered per page in the range', async () => {
    const { vm, backend } = await setup({ kind: 'hlt' });
    const mon = new Monitor(vm);
    const pages: bigint[] = [];
    const h = mon.observe({ event: 'write-watch', range: [0x20000, 0x22fff] }, (ev) => { if (ev.event === 'write-watch') pages.push(ev.address); });
    expect(h.mechanism).toBe('dirty-log-page');
    const mvm = backend.vms[0]!;
    // Pages 0x20 and 0x23 dirty: only the first is inside the watched range.
    vi.spyOn(mvm, 'dirtyLog').mockImplementation((_slot, size) => { const b = new Uint8Array(Math.ceil(size / 4096 / 64) * 8); b[4] = 0b1001; return b; });
    expect((await vm.run()).reason).toBe('halt');
    expect(pages).toEqual([0x20000n]);
  });

  it('observe: a sampled observer that throws stops the run with hook-error naming it (no error parked unread)', async () => {
    const { vm, backend } = await setup({ kind: 'hlt' });
    const mon = new Monitor(vm);
    mon.observe({ event: 'write-watch', range: [0x20000, 0x22fff] }, () => { throw new Error('observer broke'); }, { name: 'fragile' });
    vi.spyOn(backend.vms[0]!, 'dirtyLog').mockImplementation((_slot, size) => { const b = new Uint8Array(Math.ceil(size / 4096 / 64) * 8); b[4] = 1; return b; });
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'hook-error', hook: 'fragile' });
    if (stop.reason === 'hook-error') expect((stop.error as Error).message).toBe('observer broke');
  });
});
