import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend } from './testing/mock.js';

const MiB = 1024 * 1024;

async function halted(nmi: { pending?: boolean; masked?: boolean; source?: string }, rflags = 0x2n) {
  const backend = new MockBackend();
  const vcpu = backend.script();
  vcpu.whenEmpty = { kind: 'intr' };
  vcpu.halted = true;
  vcpu.regs.rflags = rflags;
  vcpu.nmi = { pending: nmi.pending ?? false, masked: nmi.masked ?? false, source: nmi.source };
  const vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true });
  const stop = await vm.run({ timeout: 60, sliceMs: 5 });
  await vm.close();
  return stop;
}

describe('a vCPU halted with IF=0 is reported as halt only when no NMI can wake it', () => {
  it('nothing pending, nothing routed: halt at once', async () => {
    const stop = await halted({});
    expect(stop.reason).toBe('halt');
    expect(stop.elapsedMs).toBeLessThan(50);
  });

  it.each([
    ['an NMI source is routed (IOAPIC entry in NMI mode)', { source: 'IOAPIC pin 2' }],
    ['an NMI is pending', { pending: true }],
  ])('%s: keeps running until the timeout, carrying halted: true', async (_n, nmi) => {
    expect(await halted(nmi)).toMatchObject({ reason: 'timeout', halted: true });
  });

  it('NMIs masked (halted inside an NMI handler): nothing can wake it, halt at once', async () => {
    expect((await halted({ masked: true, pending: true, source: 'LAPIC LINT0' })).reason).toBe('halt');
  });

  it('IF=1: a maskable interrupt may come; runs until the timeout', async () => {
    expect(await halted({}, 0x202n)).toMatchObject({ reason: 'timeout', halted: true });
  });
});
