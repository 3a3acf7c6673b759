import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend } from './testing/mock.js';
import { loadElf } from './loaders/elf.js';
import { buildElf } from './loaders/fixtures.test-util.js';
import { InvalidArgumentError } from './errors.js';

describe('Machine.enter applies a loader entry state', () => {
  it('ELF32 → 32-bit protected mode at ring 0 with the loader registers; host tables avoided', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script();
    const vm = await Machine.create({ memory: 4 * 1024 * 1024, backend });
    const image = buildElf({ class: 32, entry: 0x100000n, segments: [{ paddr: 0x100000n, data: Uint8Array.of(0xf4) }] });
    const r = loadElf(vm.memory, image, {});
    vm.enter({ mode: 'protected32', rip: r.entry, registers: { rbx: 0x1234n } });
    expect(vcpu.regs.rip).toBe(0x100000n);
    expect(vcpu.regs.rbx).toBe(0x1234n);
    expect(vcpu.sregs.cr0 & 0x80000001n).toBe(1n);
    expect(vcpu.sregs.cs.db).toBe(1);
    expect(vcpu.sregs.cs.dpl).toBe(0);
    expect(vm.hostReserved()).toEqual([{ start: 4 * 1024 * 1024 - 0x10000, size: 0x10000 }]);
    expect(() => vm.enter({ mode: 'long64', rip: BigInt(4 * 1024 * 1024 - 0x100), registers: {}, identityMap: [] })).toThrow(InvalidArgumentError);
    vm.enter({ mode: 'long64', rip: 0x100000n, registers: { rsi: 0x7000n }, identityMap: [] });
    expect(vcpu.sregs.efer & 0x500n).toBe(0x500n);
    expect(vcpu.regs.rsi).toBe(0x7000n);
    await vm.close();
  });
});
