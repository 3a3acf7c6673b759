// Reset's fast path (registers, special registers and events through kvm_run, MP state skipped
// without an in-kernel LAPIC, an `out` not re-entered for completion) must leave a machine that
// continues exactly as a fresh fork of the same snapshot: each guest below reads a piece of CPU
// state into RAM and then changes it, so a piece reset failed to put back shows up as different
// RAM, registers or stop on the run after the reset.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { VCPU_EVENTS_OFFSETS as EV } from '@tsvm/kvm-backend';
import { Machine } from '../machine.js';
import { asm } from '../asm.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import type { Device, DeviceMapping } from '../device.js';
import type { Snapshot } from './snapshot.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
const OUT = 0x200000;

const exitDev: Device = { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) };
const devices: DeviceMapping[] = [{ range: { port: 0xf4, size: 1 }, device: exitDev }];
const pause = (code: number) => `mov al, ${code}\n mov dx, 0xf4\n out dx, al`;

// Ring 0 (emulated on PVM): MSRs, debug registers, CR4, DS, RFLAGS, XMM1 (movdqu is emulated).
const ring0 = `
  top:
  ${pause(1)}
  inc r13
  mov ecx, 0x175
  rdmsr
  mov [${OUT}], eax
  mov [${OUT + 4}], edx
  mov ecx, 0xc0000102
  rdmsr
  mov [${OUT + 8}], eax
  mov [${OUT + 12}], edx
  mov ecx, 0xc0000081
  rdmsr
  mov [${OUT + 16}], eax
  mov [${OUT + 20}], edx
  mov rax, dr0
  mov [${OUT + 24}], rax
  mov rax, dr7
  mov [${OUT + 32}], rax
  mov rax, cr4
  mov [${OUT + 40}], rax
  mov ax, ds
  mov [${OUT + 48}], ax
  pushfq
  pop rax
  mov [${OUT + 56}], rax
  movdqu [${OUT + 64}], xmm1
  mov [${OUT + 80}], r13
  mov ecx, 0x175
  mov eax, 0x5151000
  xor edx, edx
  wrmsr
  mov ecx, 0xc0000102
  mov eax, 0x6262000
  wrmsr
  mov ecx, 0xc0000081
  mov eax, 0x7373
  mov edx, 0x00230010
  wrmsr
  mov rax, 0x5000
  mov dr0, rax
  mov rax, 0x30400
  mov dr7, rax
  mov rax, cr4
  xor rax, 4
  mov cr4, rax
  xor eax, eax
  mov ds, ax
  std
  movdqu xmm1, [0x1000]
  ${pause(2)}
  jmp top`;

// Ring 3 (native): x87 stack and control word, XMM0, DS, RFLAGS.
const ring3 = `
  top:
  ${pause(1)}
  inc r13
  fnstsw ax
  mov [${OUT}], ax
  fnstcw [${OUT + 2}]
  movq rax, xmm0
  mov [${OUT + 8}], rax
  mov ax, ds
  mov [${OUT + 16}], ax
  pushfq
  pop rax
  mov [${OUT + 24}], rax
  mov [${OUT + 32}], r13
  fld1
  fld1
  mov word ptr [${OUT + 40}], 0x0f7f
  fldcw [${OUT + 40}]
  mov rax, 0x1122334455667788
  movq xmm0, rax
  xor eax, eax
  mov ds, ax
  std
  ${pause(2)}
  jmp top`;

const hash = (vm: Machine) => createHash('sha256').update(vm.memory.read(0, vm.memory.totalSize)).digest('hex');

async function template(code: string, ring: 0 | 3): Promise<Snapshot> {
  const vm = await Machine.create({ memory: 4 * MiB, name: `reset-r${ring}` });
  vm.attachDevice(devices);
  vm.loadFlat(await asm(code, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring });
  expect(await vm.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 1 });
  const snap = await vm.snapshot();
  await vm.close();
  return snap;
}

/** Runs to the end of the next observe-and-change round: what a machine must look like after it. */
async function finish(m: Machine): Promise<{ out: string; regs: unknown; sregs: unknown; hash: string }> {
  let stop = await m.run({ timeout: 10_000 });
  if (stop.reason === 'debug-exit' && stop.code === 1) stop = await m.run({ timeout: 10_000 });
  expect(stop).toMatchObject({ reason: 'debug-exit', code: 2 });
  const v = m.vcpu(0).backend;
  return { out: Buffer.from(m.memory.read(OUT, 96)).toString('hex'), regs: v.getRegs(), sregs: v.getSregs(), hash: hash(m) };
}

describe.skipIf(!kvm.available)(`reset fast path on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  for (const [ring, code] of [[0, ring0], [3, ring3]] as const) {
    it(`a ring-${ring} guest that changes its CPU state continues after each reset exactly as a fresh fork`, async () => {
      using snap = await template(code, ring);
      await using fresh = await Machine.fork(snap, { devices });
      const want = await finish(fresh);
      // Without a reset the next round reads the changed state: the guest does change what it reads
      // (so the comparisons below can fail), and reset must undo all of it.
      const changed = await finish(fresh);
      expect(changed.out).not.toBe(want.out);
      fresh.reset();
      expect(await finish(fresh)).toEqual(want);
      await using child = await Machine.fork(snap, { devices });
      for (let i = 0; i < 3; i++) {
        const got = await finish(child);
        expect(got).toEqual(want);
        const r = child.reset();
        expect(r.pagesCopied).toBeGreaterThan(0);
        // A ring-3 guest above the host's system area can change nothing only CPL0 can.
        expect(r.cpu).toBe(ring === 3 ? 'cpl3' : 'full');
      }
      // What reset left is what KVM reports (the deferred state is read back through it).
      const after = child.vcpu(0).backend;
      const s0 = snap.manifest.vcpus[0];
      expect(after.getRegs()).toEqual(s0?.regs);
      expect(after.getState()['events']).toEqual(s0?.blobs['events']);
      const ix = [0x175, 0xc0000102, 0xc0000081];
      expect(after.getMsrs(ix)).toEqual(ix.map((i) => s0?.msrs.find((e) => e.index === i)));
    });
  }

  it('loadState: vCPU events written into kvm_run are loaded by the next KVM_RUN (an injected #UD is taken), and read back before it', async () => {
    using snap = await template(ring3, 3);
    await using m = await Machine.fork(snap, { devices });
    const v = m.vcpu(0).backend;
    if (!v.loadState) throw new Error('the KVM backend has loadState');
    const s0 = snap.manifest.vcpus[0];
    if (!s0) throw new Error('no vCPU 0');
    const events = Uint8Array.from(s0.blobs['events'] ?? []);
    events[EV.exception_injected] = 1;
    events[EV.exception_nr] = 6; // #UD
    events[EV.exception_has_error_code] = 0;
    const regs = { ...s0.regs, r14: 0x77n };
    expect(v.loadState({ regs, sregs: s0.sregs, blobs: { ...s0.blobs, events } })).toBe(process.env['TSVM_NO_SYNC_REGS'] !== '1');
    expect(v.getRegs().r14).toBe(0x77n);
    expect(v.getSregs()).toEqual(s0.sregs);
    const stop = await m.run({ timeout: 10_000 });
    expect(stop).toMatchObject({ reason: 'exception', vector: 6 });
    expect(v.getRegs().r14).toBe(0x77n);
    // The same without the exception: the guest runs on to its end.
    m.reset();
    expect(v.loadState({ regs, sregs: s0.sregs, blobs: s0.blobs })).toBe(true);
    expect(await m.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect(v.getRegs().r14).toBe(0x77n);
  });

  it('reading or writing state between loadState and the next run goes through KVM in order (getState, setSregs)', async () => {
    using snap = await template(ring3, 3);
    await using m = await Machine.fork(snap, { devices });
    const want = await finish(m);
    m.reset();
    const v = m.vcpu(0).backend;
    // getState flushes the deferred special registers and events through ioctls first.
    expect(v.getState()['events']).toEqual(snap.manifest.vcpus[0]?.blobs['events']);
    expect(v.getSregs()).toEqual(snap.manifest.vcpus[0]?.sregs);
    expect(await finish(m)).toEqual(want);
    m.reset();
    // A setSregs after the reset wins over the deferred copy.
    const s = v.getSregs();
    v.setSregs({ ...s, ds: { ...s.ds, selector: 0 } });
    expect(v.getSregs().ds.selector).toBe(0);
    await m.run({ timeout: 10_000 });
    expect(m.memory.read(OUT + 16, 2)).toEqual(Uint8Array.of(0, 0));
  });

  describe('CPL3 reset', () => {
    const sysOf = (m: Machine) => m.layout.systemArea as number;

    it('falls back to a full reset after the host writes a control page or sets special registers, then returns to CPL3 resets', async () => {
      using snap = await template(ring3, 3);
      await using m = await Machine.fork(snap, { devices });
      const want = await finish(m);
      expect(m.reset().cpu).toBe('cpl3');
      // The same bytes written back into the IDT: a host write the reset cannot judge.
      const idt = sysOf(m) + 0x9000;
      m.memory.write(idt, m.memory.read(idt, 16));
      await finish(m);
      expect(m.reset().cpu).toBe('full');
      expect(await finish(m)).toEqual(want);
      expect(m.reset().cpu).toBe('cpl3');
      // Special registers set by the host (it could have put the guest at CPL0).
      const v = m.vcpu(0);
      v.setSregs(v.getSregs());
      expect(m.reset().cpu).toBe('full');
      expect(await finish(m)).toEqual(want);
      expect(m.reset().cpu).toBe('cpl3');
    });

    it('a guest write into a control page seen by the dirty log (the host put the vCPU at CPL0) means a full reset', async () => {
      using snap = await template(ring3, 3);
      await using m = await Machine.fork(snap, { devices });
      const want = await finish(m);
      m.reset();
      // A ring-0 excursion arranged through registers alone (GPRs are not counted as host state
      // writes), as a guest that escaped would make one: it writes the IDT page.
      const v = m.vcpu(0);
      const idt = sysOf(m) + 0x9000;
      m.memory.write(0x3000, await asm(`mov rbx, ${idt + 0x800}\n mov qword ptr [rbx], 1\n ${pause(9)}`, { bits: 64, address: 0x3000 }));
      // Kernel CS/SS through the raw vCPU under the backend, which the backend's count of state
      // writes does not see: so only the dirty log can tell (defence in depth).
      const b = v.backend;
      b.getState(); // what reset left in kvm_run goes to KVM first
      const s = b.getSregs();
      const before = b.stateVersion?.();
      (b as unknown as { kvm: { setSregs(x: typeof s): void } }).kvm.setSregs({ ...s, cs: { ...s.cs, selector: 0x08, dpl: 0 }, ss: { ...s.ss, selector: 0x10, dpl: 0 } });
      expect(b.stateVersion?.()).toBe(before);
      v.setRegs({ rip: 0x3000n });
      expect(await m.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 9 });
      expect(m.reset().cpu).toBe('full');
      expect(await finish(m)).toEqual(want);
    });

    it('a snapshot whose syscall handler is guest code (set by the host) resets fully', async () => {
      const vm = await Machine.create({ memory: 4 * MiB, name: 'lstar' });
      vm.attachDevice(devices);
      vm.loadFlat(await asm(ring3, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
      vm.vcpu(0).setMsrs([{ index: 0xc000_0082, data: 0x3000n }]);
      expect(await vm.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 1 });
      using snap = await vm.snapshot();
      await vm.close();
      await using m = await Machine.fork(snap, { devices });
      await finish(m);
      expect(m.reset().cpu).toBe('full');
    });

    it('two CPL3 resets with no run between continue as one: the second takes over the first\'s entry stub', async () => {
      using snap = await template(ring3, 3);
      await using fresh = await Machine.fork(snap, { devices });
      const want = await finish(fresh);
      await using m = await Machine.fork(snap, { devices });
      await finish(m);
      await finish(m);
      for (let i = 0; i < 3; i++) {
        expect(m.reset().cpu).toBe('cpl3');
        expect(m.reset().cpu).toBe('cpl3'); // (it put the stub's page back before writing the stub again)
        expect(await finish(m)).toEqual(want);
      }
    });

    it('between the reset and the run RIP reads as the snapshot\'s; a RIP set then starts there with the snapshot\'s x87/SSE state; a snapshot then is the snapshot\'s state', async () => {
      // An alternative entry that only reports the x87 control word and XMM0.
      const alt = 0x3000;
      const report = await asm(`fnstcw [${OUT + 88}]\n movq rax, xmm0\n mov [${OUT + 96}], rax\n ${pause(7)}`, { bits: 64, address: alt });
      using snap = await template(ring3, 3);
      const s0 = snap.manifest.vcpus[0];
      if (!s0) throw new Error('no vCPU 0');
      // What a fresh fork started at the alternative entry reports.
      await using fresh = await Machine.fork(snap, { devices });
      fresh.memory.write(alt, report);
      fresh.vcpu(0).setRegs({ rip: BigInt(alt) });
      expect(await fresh.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
      const want = Buffer.from(fresh.memory.read(OUT + 88, 16)).toString('hex');
      await using m = await Machine.fork(snap, { devices });
      await finish(m);
      await finish(m); // the guest changed its control word and XMM0
      m.memory.write(alt, report);
      expect(m.reset().cpu).toBe('cpl3');
      expect(m.vcpu(0).getRegs()).toEqual(s0.regs);
      m.memory.write(alt, report); // (reset took it away with the other host writes)
      m.vcpu(0).setRegs({ rip: BigInt(alt) });
      expect(m.vcpu(0).getRegs().rip).toBe(BigInt(alt));
      expect(await m.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
      expect(Buffer.from(m.memory.read(OUT + 88, 16)).toString('hex')).toBe(want);
      // The host-reserved page the stub used holds the snapshot's bytes again.
      const stub = sysOf(m) + 0xe000;
      expect(Buffer.from(m.memory.read(stub, 4096)).equals(Buffer.from(fresh.memory.read(stub, 4096)))).toBe(true);
      // A snapshot taken right after a reset is the snapshot's state (the stub's work done first).
      expect(m.reset().cpu).toBe('cpl3');
      using again = await m.snapshot();
      const a0 = again.manifest.vcpus[0];
      expect(a0?.regs).toEqual(s0.regs);
      expect(a0?.blobs['xsave']).toEqual(s0.blobs['xsave']);
      expect(Buffer.from(m.memory.read(stub, 4096)).equals(Buffer.from(fresh.memory.read(stub, 4096)))).toBe(true);
    });
  });
});
