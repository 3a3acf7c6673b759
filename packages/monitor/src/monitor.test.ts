import { describe, expect, it } from 'vitest';
import { Machine, StateError, MonitorViolation } from '@tsvm/core';
import { MockBackend, inExit, mmioExit, outExit, type MockStep } from '@tsvm/core/testing';
import { Monitor } from './monitor.js';
import { allow, deny, emulate } from './decisions.js';
import { MechanismUnavailableError } from './errors.js';
import { assumedTable } from './calibration/table.js';
import { HYPERCALL_PORT } from './events.js';

const MiB = 1024 * 1024;
const pvm = assumedTable({ kernel: 'test', cpu: 'test', flavour: 'pvm' });

async function setup(...steps: MockStep[]) {
  const backend = new MockBackend();
  const vcpu = backend.script(...steps);
  const vm = await Machine.create({ memory: 2 * MiB, backend, name: 'vm1' });
  return { vm, vcpu, backend };
}

describe('Monitor: hooks by event', () => {
  it('mediates port I/O: allow reaches the device, emulate replaces it, deny stops with a violation naming RIP', async () => {
    const { vm, vcpu } = await setup(outExit(0x3f8, 0x41), inExit(0x60), outExit(0x3f9, 1), { kind: 'hlt' });
    const seen: number[] = [];
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: (_o, v) => { seen.push(v); } });
    vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', read: () => 0x11 });
    const mon = new Monitor(vm);
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8], direction: 'out' }, () => allow(), { name: 'uart-tx' });
    mon.mediate({ event: 'pio', ports: [0x60, 0x60] }, () => emulate(0x22));
    mon.mediate({ event: 'pio', ports: [0x3f9, 0x3ff] }, (ev) => deny({ reason: `port ${ev.event === 'pio' ? ev.port : 0} is off limits` }));
    vcpu.regs.rip = 0x1234n;
    const stop = await vm.run();
    expect(seen).toEqual([0x41]);
    expect(Array.from(vcpu.reads[0] ?? [])).toEqual([0x22]);
    expect(stop.reason).toBe('violation');
    if (stop.reason !== 'violation') return;
    expect(stop.violation).toBeInstanceOf(MonitorViolation);
    expect(stop.violation.message).toMatch(/port 1017 is off limits.*RIP 0x1234/);
    expect(mon.plan().map((p) => p.mechanism)).toEqual(['pio-exit', 'pio-exit', 'pio-exit']);
  });

  it('observe hooks on a device range use the coalesced ring; a mediate hook on the range turns it back into exits', async () => {
    const { vm, vcpu } = await setup((v) => { v.coalesced = [{ address: 0x3f8n, length: 1, pio: true, data: Uint8Array.of(0x42) }]; return { kind: 'hlt' }; });
    const dev: number[] = [];
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: (_o, v) => { dev.push(v); } });
    const mon = new Monitor(vm);
    const seen: number[] = [];
    const h = mon.observe({ event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out' }, (ev) => { if (ev.event === 'pio' && ev.value !== undefined) seen.push(ev.value); });
    expect(h.mechanism).toBe('coalesced-pio');
    expect((await vm.run()).reason).toBe('halt');
    expect(dev).toEqual([0x42]);
    expect(seen).toEqual([0x42]);
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => allow());
    expect(mon.plan()[0]?.mechanism).toBe('pio-exit');
    expect(mon.plan()[0]?.why).toMatch(/mediate hook overlaps/);
    void vcpu;
  });

  it('hypercalls are writes to port 0xee8 and resume on allow', async () => {
    const { vm } = await setup(outExit(HYPERCALL_PORT, 7, 4), { kind: 'hlt' });
    const mon = new Monitor(vm);
    const nrs: number[] = [];
    mon.mediate({ event: 'hypercall' }, (ev) => { if (ev.event === 'hypercall') nrs.push(ev.nr); return allow(); });
    expect((await vm.run()).reason).toBe('halt');
    expect(nrs).toEqual([7]);
  });

  it('MSR hooks: allow passes through to the vCPU, emulate answers, deny gp injects #GP', async () => {
    const { vm, vcpu } = await setup(
      { kind: 'msr', direction: 'write', index: 0x10, data: 5n, reason: 4 },
      { kind: 'msr', direction: 'read', index: 0x10, data: 0n, reason: 4 },
      { kind: 'msr', direction: 'read', index: 0x11, data: 0n, reason: 4 },
      { kind: 'msr', direction: 'read', index: 0x12, data: 0n, reason: 4 },
      { kind: 'hlt' });
    const mon = new Monitor(vm);
    mon.mediate({ event: 'msr', indices: [0x10] }, () => allow());
    mon.mediate({ event: 'msr', indices: [0x11], direction: 'read' }, () => emulate(99n));
    mon.mediate({ event: 'msr', indices: [0x12] }, () => deny({ effect: 'gp' }));
    expect((await vm.run()).reason).toBe('halt');
    expect(vcpu.msrs).toEqual([{ data: 0n, error: false }, { data: 5n, error: false }, { data: 99n, error: false }, { data: 0n, error: true }]);
  });

  it('halt, shutdown and any-exit', async () => {
    const { vm } = await setup(outExit(0x3f8, 1), { kind: 'hlt' }, { kind: 'hlt' });
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'uart', write: () => {} });
    const mon = new Monitor(vm);
    const kinds: string[] = [];
    mon.observe({ event: 'any-exit' }, (ev) => { if (ev.event === 'any-exit') kinds.push(ev.exit.kind); });
    let halts = 0;
    mon.mediate({ event: 'halt' }, () => (++halts === 1 ? emulate(0) : allow()));
    expect((await vm.run()).reason).toBe('halt');
    expect(halts).toBe(2);
    expect(kinds).toEqual(['io', 'hlt', 'hlt']);
  });

  it('CPUID cannot be mediated: a typed error says why and what works; emulateCpuid installs a table', async () => {
    const { vm } = await setup();
    const mon = new Monitor(vm, { calibration: pvm });
    expect(() => mon.mediate({ event: 'cpuid', leaves: [0] }, () => allow())).toThrow(MechanismUnavailableError);
    expect(() => mon.mediate({ event: 'cpuid', leaves: [0] }, () => allow())).toThrow(/never exits.*emulateCpuid/);
    mon.emulateCpuid([{ function: 0x4000_0000, eax: 0x4000_0001, ebx: 0x7473766d }]);
    const entry = vm.vcpu(0).supportedCpuid().find((e) => e.function === 0x4000_0000);
    expect(entry?.ebx).toBe(0x7473766d);
    expect(mon.plan().at(-1)).toMatchObject({ mechanism: 'cpuid-table', why: expect.stringMatching(/NOT honoured at CPL3/) });
  });

  it('single-step at CPL3 on PVM is refused naming what works; at CPL0 it is single-step', async () => {
    const { vm } = await setup();
    const mon = new Monitor(vm, { calibration: pvm });
    const err = (() => { try { mon.observe({ event: 'step', cpl: 3 }, () => {}); } catch (e) { return e; } return undefined; })();
    expect(err).toBeInstanceOf(MechanismUnavailableError);
    expect((err as MechanismUnavailableError).alternatives.join()).toMatch(/probe-breakpoint/);
    expect((err as Error).message).toMatch(/#DB is delivered to the guest/);
    expect(mon.observe({ event: 'step', cpl: 0 }, () => {}).mechanism).toBe('single-step');
  });

  it('seal freezes the table: registering, removing and attaching devices throw', async () => {
    const { vm } = await setup();
    const mon = new Monitor(vm);
    const h = mon.mediate({ event: 'pio', ports: [0x80, 0x80] }, () => allow());
    mon.seal();
    expect(() => mon.mediate({ event: 'pio', ports: [0x81, 0x81] }, () => allow())).toThrow(StateError);
    expect(() => h.remove()).toThrow(/sealed/);
    expect(() => vm.io.register({ port: 0x90, size: 1 }, { name: 'late' })).toThrow(/sealed/);
    expect(() => vm.addHook({ name: 'x', mode: 'observe', matches: () => true, handle: () => {} })).toThrow(/sealed/);
  });

  it('installs exactly one mediate and one observe core hook, however many hooks it holds, and decodes per exit', async () => {
    const { vm } = await setup(outExit(0x3f8, 1), outExit(0x80, 2), { kind: 'hlt' });
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
    vm.io.register({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
    const mon = new Monitor(vm);
    const seen: string[] = [];
    for (let i = 0; i < 10; i++) mon.mediate({ event: 'pio', ports: [0x100 + i, 0x100 + i] }, () => allow());
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff] }, (ev) => { seen.push(`m:${ev.event}`); return allow(); });
    mon.observe({ event: 'pio', ports: [0x80, 0x80] }, (ev) => { if (ev.event === 'pio') seen.push(`o:${ev.port}:${ev.value}`); });
    mon.observe({ event: 'any-exit' }, (ev) => { if (ev.event === 'any-exit') seen.push(`any:${ev.exit.kind}`); });
    expect((await vm.run()).reason).toBe('halt');
    expect(seen).toEqual(['m:pio', 'any:io', 'o:128:2', 'any:io', 'any:hlt']);
    expect([...vm.hookStats().keys()].map((h) => h.name).sort()).toEqual(['monitor:mediate', 'monitor:observe']);
  });

  it("deny by default is core's: the same unhandled-exit stop with or without a monitor, which adds the instruction at RIP", async () => {
    const run = async (withMonitor: boolean) => {
      const { vm, vcpu } = await setup(mmioExit(0xd000_0000n, 4));
      if (withMonitor) new Monitor(vm);
      vm.memory.write(0x1000, Uint8Array.of(0x8b, 0x00)); // mov ax, [bx+si] (16-bit decode)
      vcpu.regs.rip = 0x1000n;
      return vm.run();
    };
    const [bare, monitored] = [await run(false), await run(true)];
    for (const stop of [bare, monitored]) {
      expect(stop).toMatchObject({ reason: 'unhandled-exit', kind: 'mmio', address: 0xd000_0000n, rip: 0x1000n });
      if (stop.reason === 'unhandled-exit') expect(stop.message).toMatch(/deny by default/);
    }
    if (monitored.reason === 'unhandled-exit') expect(monitored.message).toMatch(/deny by default.*RIP 0x1000: mov ax,\[bx\+si\] \[8b 00\]/);
    if (bare.reason === 'unhandled-exit') expect(bare.message).not.toMatch(/RIP/);
  });

  it('readOriginal shows the code under probe traps, while guest RAM holds the trap; removing the hook restores RAM', async () => {
    const { vm } = await setup();
    const code = Uint8Array.of(0xb8, 1, 0, 0, 0, 0x83, 0xc0, 0x02, 0x90, 0xf4); // mov eax,1; add eax,2; nop; hlt
    vm.memory.write(0x1000, code);
    const mon = new Monitor(vm, { calibration: pvm });
    const h = mon.observe({ event: 'exec', address: 0x1005, cpl: 3 }, () => {});
    expect(h.mechanism).toBe('probe-breakpoint');
    expect(Array.from(vm.memory.read(0x1005, 2))).toEqual([0xe6, 0xe5]);
    expect(Array.from(mon.readOriginal(0x1000, code.length))).toEqual(Array.from(code));
    expect(Array.from(mon.readOriginal(0x1006n, 1))).toEqual([0xc0]); // the trap's second byte alone
    expect(() => mon.readOriginal(0x7fff_ffffn, 16)).toThrow(/not backed by guest RAM/);
    h.remove();
    expect(Array.from(vm.memory.read(0x1000, code.length))).toEqual(Array.from(code));
  });
});
