/**
 * Two vCPUs on real KVM: the bootstrap processor starts the application processor with
 * INIT + SIPI + SIPI through its in-kernel LAPIC (those MMIO writes never exit), the AP runs a
 * real-mode stub at the SIPI vector's page, and every exit of both reaches the same hooks.
 * Ring-0 and real-mode code are emulated on some hosts (~1 µs per instruction): the guests are tiny.
 */
import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { asm } from '../asm.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import type { ExitHook } from '../hooks.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
const FLAG = 0x7000;
const SIPI_VECTOR = 0x08; // the AP starts at CS=0x0800, IP=0: physical 0x8000

// BSP, 64-bit ring 0. RAX holds the LAPIC base: an absolute 0xfee00300 operand would be
// sign-extended in 64-bit mode. ICR high (0x310) = 0, low (0x300): shorthand "all excluding
// self" (0b11 << 18), level assert (1 << 14), delivery mode INIT (0b101 << 8) / start-up (0b110 << 8).
const bsp = `
  mov eax, 0xfee00000
  mov dword ptr [rax + 0xf0], 0x1ff
  mov dword ptr [rax + 0x310], 0
  mov dword ptr [rax + 0x300], 0x000c4500
  mov dword ptr [rax + 0x300], ${0x000c4600 | SIPI_VECTOR}
  mov dword ptr [rax + 0x300], ${0x000c4600 | SIPI_VECTOR}
wait:
  cmp byte ptr [${FLAG}], 0
  je wait
  mov al, byte ptr [${FLAG}]
  mov dx, 0xf4
  out dx, al
  hlt`;

// AP, real mode (DS base 0 after INIT): report on port 0x80, raise the flag, halt for good.
const ap = `
  mov al, 0x42
  out 0x80, al
  mov byte ptr [${FLAG}], al
  cli
  hlt`;

// Two phases for snapshots: the BSP starts the AP (stub 1 at 0x8000), checkpoints on port 0xf5,
// then restarts the halted AP with INIT/SIPI to stub 2 (0x9000) and ends with stub 2's value.
const startAp = (vector: number): string => `
  mov dword ptr [rax + 0x300], 0x000c4500
  mov dword ptr [rax + 0x300], ${0x000c4600 | vector}
  mov dword ptr [rax + 0x300], ${0x000c4600 | vector}`;
const twoPhase = `
  mov eax, 0xfee00000
  mov dword ptr [rax + 0xf0], 0x1ff
  mov dword ptr [rax + 0x310], 0
  ${startAp(0x08)}
wait1:
  cmp byte ptr [${FLAG}], 0
  je wait1
  mov dx, 0xf5
  out dx, al
  mov eax, 0xfee00000
  ${startAp(0x09)}
wait2:
  cmp byte ptr [${FLAG + 4}], 0
  je wait2
  mov al, byte ptr [${FLAG + 4}]
  mov dx, 0xf4
  out dx, al
  hlt`;
const ap2 = ap.replace('0x42', '0x43').replace(`[${FLAG}]`, `[${FLAG + 4}]`);

/** Ports of the guests: 0x80 records (vCPU, value); 0xf4 ends the run; 0xf5 is a checkpoint stop (code 0xf5). */
function ports(m: Machine, posted: Array<[number, number]>): void {
  m.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  m.attach({ port: 0xf5, size: 1 }, { name: 'checkpoint', write: (_o, _v, _s, a) => a.requestStop({ reason: 'debug-exit', code: 0xf5 }) });
  m.attach({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
  m.addHook({ name: 'post-seen', mode: 'mediate', matches: (e) => e.kind === 'io' && e.port === 0x80, handle: (e, info) => { if (e.kind === 'io') posted.push([info.vcpu, e.data[0] ?? -1]); } });
}

describe.skipIf(!kvm.available)(`SMP on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('the BSP starts the AP with INIT/SIPI/SIPI; both vCPUs\' exits reach the hooks; the stop names vCPU 0', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 2 });
    expect(vm.vcpus).toHaveLength(2);
    const posted: number[] = [];
    vm.attach({ port: 0x80, size: 1 }, { name: 'post', write: (_o, v) => { posted.push(v); } });
    vm.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    const seen: Array<[vcpu: number, port: number]> = [];
    const hook: ExitHook = {
      name: 'all-ports', mode: 'mediate',
      matches: (e) => e.kind === 'io',
      handle: (e, info) => { if (e.kind === 'io') seen.push([info.vcpu, e.port]); },
    };
    vm.addHook(hook);
    vm.memory.write(SIPI_VECTOR << 12, await asm(ap, { bits: 16, address: 0 }));
    vm.loadFlat(await asm(bsp, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 0 });
    const stop = await vm.run({ timeout: 20_000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 0x42, vcpu: 0 });
    expect(posted).toEqual([0x42]);
    expect(seen).toEqual([[1, 0x80], [0, 0xf4]]);
    expect(vm.memory.readUint(FLAG, 1)).toBe(0x42);
    // The AP is halted with IF=0 for good; the BSP ended on its `out`.
    expect(vm.vcpu(1).getRegs().rflags & 0x200n).toBe(0n);
  }, 30_000);

  it('a machine whose AP is never started and whose BSP halts with IF=0 stops as halt', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 2 });
    vm.loadFlat(await asm('cli\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 0 });
    const stop = await vm.run({ timeout: 10_000 });
    expect(stop).toMatchObject({ reason: 'halt', vcpu: 0 });
    expect(stop.elapsedMs).toBeLessThan(5000);
  }, 20_000);

  it('snapshot, fork and restore carry both vCPUs: a halted AP is restarted by INIT/SIPI in each copy', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 2 });
    const posted: Array<[number, number]> = [];
    ports(vm, posted);
    vm.memory.write(0x8000, await asm(ap, { bits: 16, address: 0 }));
    vm.memory.write(0x9000, await asm(ap2, { bits: 16, address: 0 }));
    vm.loadFlat(await asm(twoPhase, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 0 });
    expect(await vm.run({ timeout: 20_000 })).toMatchObject({ reason: 'debug-exit', code: 0xf5, vcpu: 0 });
    expect(posted).toEqual([[1, 0x42]]);
    // The AP sits halted in real mode in stub 1's code segment.
    expect(vm.vcpu(1).getSregs().cs.selector).toBe(0x0800);
    using snap = await vm.snapshot();
    expect(snap.manifest.vcpus.map((v) => v.id)).toEqual([0, 1]);
    for (const how of ['fork', 'restore'] as const) {
      const mine: Array<[number, number]> = [];
      const options = { setup: (m: Machine) => ports(m, mine) };
      await using copy = await (how === 'fork' ? Machine.fork(snap, options) : Machine.restore(snap, options));
      expect(copy.vcpus).toHaveLength(2);
      expect(copy.vcpu(1).getSregs().cs.selector).toBe(0x0800);
      expect(copy.memory.readUint(FLAG, 1)).toBe(0x42);
      const stop = await copy.run({ timeout: 20_000 });
      expect(stop).toMatchObject({ reason: 'debug-exit', code: 0x43, vcpu: 0 });
      expect(mine).toEqual([[1, 0x43]]);
      expect(copy.vcpu(1).getSregs().cs.selector).toBe(0x0900);
    }
    // The original was not disturbed by its copies and finishes the same way.
    expect(vm.memory.readUint(FLAG + 4, 1)).toBe(0);
    expect(await vm.run({ timeout: 20_000 })).toMatchObject({ reason: 'debug-exit', code: 0x43, vcpu: 0 });
    expect(posted).toEqual([[1, 0x42], [1, 0x43]]);
  }, 60_000);

  it('three vCPUs: both APs start from one broadcast SIPI and each sees its own APIC id in CPUID', async () => {
    const COUNT = 0x7010;
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3 });
    const ids: Array<[vcpu: number, apicId: number]> = [];
    vm.attach({ port: 0x81, size: 1 }, { name: 'apic-id', write: () => {} });
    vm.attach({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    vm.addHook({ name: 'ids', mode: 'mediate', matches: (e) => e.kind === 'io' && e.port === 0x81, handle: (e, info) => { if (e.kind === 'io') ids.push([info.vcpu, e.data[0] ?? -1]); } });
    vm.memory.write(0x8000, await asm(`
      mov eax, 1
      cpuid
      shr ebx, 24
      mov al, bl
      out 0x81, al
      lock inc byte ptr [${COUNT}]
      cli
      hlt`, { bits: 16, address: 0 }));
    vm.loadFlat(await asm(`
      mov eax, 0xfee00000
      mov dword ptr [rax + 0xf0], 0x1ff
      mov dword ptr [rax + 0x310], 0
      ${startAp(0x08)}
    wait:
      cmp byte ptr [${COUNT}], 2
      jne wait
      mov al, byte ptr [${COUNT}]
      mov dx, 0xf4
      out dx, al
      hlt`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 0 });
    const stop = await vm.run({ timeout: 20_000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 2, vcpu: 0 });
    expect(ids.sort((a, b) => a[0] - b[0])).toEqual([[1, 1], [2, 2]]);
  }, 30_000);

  it('an exit of the AP nobody handles stops the machine, naming vCPU 1 and its instruction', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 2 });
    vm.memory.write(0x8000, await asm('mov al, 0x42\n out 0x99, al\n cli\n hlt', { bits: 16, address: 0 }));
    vm.loadFlat(await asm(`
      mov eax, 0xfee00000
      mov dword ptr [rax + 0xf0], 0x1ff
      mov dword ptr [rax + 0x310], 0
      ${startAp(0x08)}
    spin:
      jmp spin`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 0 });
    const stop = await vm.run({ timeout: 20_000 });
    expect(stop).toMatchObject({ reason: 'unhandled-exit', kind: 'io', address: 0x99n, vcpu: 1 });
    // The `out` is at IP 2 of the AP's real-mode code segment, whatever the flavour does with RIP.
    expect(stop.rip).toBe(2n);
  }, 30_000);
});
