import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { asm } from './asm.js';
import { kvmAvailability } from './testing/kvm-gate.js';
import type { ExitHook } from './hooks.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;

describe.skipIf(!kvm.available)(`bad input on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('an internal-error stop carries the data words and the code at RIP (int3 under KVM_GUESTDBG_USE_SW_BP at CPL0)', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.loadFlat(await asm('nop\n int3\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    vm.vcpu(0).setGuestDebug(0x1 | 0x1_0000);
    const stop = await vm.run({ timeout: 5000 });
    // On VMX/SVM this is a debug exit instead; the KVM-side facts differ per host.
    if (stop.reason !== 'internal-error') { expect(['unhandled-exit', 'exception']).toContain(stop.reason); return; }
    expect(stop.suberror).toBe(1);
    expect(stop.data.length).toBeGreaterThan(0);
    expect(stop.bitness).toBe(64);
    // Whatever KVM reported, core's own read at RIP starts with the instruction it stopped on.
    const at = Number(stop.rip) - 0x1000;
    expect(stop.code[0]).toBe([0x90, 0xcc, 0xf4][at]);
    if (stop.instruction) expect(stop.instruction[0]).toBe(0xcc);
  });
});

// cli; software-enable the LAPIC (KVM does not deliver the IOAPIC's NMI to a disabled one); route
// the PIT to NMI delivery, through LINT0 (KVM's NMI-watchdog path) or IOAPIC pins 0 and 2 (with and
// without the ISA override); start the PIT at 100 Hz; hlt. Only the NMI can wake this vCPU.
const ROUTES = {
  none: '',
  lint0: 'mov dword ptr [rdi+0x350], 0x400',
  ioapic: `mov rsi, 0xfec00000
  mov dword ptr [rsi], 0x10
  mov dword ptr [rsi+0x10], 0x400
  mov dword ptr [rsi], 0x14
  mov dword ptr [rsi+0x10], 0x400`,
};
const nmiGuest = (route: keyof typeof ROUTES) => `
  cli
  mov rdi, 0xfee00000
  mov dword ptr [rdi+0xf0], 0x1ff
  ${ROUTES[route]}
  mov al, 0x34
  out 0x43, al
  mov al, 0x9c
  out 0x40, al
  mov al, 0x2e
  out 0x40, al
  hlt
  hlt`;

describe.skipIf(!kvm.available)(`halt with IF=0 on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it.each(['lint0', 'ioapic'] as const)('an NMI routed from the PIT through %s wakes a vCPU halted with IF=0: not reported as halt', async (route) => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true });
    vm.loadFlat(await asm(nmiGuest(route), { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'exception', vector: 2 });
  });

  it('without an NMI route the same guest is reported as halt at once', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true });
    vm.loadFlat(await asm(nmiGuest('none'), { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop.reason).toBe('halt');
    expect(stop.elapsedMs).toBeLessThan(1000);
  });
});

describe.skipIf(!kvm.available)(`string I/O on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('rep insb: the hook sees each exit\'s element count, the counts add up, and emulate fills every element', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', read: () => 0x11 });
    const counts: number[] = [];
    const hook: ExitHook = { name: 'kbd-emulate', mode: 'mediate', matches: (e) => e.kind === 'io', handle: (e) => { if (e.kind === 'io') counts.push(e.count); return { verdict: 'emulate', value: 0x5a }; } };
    vm.addHook(hook);
    vm.loadFlat(await asm('mov rdi, 0x3000\n mov rcx, 300\n mov dx, 0x60\n cld\n rep insb\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect((await vm.run({ timeout: 5000 })).reason).toBe('halt');
    expect(counts.reduce((a, b) => a + b, 0)).toBe(300);
    expect(vm.memory.read(0x3000, 300)).toEqual(new Uint8Array(300).fill(0x5a));
    expect(vm.memory.read(0x3000 + 300, 1)[0]).toBe(0);
    expect(vm.hookStats().get(hook)).toMatchObject({ calls: counts.length, elements: 300 });
  });

  it('rep outsb denied with ignore: no element reaches the device', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    const got: number[] = [];
    vm.io.register({ port: 0x60, size: 1 }, { name: 'kbd', write: (_o, v) => { got.push(v); } });
    vm.addHook({ name: 'deny-out', mode: 'mediate', matches: (e) => e.kind === 'io', handle: () => ({ verdict: 'deny', effect: 'ignore' }) });
    vm.memory.fill(0x3000, 200, 0x77);
    vm.loadFlat(await asm('mov rsi, 0x3000\n mov rcx, 200\n mov dx, 0x60\n cld\n rep outsb\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect((await vm.run({ timeout: 5000 })).reason).toBe('halt');
    expect(got).toEqual([]);
  });
});
