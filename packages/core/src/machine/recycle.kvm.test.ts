import { readdirSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { KvmBackend } from '../backend/kvm.js';
import { asm } from '../asm.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import type { Vcpu } from '../vcpu.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
/** Where the dirtying guest writes its pattern (and the checking guest looks). */
const PATTERN_AT = 0x10_0000;
const PATTERN_QWORDS = 8192; // 64 KiB
/** `IA32_TSC`: time passes between two reads of any vCPU's; every other MSR must match. */
const TSC = 0x10;

/** Everything KVM's state API shows of a vCPU (what a fresh and a recycled vCPU must agree on). */
function stateOf(v: Vcpu, msrIndices: readonly number[]): Record<string, unknown> {
  const msrs: Record<string, bigint> = {};
  for (const ix of msrIndices) {
    if (ix === TSC) continue;
    try { const [e] = v.getMsrs([ix]); if (e) msrs[ix.toString(16)] = e.data; } catch { /* not readable on this vCPU */ }
  }
  const blobs = Object.fromEntries(Object.entries(v.backend.getState()).map(([k, b]) => [k, Buffer.from(b).toString('hex')]));
  return { regs: v.getRegs(), sregs: v.getSregs(), msrs, blobs };
}

describe.skipIf(!kvm.available)(`a closed plain machine's VM, kept and wiped, on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  // A backend of this file's own: what it keeps is nobody else's.
  const backend = kvm.available ? new KvmBackend() : undefined;
  afterAll(async () => { await backend?.settled(); backend?.close(); });
  const create = (memory: number = 2 * MiB) => Machine.create({ memory, backend: backend as KvmBackend });
  const onDebugExit = (vm: Machine) => vm.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });

  it('sees zeroed RAM, power-on registers, MSRs, FPU/XSAVE, debug registers and events, and no exit left pending by the last guest', async () => {
    const b = backend as KvmBackend;
    await b.dropKeptVms();
    const msrList = b.msrIndexList();
    const first = await create();
    const fresh = stateOf(first.vcpus[0] as Vcpu, msrList);
    // The first guest changes everything it can at CPL0, then writes a pattern over 64 KiB.
    onDebugExit(first);
    first.loadFlat(await asm(`
      mov ecx, 0x175
      mov eax, 0x12345678
      xor edx, edx
      wrmsr
      mov ecx, 0xc0000102
      mov eax, 0xdeadb000
      mov edx, 0x7fff
      wrmsr
      mov ecx, 0xc0000082
      mov eax, 0x401000
      xor edx, edx
      wrmsr
      mov ecx, 0x277
      mov eax, 0x04040404
      mov edx, 0x04040404
      wrmsr
      mov rax, 0x3000
      mov dr0, rax
      mov dr3, rax
      mov rax, 0x1122334455667788
      mov rdi, ${PATTERN_AT}
      mov rcx, ${PATTERN_QWORDS}
      rep stosq
      mov rbx, rax
      mov rsi, rax
      mov r8, rax
      mov r15, rax
      mov al, 0x21
      out 0xf4, al
      hlt`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect(await first.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 0x21 });
    // x87/SSE at CPL0 may be beyond an emulating host (PVM): change that state from the host.
    const fpu = (first.vcpus[0] as Vcpu).backend.getState()['xsave'];
    if (fpu) {
      fpu[0] = 0x7f; fpu[1] = 0x02; // FCW: another rounding/precision
      fpu.fill(0xa5, 160, 176); // XMM0
      fpu[512] = (fpu[512] as number) | 3; // XSTATE_BV: x87 and SSE hold values (not their init state)
      (first.vcpus[0] as Vcpu).backend.setState({ xsave: fpu });
      expect((first.vcpus[0] as Vcpu).backend.getState()['xsave']?.[160]).toBe(0xa5);
    }
    expect(first.memory.read(PATTERN_AT, 8)).not.toEqual(new Uint8Array(8));
    const stale = first.vcpus[0] as Vcpu;
    const kept = b.recycledVms;
    await first.close();
    expect(b.keptVms()).toBe(1);

    const second = await create();
    expect(b.recycledVms).toBe(kept + 1); // this one is the first machine's VM
    expect(b.keptVms()).toBe(0);
    // The old machine's handles reach nothing of it.
    expect(() => stale.getMsrs([0x175])).toThrow();
    expect(() => first.memory.read(PATTERN_AT, 8)).toThrow();
    // Its vCPU looks exactly like a brand-new one (TSC aside), before anything is loaded.
    expect(stateOf(second.vcpus[0] as Vcpu, msrList)).toEqual(fresh);
    // And a machine made from scratch meanwhile agrees (the power-on image is a fresh vCPU's).
    const other = await create();
    expect(b.recycledVms).toBe(kept + 1);
    expect(stateOf(other.vcpus[0] as Vcpu, msrList)).toEqual(fresh);
    await other.close();
    // RAM: zero as the host sees it and as the guest reads it through KVM's mappings.
    expect(second.memory.read(0, 2 * MiB).every((x) => x === 0)).toBe(true);
    onDebugExit(second);
    second.loadFlat(await asm(`
      mov rsi, ${PATTERN_AT}
      mov rcx, ${PATTERN_QWORDS}
      xor rbx, rbx
    l: or rbx, [rsi]
      add rsi, 8
      loop l
      test rbx, rbx
      setnz al
      add al, 0x40
      out 0xf4, al
      hlt`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect(await second.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 0x40 });

    // An `in` nobody answers stops the guest with the exit pending; KVM would complete it (AL
    // all-ones, RIP past an instruction) at the next KVM_RUN: that must not be the next guest's.
    second.loadFlat(await asm('in al, 0x80\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect(await second.run({ timeout: 5000 })).toMatchObject({ reason: 'unhandled-exit', kind: 'io' });
    await second.close();
    const third = await create();
    expect(b.recycledVms).toBe(kept + 2);
    onDebugExit(third);
    // Same RIP as the `in`: a stale completion would set AL and skip the 2-byte `out` (a halt stop).
    third.loadFlat(await asm('out 0xf4, al\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    (third.vcpus[0] as Vcpu).setRegs({ rax: 0x33n });
    expect(await third.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 0x33 });
    await third.close();
  });

  it('keeps only plain machines: irqchip, a dirty-logged region, two regions, another size are served or destroyed as usual', async () => {
    const b = backend as KvmBackend;
    await b.dropKeptVms();
    for (const options of [
      { memory: 2 * MiB, irqchip: true },
      { memory: [{ start: 0, size: 2 * MiB, logDirty: true }] },
      { memory: [{ start: 0, size: MiB }, { start: 4 * MiB, size: MiB }] },
      { memory: [{ start: MiB, size: MiB }] },
    ]) {
      const vm = await Machine.create({ ...options, backend: b });
      await vm.close();
      expect(b.keptVms()).toBe(0);
    }
    // A kept VM of one size serves a plain machine of another (its slot is replaced).
    await (await create(2 * MiB)).close();
    expect(b.keptVms()).toBe(1);
    const n = b.recycledVms;
    const big = await create(4 * MiB);
    expect(b.recycledVms).toBe(n + 1);
    onDebugExit(big);
    big.loadFlat(await asm('mov rax, 0x3ff000\n mov byte ptr [rax], 7\n mov al, [rax]\n out 0xf4, al\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect(await big.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 7 });
    await big.close();
    expect(b.keptVms()).toBe(1);
  });

  it('holds at most 2 VMs, and dropKeptVms releases them: fds come back', async () => {
    const b = backend as KvmBackend;
    await b.dropKeptVms();
    await b.settled();
    await Machine.released();
    // Less the spares' (a VM and a vCPU fd each), which come and go as creates take them.
    const fds = () => readdirSync('/proc/self/fd').length - 2 * b.sparesReady(false) - 2 * b.sparesReady(true);
    const fd0 = fds();
    const open = await Promise.all([create(), create(), create()]);
    for (const vm of open) await vm.close();
    expect(b.keptVms()).toBe(2);
    await b.dropKeptVms();
    await b.settled();
    await Machine.released();
    expect(b.keptVms()).toBe(0);
    expect(fds()).toBe(fd0);
  });
});
