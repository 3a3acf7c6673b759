import { describe, expect, it } from 'vitest';
import { kvmAvailability } from '@tsvm/core/testing';
import { CALLS, runSyscallTracer } from './syscall-tracer.js';

const kvm = kvmAvailability();

describe.skipIf(!kvm.available)(`example: syscall-tracer${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('traces every syscall at the LSTAR entry with number and arguments, and prices the hook', async () => {
    const r = await runSyscallTracer();
    expect(r.stop.reason).toBe('debug-exit');
    expect(r.calls.map((c) => [c.nr, ...c.args.map(Number)])).toEqual(CALLS.map((c) => [...c]));
    expect(r.guestCount).toBe(BigInt(CALLS.length));
    expect(['sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint']).toContain(r.plan[0]?.mechanism);
    const hook = r.report.hooks.find((h) => h.name === 'syscall-entry');
    expect(hook?.events).toBe(CALLS.length);
    expect(hook?.unitNs).toBeGreaterThan(0);
    expect(hook?.totalNs).toBeGreaterThan(0);
    expect(r.prediction.totalNs).toBeGreaterThan(0);
  });
});
