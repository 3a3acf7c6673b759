import { describe, expect, it } from 'vitest';
import { KvmError, KvmUnavailableError, TsvmError } from './errors.js';

describe('error brands', () => {
  it('instanceof holds for each class of the chain, and only those', () => {
    const e = new KvmError('KVM_RUN', 4);
    expect(e).toBeInstanceOf(KvmError);
    expect(e).toBeInstanceOf(TsvmError);
    expect(e).toBeInstanceOf(Error);
    expect(e instanceof KvmUnavailableError).toBe(false);
    expect(new Error('plain') instanceof TsvmError).toBe(false);
    expect((null as unknown as object) instanceof TsvmError).toBe(false);
  });

  it('an error from another copy of the package (same brand, other prototypes) still matches its classes', () => {
    const foreign = Object.assign(Object.create(Error.prototype) as object, { code: 'TSVM_KVM_IOCTL' });
    Object.defineProperty(foreign, Symbol.for('tsvm.error'), { value: ['KvmError', 'TsvmError'] });
    expect(foreign instanceof KvmError).toBe(true);
    expect(foreign instanceof TsvmError).toBe(true);
    expect(foreign instanceof KvmUnavailableError).toBe(false);
  });
});
