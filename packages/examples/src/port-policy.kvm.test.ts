import { describe, expect, it } from 'vitest';
import { kvmAvailability } from '@tsvm/core/testing';
import { runPortPolicy } from './port-policy.js';

const kvm = kvmAvailability();

describe.skipIf(!kvm.available)(`example: port-policy${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('stops the guest at the forbidden port, before the device, and the audit log says why', async () => {
    const r = await runPortPolicy();
    expect(r.printed).toBe('hi\n');
    expect(r.stop.reason).toBe('violation');
    if (r.stop.reason === 'violation') expect(r.stop.violation.message).toMatch(/CMOS clock is off limits.*out .*70/);
    expect(r.cmosAccesses).toBe(0);
    const last = JSON.parse(r.audit[r.audit.length - 1] ?? '{}') as Record<string, unknown>;
    expect(last).toMatchObject({ event: 'pio', address: '0x70', hook: 'policy:cmos', decision: 'deny', effect: 'stop' });
    // Each UART write passed the uart rule (and the policy's default catch-all): all allowed.
    const allows = r.audit.filter((l) => l.includes('"decision":"allow"')).map((l) => JSON.parse(l) as { address: string });
    expect(allows.length).toBeGreaterThanOrEqual(3);
    expect(allows.every((a) => a.address === '0x3f8')).toBe(true);
    expect(r.audit.filter((l) => l.includes('"decision":"deny"'))).toHaveLength(1);
    expect(r.verification).toMatchObject({ ok: true, count: r.audit.length });
    expect(r.afterEdit.ok).toBe(false);
    expect(r.afterRemoval.ok).toBe(false);
  });
});
