import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { asm } from './testing/asm.js';
import { kvmAvailability } from './testing/kvm-gate.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;

describe.skipIf(!kvm.available)(`bad input on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('an internal-error stop carries the data words and the code at RIP (int3 under KVM_GUESTDBG_USE_SW_BP at CPL0)', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.loadFlat(await asm('nop\n int3\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    vm.vcpu(0).setGuestDebug(0x1 | 0x1_0000);
    const stop = await vm.run({ timeout: 5000 });
    // On VMX/SVM this is a debug exit instead; the KVM-side facts differ per host.
    if (process.env.TSVM_DEBUG_TEST) console.log(stop);
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
