import { describe, expect, it } from 'vitest';
import { MonitorViolation, type Stop, type StopCommon } from '@tsvm/core';
import { verdictOf, type Watch } from './scan-monitor.js';
import { LOADER_FAILED } from './scan-sandbox.js';

const watch = (over: Partial<Watch> = {}): Watch => ({ findings: [], delivered: 16384, loaded: true, ...over });
const common: StopCommon = { rip: 0x50000n, vcpu: 0, exits: 3, elapsedMs: 1 };
/** A fabricated stop (what `Machine.run` returns). */
const stop = (s: Record<string, unknown>): Stop => ({ ...common, ...s }) as Stop;
const violation = stop({ reason: 'violation', violation: new MonitorViolation('io', 'forbidden-port: out port 0x70', { address: 0x70n, rip: 0x50004n }) });

describe('scan verdicts are a function of what the monitor saw', () => {
  it('a violation is malicious with the first finding’s kind, not the last', () => {
    const w = watch({ findings: [
      { kind: 'self-modifying-code', rip: 0x50000n, address: 0x50010n, detail: 'store' },
      { kind: 'wild-write', rip: 0x50004n, address: 0x40000n, detail: 'store' },
    ] });
    expect(verdictOf(violation, w)).toBe('malicious:self-modifying-code');
  });

  it('a violation the sandbox rules did not record is not called malicious', () => {
    expect(verdictOf(violation, watch())).toBe('crashed:violation');
  });

  it('timeouts, exits, CPU exceptions and other stops', () => {
    expect(verdictOf(stop({ reason: 'timeout' }), watch())).toBe('timeout');
    expect(verdictOf(stop({ reason: 'debug-exit', code: 3 }), watch())).toBe('benign');
    expect(verdictOf(stop({ reason: 'exception', vector: 13, errorCode: 0, faultRip: 0x50000n, cr2: 0n }), watch())).toBe('crashed:#GP');
    expect(verdictOf(stop({ reason: 'exception', vector: 31, errorCode: undefined, faultRip: 0x50000n, cr2: 0n }), watch())).toBe('crashed:vector-31');
    expect(verdictOf(stop({ reason: 'shutdown' }), watch())).toBe('crashed:shutdown');
  });

  it('the loader’s failure code is an error only when no payload arrived (a sample may exit with any code)', () => {
    expect(verdictOf(stop({ reason: 'debug-exit', code: LOADER_FAILED }), watch({ delivered: 0, loaded: false }))).toBe('error:loader');
    expect(verdictOf(stop({ reason: 'debug-exit', code: LOADER_FAILED }), watch())).toBe('benign');
  });
});
