import { describe, expect, it } from 'vitest';
import { kvmAvailability } from '@tsvm/core/testing';
import { BUFFER, runSmcDetector } from './smc-detector.js';

const kvm = kvmAvailability();

describe.skipIf(!kvm.available)(`example: smc-detector${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('reports the first execution of bytes the guest wrote, decoded from the new bytes', async () => {
    const r = await runSmcDetector();
    expect(r.stop.reason).toBe('debug-exit');
    expect(r.printed).toBe('unpacked!\n');
    expect(r.writes.length).toBeGreaterThan(10);
    expect(r.detection?.address).toBe(BigInt(BUFFER));
    expect(r.detection?.instruction).toMatch(/^0x100000: lea rsi,\[/);
    expect(r.detection?.writesBefore).toBe(r.writes.length);
    expect(r.detection?.writtenBy.address).toBe(BigInt(BUFFER));
  });
});
