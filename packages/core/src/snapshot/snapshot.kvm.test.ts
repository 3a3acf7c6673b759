import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { asm } from '../asm.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import type { Device } from '../device.js';
import { Snapshot } from './snapshot.js';
import { SnapshotFormatError } from '../errors.js';
import { DeviceMemory } from '../dma.js';
import { kvmBackend } from '../backend/kvm.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
const PAUSE = 0x501;

/** Console sink with state (bytes seen), so device state travels by name. */
function sink(): Device & { text: () => string } {
  let bytes: number[] = [];
  return {
    name: 'console',
    write: (_o, v) => { bytes.push(v); },
    snapshot: () => ({ bytes: bytes.slice() }),
    restore: (s) => { bytes = ((s as { bytes: number[] }).bytes).slice(); },
    text: () => String.fromCharCode(...bytes),
  };
}
const exitDev: Device = { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) };
const pauseDev: Device = { name: 'pause', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: 0x100 + v }) };

// Ring 3, long mode: 64 rounds of compute + a store into RAM + a console byte; pauses (an
// exit the host turns into a stop) every 16 rounds, ends with a debug-exit.
const program = `
  xor ecx, ecx
  mov r12, 0x1234567
round:
  mov rax, 6364136223846793005
  imul r12, rax
  add r12, rcx
  mov rax, rcx
  shl rax, 12
  mov [rax + 0x100000], r12
  mov eax, ecx
  and eax, 31
  add eax, 0x41
  mov dx, 0x3f8
  out dx, al
  inc ecx
  test ecx, 15
  jnz next
  mov dx, ${PAUSE}
  out dx, al
next:
  cmp ecx, 64
  jne round
  mov dx, 0xf4
  mov al, 7
  out dx, al`;

async function build(): Promise<{ vm: Machine; out: ReturnType<typeof sink> }> {
  const vm = await Machine.create({ memory: 2 * MiB, name: 'A' });
  const out = sink();
  vm.attach({ port: 0x3f8, size: 1 }, out);
  vm.attach({ port: 0xf4, size: 1 }, exitDev);
  vm.attach({ port: PAUSE, size: 1 }, pauseDev);
  vm.loadFlat(await asm(program, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  return { vm, out };
}

/** A snapshot of machine A at its first pause (A itself closed). */
async function pausedSnapshot(): Promise<Snapshot> {
  const { vm: a } = await build();
  await a.run({ timeout: 10_000 });
  const snap = await a.snapshot();
  await a.close();
  return snap;
}

async function runToEnd(vm: Machine): Promise<void> {
  for (;;) {
    const s = await vm.run({ timeout: 10_000 });
    if (s.reason === 'debug-exit' && s.code === 7) return;
    expect(s.reason).toBe('debug-exit');
  }
}

const hash = (vm: Machine) => createHash('sha256').update(vm.memory.read(0, vm.memory.totalSize)).digest('hex');
const devices = () => { const out = sink(); return { out, mappings: [
  { range: { port: 0x3f8, size: 1 }, device: out },
  { range: { port: 0xf4, size: 1 }, device: exitDev },
  { range: { port: PAUSE, size: 1 }, device: pauseDev },
] }; };

describe.skipIf(!kvm.available)(`snapshot / restore / fork / reset on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  let reference: { text: string; regs: unknown; hash: string };
  let dir: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'tsvm-snap-'));
    const { vm, out } = await build();
    await runToEnd(vm);
    reference = { text: out.text(), regs: vm.vcpu(0).getRegs(), hash: hash(vm) };
    await vm.close();
    expect(reference.text).toHaveLength(64);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('a machine restored from a mid-run snapshot finishes with the same output, registers and memory', async () => {
    const { vm: a, out } = await build();
    // Paused after 16 rounds: the last byte out was 'A' + 15.
    expect(await a.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 0x100 + 0x41 + 15 });
    using snap = await a.snapshot();
    expect(snap.storedBytes).toBeLessThan(snap.memorySize / 4); // sparse: zero pages not stored
    // The original goes on; nothing it writes may reach the snapshot.
    await runToEnd(a);
    expect(hash(a)).toBe(reference.hash);
    await a.close();
    const d = devices();
    await using b = await Machine.restore(snap, { devices: d.mappings });
    expect(d.out.text()).toBe(reference.text.slice(0, 16));
    await runToEnd(b);
    expect(d.out.text()).toBe(reference.text);
    expect(b.vcpu(0).getRegs()).toEqual(reference.regs);
    expect(hash(b)).toBe(reference.hash);
  });

  it('a snapshot saved to a file loads and restores the same way; a truncated file is a SnapshotFormatError', async () => {
    const { vm: a } = await build();
    await a.run({ timeout: 10_000 });
    const path = join(dir, 'mid.tsvm');
    (await a.snapshot(path)).close();
    await a.close();
    // Sparse on disk: blocks allocated are far fewer than the file's length.
    expect(statSync(path).blocks * 512).toBeLessThan(statSync(path).size / 4);
    const fileHash = () => createHash('sha256').update(readFileSync(path)).digest('hex');
    const before = fileHash();
    using snap = Snapshot.load(path, kvmBackend());
    const d = devices();
    await using b = await Machine.restore(snap, { devices: d.mappings });
    await runToEnd(b);
    expect(hash(b)).toBe(reference.hash);
    // The machine ran on a copy-on-write mapping of the file: the file is untouched.
    expect(fileHash()).toBe(before);
    const cut = join(dir, 'cut.tsvm');
    copyFileSync(path, cut);
    truncateSync(cut, statSync(cut).size - 4096);
    expect(() => Snapshot.load(cut, kvmBackend())).toThrow(/imageSize.*truncated/);
  });

  it('restore is refused without the devices the snapshot has state for, and nothing is left open', async () => {
    const { vm: a } = await build();
    await a.run({ timeout: 10_000 });
    using snap = await a.snapshot();
    await a.close();
    await expect(Machine.restore(snap)).rejects.toThrow(SnapshotFormatError);
    await expect(Machine.restore(snap)).rejects.toThrow(/devices\.console/);
  });

  it('forks share the snapshot copy-on-write: a child’s writes reach neither siblings nor the snapshot', async () => {
    const { vm: a } = await build();
    await a.run({ timeout: 10_000 });
    using snap = await a.snapshot();
    await a.close();
    const kids = await Promise.all([0, 1, 2, 3].map(async () => Machine.fork(snap, { devices: devices().mappings })));
    try {
      const at = 0x180000;
      const before = kids[1]!.memory.read(0x100000, 8);
      kids[0]!.memory.write(0x100000, Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8));
      kids[0]!.memory.write(at, Uint8Array.of(0xee));
      expect(kids[1]!.memory.read(0x100000, 8)).toEqual(before);
      expect(kids[2]!.memory.readUint(at, 1)).toBe(0);
      // A guest run in one child changes nothing in another.
      await runToEnd(kids[2]!);
      expect(hash(kids[2]!)).toBe(reference.hash);
      expect(kids[3]!.memory.read(0x100000, 8)).toEqual(before);
      // From a warm pool the fork is the same machine, minus KVM_CREATE_VM on its path.
      snap.prewarm(2);
      const e = await Machine.fork(snap, { devices: devices().mappings });
      expect(e.memory.read(0x100000, 8)).toEqual(before);
      await runToEnd(e);
      expect(hash(e)).toBe(reference.hash);
      expect(e.vcpu(0).getRegs()).toEqual(reference.regs);
      await e.close();
    } finally {
      for (const k of kids) await k!.close();
    }
  });

  it('a closed fork\'s VM serves the next fork of its snapshot, which runs as a fresh one and sees nothing of it; the closed fork\'s handles reach nothing', async () => {
    const snap = await pausedSnapshot();
    const first = await Machine.fork(snap, { devices: devices().mappings });
    // Its guest runs on and writes; its host writes RAM and sets registers.
    expect(await first.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit' });
    first.memory.write(0x180000, Uint8Array.of(0xee));
    first.vcpu(0).setRegs({ rax: 0xdeadn, r15: 0xbeefn });
    const staleMemory = first.memory;
    const staleVcpu = first.vcpu(0);
    expect(snap.returnedVms).toBe(0);
    await first.close();
    expect(snap.returnedVms).toBe(1);
    const d = devices();
    const second = await Machine.fork(snap, { devices: d.mappings });
    expect(snap.returnedVms).toBe(0); // it took that VM
    expect(second.memory.readUint(0x180000, 1)).toBe(0);
    expect(second.vcpu(0).getRegs()).toEqual(snap.manifest.vcpus[0]?.regs);
    await runToEnd(second);
    expect(d.out.text()).toBe(reference.text.slice(reference.text.length - d.out.text().length));
    expect(hash(second)).toBe(reference.hash);
    expect(second.vcpu(0).getRegs()).toEqual(reference.regs);
    // The closed machine's handles are spent: typed errors, not the new machine's RAM or vCPU.
    expect(() => staleMemory.read(0x180000, 1)).toThrow();
    expect(() => staleVcpu.getRegs()).toThrow();
    await second.close();
    expect(snap.returnedVms).toBe(1);
    // Given turns of the event loop, a machine is built from it ahead: the next fork takes that.
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    expect(snap.returnedVms).toBe(1);
    const d3 = devices();
    const third = await Machine.fork(snap, { devices: d3.mappings, name: 'third' });
    expect(snap.returnedVms).toBe(0);
    expect(third.name).toBe('third');
    await runToEnd(third);
    expect(d3.out.text()).toBe(d.out.text());
    expect(hash(third)).toBe(reference.hash);
    expect(third.vcpu(0).getRegs()).toEqual(reference.regs);
    await third.close();
    expect(snap.returnedVms).toBe(1);
    // What prewarm built is released by prewarm(0), not handed on as a closed fork's VM (a
    // ring-tracking VM never is: the log, so that this can fail).
    snap.prewarm(1, kvmBackend(), { dirtyTracking: 'log' });
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    snap.prewarm(0);
    expect(snap.returnedVms).toBe(1);
    snap.close();
    expect(snap.returnedVms).toBe(0);
  });

  it('a fork that ended in a shutdown (triple fault) or mid-I/O still hands on a clean VM: the next fork runs as a fresh one', async () => {
    using snap = await pausedSnapshot();
    // One fork dies: no IDT (limit 0) and a #UD at RIP (the host wrote ud2 there), so the CPU shuts down.
    const dying = await Machine.fork(snap, { devices: devices().mappings });
    const s = dying.vcpu(0).getSregs();
    dying.vcpu(0).setSregs({ ...s, idt: { ...s.idt, limit: 0 } });
    const rip = Number(dying.vcpu(0).getRegs().rip);
    dying.memory.write(rip, Uint8Array.of(0x0f, 0x0b));
    const stop = await dying.run({ timeout: 10_000 });
    expect(['shutdown', 'internal-error', 'exception', 'unhandled-exit']).toContain(stop.reason);
    await dying.close();
    expect(snap.returnedVms).toBe(1); // its VM was wiped and handed on, not destroyed
    // The next fork runs on that VM (it took it) and stops in the middle of an `out` (the exit
    // not completed), then hands the VM on again.
    const paused = await Machine.fork(snap, { devices: devices().mappings });
    expect(snap.returnedVms).toBe(0);
    expect(await paused.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit' });
    await paused.close();
    expect(snap.returnedVms).toBe(1);
    for (let i = 0; i < 2; i++) {
      const d = devices();
      const next = await Machine.fork(snap, { devices: d.mappings });
      await runToEnd(next);
      expect(hash(next)).toBe(reference.hash);
      expect(next.vcpu(0).getRegs()).toEqual(reference.regs);
      await next.close();
    }
  });

  it('reset re-copies exactly the dirtied pages and the machine replays identically', async () => {
    const { vm: a } = await build();
    await a.run({ timeout: 10_000 }); // paused after round 16
    using snap = await a.snapshot();
    await a.close();
    const d = devices();
    await using b = await Machine.fork(snap, { devices: d.mappings });
    expect(b.reset().pagesCopied).toBe(0);
    // One segment (16 rounds) stores into 16 distinct pages (page-per-round); the stack is unused.
    expect(await b.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 0x100 + 0x41 + 31 });
    const afterOne = hash(b);
    const r = b.reset();
    // PVM: exactly the 16 data pages. VMX/SVM: the CPU also sets accessed/dirty bits in the host
    // page tables (PML4, PDPT, the 4 PD pages), which the dirty log rightly reports (nested SVM: 19).
    if (b.capabilities.flavour === 'pvm') expect(r.pagesCopied).toBe(16);
    else { expect(r.pagesCopied).toBeGreaterThanOrEqual(16); expect(r.pagesCopied).toBeLessThanOrEqual(16 + 6); }
    expect(d.out.text()).toBe(reference.text.slice(0, 16));
    for (let i = 0; i < 3; i++) {
      await b.run({ timeout: 10_000 });
      expect(hash(b)).toBe(afterOne);
      expect(b.reset().pagesCopied).toBe(r.pagesCopied);
    }
    await runToEnd(b);
    expect(hash(b)).toBe(reference.hash);
    expect(b.vcpu(0).getRegs()).toEqual(reference.regs);
    expect(d.out.text()).toBe(reference.text);
  });

  it('with an in-kernel irqchip, PIC and PIT state travel too (the guest reads back what it programmed)', async () => {
    // Mask the PIC (IMR = 0xa5), program PIT channel 2 and open its gate (port 0x61 bit 0),
    // pause, then echo IMR and the gate bits. Not the counter or its output: KVM_SET_PIT2
    // reloads a channel's count at the time of the call, so those are time-dependent on any
    // restore (as a PC's PIT is), unlike the programmed state.
    const code = `
      mov al, 0xa5
      out 0x21, al
      mov al, 0xb0
      out 0x43, al
      mov al, 0x34
      out 0x42, al
      mov al, 0x12
      out 0x42, al
      mov al, 1
      out 0x61, al
      mov dx, ${PAUSE}
      out dx, al
      in al, 0x21
      mov dx, 0x3f8
      out dx, al
      in al, 0x61
      and al, 3
      out dx, al
      mov dx, 0xf4
      mov al, 7
      out dx, al`;
    const a = await Machine.create({ memory: 2 * MiB, irqchip: true });
    const d = devices();
    a.attachDevice(d.mappings);
    a.loadFlat(await asm(code, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    expect((await a.run({ timeout: 10_000 })).reason).toBe('debug-exit');
    using snap = await a.snapshot();
    expect(Object.keys(snap.manifest.vm).sort()).toEqual(['clock', 'ioapic', 'pic-master', 'pic-slave', 'pit2']);
    // A disturbs its own PIC after the snapshot: B must not see it.
    await runToEnd(a);
    const expected = d.out.text();
    expect([expected.charCodeAt(0), expected.charCodeAt(1)]).toEqual([0xa5, 1]);
    await a.close();
    const e = devices();
    await using b = await Machine.restore(snap, { devices: e.mappings });
    expect(b.irqchip).toBe(true);
    await runToEnd(b);
    expect(e.out.text()).toBe(expected);
  });

  it('reset also undoes device DMA and the host\'s own writes', async () => {
    const { vm: a } = await build();
    await a.run({ timeout: 10_000 });
    using snap = await a.snapshot();
    await a.close();
    await using b = await Machine.fork(snap, { devices: devices().mappings });
    const dma = new DeviceMemory(b.memory, 'blk');
    dma.write(0x1e0000n, Uint8Array.of(1, 2, 3)); // one page, through the DMA gate
    expect(b.reset().pagesCopied).toBe(1);
    expect(b.memory.read(0x1e0000, 3)).toEqual(new Uint8Array(3));
    b.memory.write(0x1e1000, Uint8Array.of(9)); // the host's own write: KVM's log misses it, GuestMemory does not
    expect(b.reset().pagesCopied).toBe(1);
    expect(b.memory.readUint(0x1e1000, 1)).toBe(0);
    expect(b.reset({ full: true }).pagesCopied).toBe(0); // nothing differs from the snapshot any more
    await runToEnd(b);
    expect(hash(b)).toBe(reference.hash);
  });
});
