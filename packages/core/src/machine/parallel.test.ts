/**
 * The parallel run loop (`vcpuThreads: 'parallel'`) on MockBackend's runners: every exit of
 * every vCPU through the one pipeline (mediate hook before the device), stops that name the
 * vCPU, exits that race a stop still mediated, runners closed with the machine.
 */
import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { MockBackend, outExit, type MockVm } from '../testing/mock.js';
import { InvalidArgumentError } from '../errors.js';
import type { Backend } from '../backend.js';

const MiB = 1024 * 1024;
const intr = { kind: 'intr' } as const;

async function machine(backend: MockBackend, vcpus = 2): Promise<Machine> {
  return Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus, vcpuThreads: 'parallel' });
}

describe("vcpuThreads: 'parallel' (MockBackend)", () => {
  it('rejects an unknown mode and a backend without runners', async () => {
    await expect(Machine.create({ memory: 2 * MiB, backend: new MockBackend(), vcpuThreads: 'many' as 'parallel' })).rejects.toBeInstanceOf(InvalidArgumentError);
    const plain = new MockBackend();
    const noRunners: Backend = { name: 'plain', capabilities: plain.capabilities, createVm: () => Object.assign(plain.createVm(), { startRunners: undefined }) };
    await expect(Machine.create({ memory: 2 * MiB, backend: noRunners, vcpuThreads: 'parallel' })).rejects.toThrow(/cannot run vCPUs in parallel/);
  });

  it('every exit of both vCPUs passes the mediate hook before the device; the stop names the vCPU that caused it', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0).script(outExit(0x80, 1), outExit(0x80, 2), outExit(0x80, 3)).whenEmpty = outExit(0x80, 9);
    backend.scriptVcpu(1).script(outExit(0x80, 0x11), outExit(0x80, 0x12), outExit(0xf4, 7));
    await using vm = await machine(backend);
    const log: string[] = [];
    vm.addHook({ name: 'h', mode: 'mediate', matches: (e) => e.kind === 'io', handle: (e, info) => { if (e.kind === 'io') log.push(`hook ${info.vcpu} ${e.data[0]}`); } });
    vm.attach({ port: 0x80, size: 1 }, { name: 'post', write: (_o, v) => { log.push(`dev ${v}`); } });
    vm.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 7, vcpu: 1 });
    // The mock ends runs in start order: the two vCPUs alternate, each exit hook-then-device.
    expect(log.slice(0, 8)).toEqual(['hook 0 1', 'dev 1', 'hook 1 17', 'dev 17', 'hook 0 2', 'dev 2', 'hook 1 18', 'dev 18']);
    const posts = log.filter((l) => l !== 'hook 1 7'); // port 0xf4's device logs nothing
    for (let i = 0; i < posts.length; i += 2) expect(posts[i + 1]).toBe(`dev ${posts[i]?.split(' ')[2]}`);
    // vCPU 0's exit that was in flight when vCPU 1 stopped the machine was mediated and delivered too.
    expect(log.filter((l) => l.startsWith('hook 0'))).toHaveLength(log.filter((l) => l.startsWith('dev ') && Number(l.slice(4)) < 0x10).length);
    expect(log).toContain('hook 1 7');
    const runners = (backend.vms[0] as MockVm).runners[0];
    expect(runners?.busy(0)).toBe(false);
    expect(runners?.busy(1)).toBe(false);
  });

  it('a hook may touch the vCPU whose exit it handles, never one inside KVM_RUN on its runner (StateError); stopped, all are free', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0).script(outExit(0x80, 1)).whenEmpty = outExit(0x80, 9);
    backend.scriptVcpu(1).script(outExit(0x80, 2)).whenEmpty = outExit(0x80, 9);
    await using vm = await machine(backend);
    const seen: string[] = [];
    vm.addHook({
      name: 'peek', mode: 'mediate', matches: (e) => e.kind === 'io',
      handle: (_e, info) => {
        const other = vm.vcpu(1 - info.vcpu);
        seen.push(`own ${typeof vm.vcpu(info.vcpu).getRegs().rip}`);
        try { other.getRegs(); seen.push('other read'); } catch (e) { seen.push((e as Error).constructor.name); }
        try { other.setRegs({ rax: 1n }); seen.push('other written'); } catch (e) { seen.push((e as Error).constructor.name); }
        return { verdict: 'deny', reason: 'enough' };
      },
    });
    vm.attach({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop.reason).toBe('violation');
    expect(seen.slice(0, 3)).toEqual(['own bigint', 'StateError', 'StateError']);
    expect(typeof vm.vcpu(0).getRegs().rip).toBe('bigint');
    expect(typeof vm.vcpu(1).getRegs().rip).toBe('bigint');
  });

  it('a fork is parallel only when asked (vcpuThreads is the host\'s choice, not the snapshot\'s)', async () => {
    const backend = new MockBackend();
    await using vm = await machine(backend);
    const snap = await vm.snapshot();
    try {
      await using shared = await Machine.fork(snap, { backend });
      expect((backend.vms.at(-1) as MockVm).runners).toHaveLength(0);
      await using parallel = await Machine.fork(snap, { backend, vcpuThreads: 'parallel' });
      expect((backend.vms.at(-1) as MockVm).runners).toHaveLength(1);
      expect([shared.vcpus.length, parallel.vcpus.length]).toEqual([2, 2]);
    } finally {
      snap.close();
    }
  });

  it('a computing vCPU\'s runner slices double up to 100 ms; a hook added mid-run reaches every vCPU at its next exit', async () => {
    const backend = new MockBackend();
    // vCPU 0: slice ends only (it computes); vCPU 1: posts, then stops the machine.
    backend.scriptVcpu(0).script(intr, intr, intr, intr, intr, intr, intr, intr, intr).whenEmpty = intr;
    backend.scriptVcpu(1).script(outExit(0x80, 1), outExit(0x80, 2), outExit(0x80, 3), outExit(0xf4, 0));
    await using vm = await machine(backend);
    const seen: number[] = [];
    let added = false;
    vm.attach({ port: 0x80, size: 1 }, {
      name: 'post',
      write: (_o, v) => {
        if (added) return;
        added = true;
        vm.addHook({ name: 'late', mode: 'mediate', matches: (e) => e.kind === 'io', handle: (e) => { if (e.kind === 'io') seen.push(e.data[0] as number); } });
        void v;
      },
    });
    vm.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    expect((await vm.run({ timeout: 5000, sliceMs: 10 })).reason).toBe('debug-exit');
    // Added while handling post 1: posts 2 and 3 (and the exit port) already pass it, with no slice end in between.
    expect(seen.slice(0, 2)).toEqual([2, 3]);
    const fresh = ((backend.vms[0] as MockVm).runners[0]?.starts ?? []).filter((x) => x.vcpu === 0 && x.fresh).map((x) => x.sliceNs / 1e6);
    expect(fresh.slice(0, 5)).toEqual([10, 20, 40, 80, 100]);
  });

  it('an unhandled exit of vCPU 1 stops the machine naming vCPU 1; a timeout names vCPU 0', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0).whenEmpty = intr;
    backend.scriptVcpu(1).script(intr, outExit(0x99, 1));
    await using vm = await machine(backend);
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'unhandled-exit', vcpu: 1 });
    backend.vms[0]?.vcpus[1]?.script();
    (backend.vms[0]?.vcpus[1] as { whenEmpty: unknown }).whenEmpty = intr;
    expect(await vm.run({ timeout: 50 })).toMatchObject({ reason: 'timeout', vcpu: 0 });
  });

  it('halts once every vCPU is halted with IF=0 or waits for SIPI, asking each afresh', async () => {
    const backend = new MockBackend();
    const v0 = backend.scriptVcpu(0);
    const v1 = backend.scriptVcpu(1);
    v0.whenEmpty = intr;
    v1.whenEmpty = intr;
    v0.halted = true; // IF=0 in the mock's rflags (2)
    v1.waitingSipi = true;
    await using vm = await machine(backend);
    const stop = await vm.run({ timeout: 5000 });
    expect(stop.reason).toBe('halt');
    expect(stop.elapsedMs).toBeLessThan(1000);
  });

  it('slice hooks run at each vCPU slice end; close closes the runners', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0).script(intr, intr, outExit(0xf4, 1));
    backend.scriptVcpu(1).whenEmpty = intr;
    const vm = await machine(backend);
    let slices = 0;
    vm.addSliceHook('count', () => { slices++; });
    vm.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', vcpu: 0 });
    expect(slices).toBeGreaterThanOrEqual(3);
    const runners = (backend.vms[0] as MockVm).runners[0];
    expect(runners?.starts.filter((s) => s.vcpu === 0 && s.fresh)).toHaveLength(3);
    await vm.close();
    expect(runners?.closed).toBe(true);
  });
});
