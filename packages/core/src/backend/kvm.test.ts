import { describe, expect, it } from 'vitest';
import { withHypervisorBit } from './kvm.js';

describe('KVM backend CPUID policy', () => {
  it('sets CPUID.1:ECX bit 31 (hypervisor present) and leaves every other leaf alone', () => {
    const leaf = (fn: number, ecx: number) => ({ function: fn, index: 0, flags: 0, eax: 1, ebx: 2, ecx, edx: 3 });
    const input = [leaf(0, 0x1234), leaf(1, 0x0020_0001), leaf(0x40000000, 0x4b4d564b)];
    const out = withHypervisorBit(input);
    expect(out[1]?.ecx).toBe(0x8020_0001);
    expect(out[0]).toEqual(input[0]);
    expect(out[2]).toEqual(input[2]);
    expect(input[1]?.ecx).toBe(0x0020_0001); // the input is not mutated
  });
});
