import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { accessingInstruction, decodeIoInstruction, RIP_ON_INSTRUCTION, type IoCpuView, type IoRipBehaviour } from './io-rip.js';
import type { IoExit } from '../exits.js';

const PVM_LIKE: IoRipBehaviour = { ...RIP_ON_INSTRUCTION, 'out-imm': 'after', 'out-dx': 'after', outs: 'after' };
const out = (port: number, size: 1 | 2 | 4 = 1): IoExit => ({ kind: 'io', direction: 'out', port, size, count: 1, data: new Uint8Array(size) });
const inp = (port: number, size: 1 | 2 | 4 = 1): IoExit => ({ kind: 'io', direction: 'in', port, size, count: 1, data: new Uint8Array(0) });

/** A CPU whose code is `code` at virtual `base` (unreadable elsewhere). */
function cpu(code: number[], base: bigint, regs: { rdx?: bigint; rcx?: bigint; bitness?: 16 | 32 | 64 } = {}): IoCpuView {
  const bytes = Uint8Array.from(code);
  return {
    bitness: regs.bitness ?? 64, rdx: regs.rdx ?? 0n, rcx: regs.rcx ?? 0n,
    readCode: (rip, length) => {
      const off = Number(rip - base);
      return off < 0 || off + length > bytes.length ? undefined : bytes.slice(off, off + length);
    },
  };
}

describe('decodeIoInstruction', () => {
  it.each([
    [[0xe6, 0x80], 64, { class: 'out-imm', port: 0x80, size: 1, length: 2 }],
    [[0xe7, 0x80], 32, { class: 'out-imm', size: 4 }],
    [[0x66, 0xe7, 0x80], 32, { class: 'out-imm', size: 2, length: 3 }],
    [[0xe7, 0x80], 16, { class: 'out-imm', size: 2 }],
    [[0x66, 0xef], 16, { class: 'out-dx', size: 4 }],
    [[0xee], 64, { class: 'out-dx', size: 1, direction: 'out' }],
    [[0xec], 64, { class: 'in-dx', direction: 'in' }],
    [[0xe4, 0x71], 16, { class: 'in-imm', port: 0x71 }],
    [[0xf3, 0x6e], 64, { class: 'rep-outs', addressBits: 64 }],
    [[0xf3, 0x67, 0x6f], 64, { class: 'rep-outs', size: 4, addressBits: 32 }],
    [[0x6c], 16, { class: 'ins', addressBits: 16 }],
    [[0x48, 0xee], 64, { class: 'out-dx', length: 2 }],
  ] as const)('%j in %i-bit code', (bytes, bits, want) => {
    expect(decodeIoInstruction(Uint8Array.from(bytes), bits)).toMatchObject(want);
  });

  it.each([[[0x90]], [[0xe6]], [[0xee, 0x90]], [[0x48, 0xee]], [[0xf0, 0xee]], [[]]])('refuses %j (not exactly one I/O instruction)', (bytes) => {
    // 0x48 is only a REX prefix in 64-bit code; here the test decodes as 32-bit.
    expect(decodeIoInstruction(Uint8Array.from(bytes), 32)).toBeUndefined();
  });

  it('never throws on arbitrary bytes', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 16 }), fc.constantFrom(16, 32, 64), (b, bits) => {
      const d = decodeIoInstruction(b, bits as 16 | 32 | 64);
      if (d) expect(d.length).toBe(b.length);
    }));
  });
});

describe('accessingInstruction', () => {
  it('is RIP itself where the host leaves RIP on every form (VMX/SVM), whatever the bytes', () => {
    expect(accessingInstruction(out(0x80), 0x1002n, cpu([0xe6, 0x80, 0xe6, 0x80], 0x1000n), RIP_ON_INSTRUCTION)).toBe(0x1002n);
  });

  it('finds the `out` that ends at RIP on a host that completes it first', () => {
    // mov dx, 0x3f8 (66 ba f8 03) ; out dx, al (ee)
    expect(accessingInstruction(out(0x3f8), 0x1005n, cpu([0x66, 0xba, 0xf8, 0x03, 0xee, 0x90], 0x1000n, { rdx: 0x3f8n }), PVM_LIKE)).toBe(0x1004n);
    // two identical `out 0x80, al` back to back: the first one's exit has RIP on the second
    expect(accessingInstruction(out(0x80), 0x1002n, cpu([0xe6, 0x80, 0xe6, 0x80], 0x1000n), PVM_LIKE)).toBe(0x1000n);
  });

  it('keeps RIP for an `in` (the host waits for the data with RIP on it)', () => {
    expect(accessingInstruction(inp(0x80), 0x1002n, cpu([0xe6, 0x80, 0xe4, 0x80], 0x1000n), PVM_LIKE)).toBe(0x1002n);
  });

  it('keeps RIP on a `rep outs` with a count left, which such hosts do not complete early', () => {
    // out dx, al ; rep outsb — the rep's exits have RIP on it
    expect(accessingInstruction(out(0x3f8), 0x1001n, cpu([0xee, 0xf3, 0x6e], 0x1000n, { rdx: 0x3f8n, rcx: 3n }), PVM_LIKE)).toBe(0x1001n);
    // with RCX = 0 the rep cannot be the one exiting: it is the `out dx, al` before it
    expect(accessingInstruction(out(0x3f8), 0x1001n, cpu([0xee, 0xf3, 0x6e], 0x1000n, { rdx: 0x3f8n, rcx: 0n }), PVM_LIKE)).toBe(0x1000n);
  });

  it('checks the port and the size: a look-alike instruction before RIP is not taken', () => {
    // out 0x81, al ends at RIP but the exit is for port 0x80
    expect(accessingInstruction(out(0x80), 0x1002n, cpu([0xe6, 0x81, 0x90], 0x1000n), PVM_LIKE)).toBe(0x1002n);
    // `out dx, ax` (66 ef in 32-bit code) is a 2-byte access: the bare `ef` (4 bytes) does not match
    expect(accessingInstruction(out(0x3f8, 2), 0x1002n, cpu([0x66, 0xef, 0x90], 0x1000n, { rdx: 0x3f8n, bitness: 32 }), PVM_LIKE)).toBe(0x1000n);
  });

  it('takes the shortest match: a REX-looking byte before `ee` is usually the previous instruction', () => {
    // mov al, 0x41 (b0 41) ; out dx, al (ee)
    expect(accessingInstruction(out(0x3f8), 0x1003n, cpu([0xb0, 0x41, 0xee], 0x1000n, { rdx: 0x3f8n }), PVM_LIKE)).toBe(0x1002n);
  });

  it('falls back to RIP when the code cannot be read, and near address 0', () => {
    expect(accessingInstruction(out(0x80), 0x5000n, cpu([], 0x1000n), PVM_LIKE)).toBe(0x5000n);
    expect(accessingInstruction(out(0x80), 0x2n, cpu([0xe6, 0x80, 0x90], 0n), PVM_LIKE)).toBe(0n);
    expect(accessingInstruction(out(0x80), 0n, cpu([0x90], 0n), PVM_LIKE)).toBe(0n);
  });
});
