import { describe, expect, it, vi } from 'vitest';
import { Machine, type Device, type VcpuExit } from '@tsvm/core';
import { MockBackend, inExit, mmioExit, outExit, type MockStep } from '@tsvm/core/testing';
import { Monitor } from './monitor.js';
import { allow } from './decisions.js';
import { MediationBypassError } from './errors.js';

const MiB = 1024 * 1024;

describe('complete mediation', () => {
  it('no device on either bus sees an access before its mediate hook, and nothing mediated is ever coalesced', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script();
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    const trace: string[] = [];
    const dev = (name: string): Device => ({ name, read: (o) => { trace.push(`dev:${name}:r${o}`); return 0; }, write: (o) => { trace.push(`dev:${name}:w${o}`); } });
    vm.io.register({ port: 0x3f8, size: 8 }, dev('uart'));
    vm.io.register({ port: 0x60, size: 1 }, dev('kbd'));
    vm.io.register({ port: 0x70, size: 2 }, dev('rtc'));
    vm.mmio.register({ address: 0xd000_0000n, size: 0x1000 }, dev('virtio'));
    vm.mmio.register({ address: 0xfee0_0000n, size: 0x1000 }, dev('lapic'));
    const coalesced = vi.spyOn(backend.vms[0]!, 'registerCoalesced');
    const mon = new Monitor(vm);
    // Mediate every device range; also observe them (an observer alone would be coalesced).
    for (const e of vm.io.entries()) {
      const ports: [number, number] = [Number(e.start), Number(e.end) - 1];
      mon.mediate({ event: 'pio', ports }, (ev) => { trace.push(`hook:${e.device.name}`); void ev; return allow(); });
      mon.observe({ event: 'pio', ports }, () => {});
    }
    for (const e of vm.mmio.entries()) {
      mon.mediate({ event: 'mmio', range: [e.start, e.end - 1n] }, () => { trace.push(`hook:${e.device.name}`); return allow(); });
      mon.observe({ event: 'mmio', range: [e.start, e.end - 1n] }, () => {});
    }
    mon.seal();
    expect(coalesced).not.toHaveBeenCalled();
    expect(mon.plan().filter((p) => p.mode === 'observe').every((p) => /mediate hook overlaps/.test(p.why))).toBe(true);
    // Reach every device, every way the exit path offers: reads and writes, first and last byte.
    const steps: MockStep[] = [];
    for (const e of vm.io.entries()) for (const port of [Number(e.start), Number(e.end) - 1]) steps.push(outExit(port, 1), inExit(port));
    for (const e of vm.mmio.entries()) for (const a of [e.start, e.end - 4n]) steps.push(mmioExit(a, 4, 1), mmioExit(a, 4));
    vcpu.script(...steps, { kind: 'hlt' });
    expect((await vm.run()).reason).toBe('halt');
    const devs = trace.filter((t) => t.startsWith('dev:'));
    expect(devs).toHaveLength(steps.length);
    trace.forEach((t, i) => {
      if (t.startsWith('dev:')) expect(trace[i - 1]).toBe(`hook:${t.split(':')[1]}`);
    });
    // After seal no device can be added behind the hooks.
    expect(() => vm.io.register({ port: 0x80, size: 1 }, dev('late'))).toThrow(/sealed/);
    expect(() => vm.attach({ address: 0xc000_0000n, size: 0x1000 }, dev('late'))).toThrow(/sealed/);
  });

  it('a coalesced zone registered behind the monitor\'s back is caught: the machine stops with MediationBypassError', async () => {
    const backend = new MockBackend();
    const bypass: VcpuExit = { kind: 'hlt' };
    const vcpu = backend.script((v) => { v.coalesced = [{ address: 0x3f8n, length: 1, pio: true, data: Uint8Array.of(0x41) }]; return bypass; });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
    const mon = new Monitor(vm);
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff] }, () => allow(), { name: 'uart-gate' });
    vm.coalesce({ port: 0x3f8, size: 8 }); // the user goes around the monitor
    const stop = await vm.run();
    expect(stop.reason).toBe('hook-error');
    if (stop.reason !== 'hook-error') return;
    expect(stop.hook).toBe('monitor:mediation-guard');
    expect(stop.error).toBeInstanceOf(MediationBypassError);
    expect((stop.error as Error).message).toMatch(/uart-gate/);
    void vcpu;
  });
});
