import { describe, expect, it } from 'vitest';
import { GuestMemoryError, HookFailure, KvmError, MonitorViolation, TsvmError } from '../errors.js';
import type { Stop } from '../stop.js';
import { decodeError, decodeStop, encodeError, encodeStop } from './wire.js';

/** A TsvmError subclass core does not know (as another package's would be). */
class FlowDenied extends TsvmError {
  readonly label: string;
  constructor(label: string) { super('TSVM_FLOW_DENIED', `flow to ${label} denied`); this.label = label; }
}

/** What postMessage does to a value. */
const post = <T>(v: T): T => structuredClone(v);

describe('errors and stops across the thread boundary', () => {
  it('a known class comes back as itself, with its code, fields, message and the worker\'s stack', () => {
    const e = new KvmError('KVM_RUN', 14, 'bad address');
    const d = decodeError(post(encodeError(e)));
    expect(d).toBeInstanceOf(KvmError);
    expect(d).toBeInstanceOf(TsvmError);
    expect(d).not.toBeInstanceOf(GuestMemoryError);
    expect(d).toMatchObject({ name: 'KvmError', code: 'TSVM_KVM_IOCTL', ioctl: 'KVM_RUN', errno: 14, message: e.message });
    expect(d.stack).toBe(e.stack);
  });

  it('a subclass core does not know keeps instanceof for its own class (brand chain) and gets TsvmError\'s prototype', () => {
    const d = decodeError(post(encodeError(new FlowDenied('internet'))));
    expect(d).toBeInstanceOf(FlowDenied);
    expect(d).toBeInstanceOf(TsvmError);
    expect(Object.getPrototypeOf(d)).toBe(TsvmError.prototype);
    expect(d).toMatchObject({ name: 'FlowDenied', code: 'TSVM_FLOW_DENIED', label: 'internet' });
  });

  it('cause chains are carried (bounded in depth); plain errors keep their built-in class; non-errors become messages', () => {
    const inner = new TypeError('inner');
    const d = decodeError(post(encodeError(new HookFailure('policy', inner))));
    expect(d).toBeInstanceOf(HookFailure);
    expect(d.cause).toBeInstanceOf(TypeError);
    expect((d.cause as Error).message).toBe('inner');
    let deep: Error = new Error('0');
    for (let i = 1; i < 50; i++) deep = new Error(String(i), { cause: deep });
    let n = 0;
    for (let c: unknown = decodeError(post(encodeError(deep))); c instanceof Error; c = c.cause) n++;
    expect(n).toBeLessThanOrEqual(10);
    expect(decodeError(post(encodeError('just a string'))).message).toBe('just a string');
    // A field structured clone cannot carry is left out rather than failing the post.
    const withFn = Object.assign(new TsvmError('TSVM_X', 'x'), { fn: () => 1, n: 5n });
    expect(decodeError(post(encodeError(withFn)))).toMatchObject({ n: 5n, code: 'TSVM_X' });
  });

  it('stops: violation and error fields come back typed; the rest (bigints, bytes, exits) as they were', () => {
    const common = { rip: 0x1000n, vcpu: 0, exits: 3, elapsedMs: 1.5 };
    const v: Stop = { ...common, reason: 'violation', violation: new MonitorViolation('io', 'port 0x80 denied', { address: 0x80n, rip: 0x1000n }) };
    const dv = decodeStop(post(encodeStop(v)));
    expect(dv.reason).toBe('violation');
    if (dv.reason === 'violation') {
      expect(dv.violation).toBeInstanceOf(MonitorViolation);
      expect(dv.violation).toMatchObject({ event: 'io', address: 0x80n, rip: 0x1000n });
    }
    const de = decodeStop(post(encodeStop({ ...common, reason: 'device-error', device: 'uart', error: new GuestMemoryError(0x10n, 4, 'x') })));
    expect(de.reason === 'device-error' && de.error instanceof GuestMemoryError).toBe(true);
    const odd = decodeStop(post(encodeStop({ ...common, reason: 'hook-error', hook: 'h', error: Symbol('not cloneable') })));
    expect(odd.reason === 'hook-error' && odd.error).toBe('Symbol(not cloneable)');
    const ie: Stop = { ...common, reason: 'internal-error', suberror: 1, message: 'emulation', data: [1n, 2n], instruction: new Uint8Array([0xcc]), code: new Uint8Array([0xcc, 0x90]), bitness: 64 };
    expect(decodeStop(post(encodeStop(ie)))).toEqual(ie);
  });
});
