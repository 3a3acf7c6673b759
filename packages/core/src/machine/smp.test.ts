/**
 * Several vCPUs on MockBackend: creation rules, round-robin slices on one thread, every exit of
 * every vCPU through the one hook pipeline, and stops that name the vCPU.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { Machine, MAX_VCPUS } from '../machine.js';
import { MockBackend, MockVcpu, outExit, type MockVm } from '../testing/mock.js';
import { InvalidArgumentError, SnapshotFormatError } from '../errors.js';
import { encodeManifest, parseManifest } from '../snapshot/manifest.js';
import { Snapshot } from '../snapshot/snapshot.js';
import type { ExitHook } from '../hooks.js';

const MiB = 1024 * 1024;
const intr = { kind: 'intr' } as const;

/** An observe hook that records (vCPU, port, value) of every `out`. */
function recorder(): { hook: ExitHook; seen: Array<[number, number, number]> } {
  const seen: Array<[number, number, number]> = [];
  return {
    seen,
    hook: {
      name: 'rec', mode: 'mediate',
      matches: (e) => e.kind === 'io',
      handle: (e, info) => { if (e.kind === 'io') seen.push([info.vcpu, e.port, e.data[0] ?? -1]); },
    },
  };
}

/** Port 0x80 swallows writes; a write to 0xf4 ends the run as a debug exit with that code. */
function attachPorts(vm: Machine): void {
  vm.attach({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
  vm.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, access) => access.requestStop({ reason: 'debug-exit', code: v }) });
}

describe('Machine.create({ vcpus })', () => {
  it.each([[0], [1.5], ['2'], [MAX_VCPUS + 1], [-1]])('rejects vcpus: %j', async (vcpus) => {
    const p = Machine.create({ memory: 2 * MiB, backend: new MockBackend(), irqchip: true, vcpus: vcpus as number });
    await expect(p).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(p).rejects.toThrow(/vcpus/);
  });

  it('requires the in-kernel irqchip for more than one vCPU, before touching the backend', async () => {
    const backend = new MockBackend();
    const p = Machine.create({ memory: 2 * MiB, backend, vcpus: 2 });
    await expect(p).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(p).rejects.toThrow(/irqchip: true/);
    expect(backend.vms).toHaveLength(0);
  });

  it('creates vCPUs 0..N-1 and exposes them', async () => {
    const backend = new MockBackend();
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 3 });
    expect(vm.vcpus.map((v) => v.id)).toEqual([0, 1, 2]);
    expect(vm.vcpu(2).id).toBe(2);
    expect(backend.vms[0]?.vcpus.map((v) => v.id)).toEqual([0, 1, 2]);
    expect(() => vm.vcpu(3)).toThrow(InvalidArgumentError);
  });

  it('gives each vCPU of several its own APIC id in CPUID leaves 1, 0xB and 0x1F', async () => {
    const backend = new MockBackend();
    const table = [
      { function: 1, index: 0, flags: 0, eax: 0x906ea, ebx: 0x0010_0800, ecx: 0, edx: 0 },
      { function: 0xb, index: 0, flags: 1, eax: 0, ebx: 1, ecx: 0x100, edx: 0 },
      { function: 0x1f, index: 1, flags: 1, eax: 0, ebx: 1, ecx: 0x201, edx: 0 },
      { function: 7, index: 0, flags: 1, eax: 0, ebx: 0x1234, ecx: 0, edx: 0 },
    ];
    for (let id = 0; id < 3; id++) backend.scriptVcpu(id).setCpuid(table);
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 3 });
    for (const v of vm.vcpus) {
      const got = v.supportedCpuid();
      expect(got.find((e) => e.function === 1)?.ebx).toBe((0x0010_0800 | (v.id << 24)) >>> 0);
      expect(got.filter((e) => e.function === 0xb || e.function === 0x1f).map((e) => e.edx)).toEqual([v.id, v.id]);
      expect(got.find((e) => e.function === 7)).toEqual(table[3]);
    }
  });
});

describe('run() with several vCPUs (round-robin on the calling thread)', () => {
  it('runs the vCPUs one slice each, in turn, and every exit reaches the hooks with its vCPU', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0, outExit(0x80, 1), intr, outExit(0x80, 3), intr, outExit(0x80, 5), intr);
    backend.scriptVcpu(1, outExit(0x80, 2), intr, outExit(0x80, 4), intr, outExit(0xf4, 9));
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const { hook, seen } = recorder();
    vm.addHook(hook);
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 9, vcpu: 1 });
    expect(seen).toEqual([[0, 0x80, 1], [1, 0x80, 2], [0, 0x80, 3], [1, 0x80, 4], [0, 0x80, 5], [1, 0xf4, 9]]);
  });

  it('a stop of one vCPU stops the machine and names that vCPU', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0, outExit(0x80, 1), intr, outExit(0xf4, 3));
    const ap = backend.scriptVcpu(1, outExit(0x80, 2), intr, outExit(0x80, 7), intr);
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 3, vcpu: 0 });
    expect(ap.steps).toHaveLength(2);   // vCPU 1 ran exactly one slice
  });

  it('names the vCPU in an unhandled-exit stop', async () => {
    const backend = new MockBackend();
    backend.scriptVcpu(0, intr, intr, intr);
    backend.scriptVcpu(1, outExit(0x99, 1));
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'unhandled-exit', vcpu: 1 });
  });

  it('never runs a vCPU waiting for SIPI, and runs it once it has been started', async () => {
    const backend = new MockBackend();
    const ap = new MockVcpu(1);
    ap.waitingSipi = true;
    ap.script(outExit(0x80, 0x42), intr);
    ap.whenEmpty = intr;
    backend.nextVcpus.set(1, ap);
    let apRunsBeforeSipi = -1;
    backend.scriptVcpu(0,
      outExit(0x80, 1), intr, intr,
      (v) => { apRunsBeforeSipi = ap.runs; ap.waitingSipi = false; void v; return outExit(0x80, 2); }, intr,
      intr, outExit(0xf4, 0));
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const { hook, seen } = recorder();
    vm.addHook(hook);
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', vcpu: 0 });
    expect(apRunsBeforeSipi).toBe(0);
    expect(ap.slices).toBe(2);   // started after the BSP's third slice: two turns before the BSP's fifth
    expect(seen).toEqual([[0, 0x80, 1], [0, 0x80, 2], [1, 0x80, 0x42], [0, 0xf4, 0]]);
  });

  it('stops as halt when every vCPU is halted with IF=0 or waits for SIPI, naming the last one to halt', async () => {
    const backend = new MockBackend();
    const bsp = backend.scriptVcpu(0, outExit(0x80, 1), (v) => { v.halted = true; return intr; });
    const ap = backend.scriptVcpu(1);
    ap.waitingSipi = true;
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'halt', vcpu: 0 });
    expect(bsp.steps).toHaveLength(0);
    expect(ap.runs).toBe(0);
  });

  it('does not stop as halt while another vCPU can still run, or a halted one has IF=1', async () => {
    const backend = new MockBackend();
    // vCPU 1 halts for good at once; vCPU 0 keeps working, then halts with interrupts enabled.
    const ap = backend.scriptVcpu(1, (v) => { v.halted = true; return intr; });
    ap.whenEmpty = intr;
    const bsp = backend.scriptVcpu(0, outExit(0x80, 1), intr, outExit(0x80, 2), intr, (v) => { v.halted = true; v.regs.rflags = 0x202n; return intr; });
    bsp.whenEmpty = intr;
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const { hook, seen } = recorder();
    vm.addHook(hook);
    const stop = await vm.run({ timeout: 100 });
    expect(stop).toMatchObject({ reason: 'timeout', halted: true });
    expect(seen).toEqual([[0, 0x80, 1], [0, 0x80, 2]]);
  });

  it('skips a vCPU halted for good until another vCPU wakes it (here: an NMI becomes pending)', async () => {
    const backend = new MockBackend();
    const ap = backend.scriptVcpu(1, (v) => { v.halted = true; return intr; }, outExit(0x80, 0x4e), intr);
    ap.whenEmpty = intr;
    let apRunsWhileIdle = -1;
    backend.scriptVcpu(0, outExit(0x80, 1), intr, intr, intr,
      () => { apRunsWhileIdle = ap.runs; ap.halted = false; ap.nmi = { pending: true, masked: false, source: undefined }; return intr; },
      intr, outExit(0xf4, 0));
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const { hook, seen } = recorder();
    vm.addHook(hook);
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', vcpu: 0 });
    expect(apRunsWhileIdle).toBe(1);   // ran once (and halted), then skipped for three BSP slices
    expect(seen).toEqual([[0, 0x80, 1], [1, 0x80, 0x4e], [0, 0xf4, 0]]);
  });

  it('a timeout names the vCPU that ran last, never one skipped while it waits for SIPI', async () => {
    const backend = new MockBackend();
    const bsp = backend.scriptVcpu(0);
    bsp.whenEmpty = intr;
    const ap = backend.scriptVcpu(1);
    ap.waitingSipi = true;
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    const stop = await vm.run({ timeout: 30, sliceMs: 1 });
    expect(stop).toMatchObject({ reason: 'timeout', vcpu: 0, halted: false });
    expect(ap.runs).toBe(0);
    expect(bsp.slices).toBeGreaterThan(1);
  });

  it('gives a halted vCPU short (≤1 ms) slices while another runs', async () => {
    const backend = new MockBackend();
    const lengths: number[][] = [[], []];
    const bsp = backend.scriptVcpu(0, intr, intr, intr, outExit(0xf4, 0));
    const ap = backend.scriptVcpu(1, (v) => { v.halted = true; v.regs.rflags = 0x202n; return intr; });
    ap.whenEmpty = intr;
    for (const v of [bsp, ap]) {
      const begin = v.beginSlice.bind(v);
      v.beginSlice = (ns) => { lengths[v.id]?.push(ns); begin(ns); };
    }
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    attachPorts(vm);
    const stop = await vm.run({ timeout: 5000, sliceMs: 10 });
    expect(stop).toMatchObject({ reason: 'debug-exit', vcpu: 0 });
    expect(lengths[0]).toEqual([10e6, 10e6, 10e6, 10e6]);
    // First slice before it was seen halted: full length; the rest short.
    expect(lengths[1]).toEqual([10e6, 1e6, 1e6]);
  });
});

describe('snapshot, restore and fork of several vCPUs (mock backend)', () => {
  async function twoVcpus(backend: MockBackend): Promise<Machine> {
    const vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true, vcpus: 2 });
    vm.vcpu(0).setRegs({ rip: 0x1000n, rax: 1n });
    vm.vcpu(1).setRegs({ rip: 0x0n, rax: 2n });
    const mv = backend.vms.at(-1) as MockVm;
    (mv.vcpus[0] as MockVcpu).state = { 'mp-state': Uint8Array.of(0, 0, 0, 0) };
    (mv.vcpus[1] as MockVcpu).state = { 'mp-state': Uint8Array.of(1, 0, 0, 0), lapic: Uint8Array.of(9) };
    return vm;
  }

  it('captures every vCPU and restores and forks them all, each with its own state', async () => {
    const backend = new MockBackend();
    await using vm = await twoVcpus(backend);
    using snap = await vm.snapshot();
    expect(snap.manifest.vcpus.map((v) => [v.id, v.regs.rax])).toEqual([[0, 1n], [1, 2n]]);
    for (const make of [() => Machine.restore(snap, { backend }), () => Machine.fork(snap, { backend })]) {
      await using copy = await make();
      expect(copy.vcpus.map((v) => v.getRegs().rax)).toEqual([1n, 2n]);
      expect(copy.vcpu(1).getRegs().rip).toBe(0n);
      const mv = backend.vms.at(-1) as MockVm;
      expect(mv.vcpus.map((v) => Array.from(v.getState()['mp-state'] ?? []))).toEqual([[0, 0, 0, 0], [1, 0, 0, 0]]);
      expect(Array.from(mv.vcpus[1]?.getState().lapic ?? [])).toEqual([9]);
      // A reset puts every vCPU back.
      copy.vcpu(1).setRegs({ rax: 77n });
      copy.reset();
      expect(copy.vcpu(1).getRegs().rax).toBe(2n);
    }
  });

  it('refuses a several-vCPU snapshot without the irqchip, as a SnapshotFormatError', async () => {
    const backend = new MockBackend();
    await using vm = await twoVcpus(backend);
    using snap = await vm.snapshot();
    const tree = encodeManifest(snap.manifest) as { machine: { irqchip: boolean } };
    tree.machine.irqchip = false;
    const json = Buffer.from(JSON.stringify(tree), 'utf8');
    expect(parseManifest(JSON.parse(json.toString('utf8')) as unknown).vcpus).toHaveLength(2);
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-smp-unit-'));
    try {
      // The file format: magic, version, manifest length and SHA-256, the manifest, the image page-aligned.
      const header = Buffer.alloc(48);
      header.write('TSVMSNP\0', 0, 'latin1');
      header.writeUInt32LE(1, 8);
      header.writeUInt32LE(json.length, 12);
      createHash('sha256').update(json).digest().copy(header, 16);
      const at = Math.ceil((48 + json.length) / 4096) * 4096;
      const out = Buffer.alloc(at + snap.manifest.imageSize);
      header.copy(out, 0);
      json.copy(out, 48);
      const path = join(dir, 'no-irqchip.tsvm');
      writeFileSync(path, out);
      using loaded = Snapshot.load(path, backend);
      const p = Machine.restore(loaded, { backend });
      await expect(p).rejects.toBeInstanceOf(SnapshotFormatError);
      await expect(p).rejects.toThrow(/machine\.irqchip is not set/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
