import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend } from './testing/mock.js';
import { emulationFailure, type InternalErrorExit } from './exits.js';

const MiB = 1024 * 1024;

/** `emulation_failure` as KVM lays it over `internal.data`: flags, insn_size, insn_bytes[15]. */
function emulationData(bytes: number[], flags = 1n): bigint[] {
  const raw = new Uint8Array(16);
  raw[0] = bytes.length;
  raw.set(bytes, 1);
  const v = new DataView(raw.buffer);
  return [flags, v.getBigUint64(0, true), v.getBigUint64(8, true)];
}

describe('internal-error keeps what KVM reported', () => {
  it('decodes insn_size/insn_bytes only when the flag says they are valid', () => {
    const exit = (data: bigint[], suberror = 1): InternalErrorExit => ({ kind: 'internal-error', suberror, data });
    expect(emulationFailure(exit(emulationData([0x0f, 0x0b])))).toEqual(new Uint8Array([0x0f, 0x0b]));
    expect(emulationFailure(exit(emulationData([0xcc], 0n)))).toBeUndefined();
    expect(emulationFailure(exit(emulationData([0xcc]), 3))).toBeUndefined();
    expect(emulationFailure(exit([1n]))).toBeUndefined();
    const full = Array.from({ length: 15 }, (_, i) => i + 1);
    expect(emulationFailure(exit(emulationData(full)))).toEqual(Uint8Array.from(full));
  });

  it('the stop carries suberror, the data words, KVM\'s instruction bytes and the code core read at RIP', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script({ kind: 'internal-error', suberror: 1, data: [...emulationData([0xcc]), 0xdeadn] });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.memory.write(0x1000, new Uint8Array([0xcc, 0x90, 0xf4]));
    vcpu.regs.rip = 0x1000n; // real mode, CS base 0: linear = physical
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'internal-error', suberror: 1, instruction: new Uint8Array([0xcc]), bitness: 16 });
    if (stop.reason !== 'internal-error') throw new Error('unreachable');
    expect(stop.data).toHaveLength(4);
    expect(stop.data[3]).toBe(0xdeadn);
    expect(Array.from(stop.code.subarray(0, 3))).toEqual([0xcc, 0x90, 0xf4]);
    expect(stop.message).toMatch(/instruction emulation failed: \[cc\]/);
    await vm.close();
  });

  it('code at an RIP outside RAM is empty, not an exception', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script({ kind: 'internal-error', suberror: 2, data: [] });
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vcpu.regs.rip = 0xfff_fff0n;
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'internal-error', suberror: 2, instruction: undefined, code: new Uint8Array(0) });
    await vm.close();
  });
});
