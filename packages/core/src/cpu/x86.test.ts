import { describe, expect, it } from 'vitest';
import { asm } from '../asm.js';
import { Machine } from '../machine.js';
import { MockBackend } from '../testing/mock.js';
import { CONTROL_PAGES, RESET_STUB, SYS, SYSTEM_AREA_SIZE, controlPagesIntact, resetStubPage, systemAreaImage } from './x86.js';

const MiB = 1 << 20;

describe('the host-built system area', () => {
  it('systemAreaImage is what loadFlat writes (long mode), whatever RAM held before', async () => {
    for (const size of [2 * MiB, 6 * MiB + 0x30000]) {
      const vm = await Machine.create({ memory: size, backend: new MockBackend() });
      const sys = size - SYSTEM_AREA_SIZE;
      vm.memory.fill(sys, SYSTEM_AREA_SIZE, 0xa5); // leftovers the tables must not keep
      vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000, mode: 'long', ring: 3 });
      const area = vm.memory.read(sys, SYSTEM_AREA_SIZE);
      const want = systemAreaImage(sys);
      for (const off of CONTROL_PAGES) expect(Buffer.from(area.subarray(off, off + 0x1000)).equals(want.subarray(off, off + 0x1000))).toBe(true);
      expect(controlPagesIntact(area, sys)).toBe(true);
      // Another base is another image (the tables hold absolute addresses).
      expect(controlPagesIntact(area, sys - 0x200000)).toBe(false);
      await vm.close();
    }
  });

  it('controlPagesIntact refuses a wrong length and any changed control byte, not a changed stack byte', () => {
    const sys = 2 * MiB - SYSTEM_AREA_SIZE;
    const area = systemAreaImage(sys);
    expect(controlPagesIntact(area.subarray(0, 0x1000), sys)).toBe(false);
    const stack = area.slice();
    stack[0xfff0] = 1;
    expect(controlPagesIntact(stack, sys)).toBe(true);
    const gate = area.slice();
    gate[SYS.IDT + 14 * 16] = (gate[SYS.IDT + 14 * 16] as number) + 1; // #PF gate's offset
    expect(controlPagesIntact(gate, sys)).toBe(false);
  });

  it('the reset stub is fxrstor64 [image] then jmp [cell], with the cell and the image in place', async () => {
    const fx = new Uint8Array(512).map((_, i) => i & 0xff);
    const page = resetStubPage(0x1234_5678n, fx);
    const code = await asm(`fxrstor64 [rip + ${RESET_STUB.IMAGE - 8}]\n jmp qword ptr [rip + ${RESET_STUB.CELL - 14}]`, { bits: 64, address: 0 });
    expect(code.length).toBe(RESET_STUB.LENGTH);
    expect(page.subarray(0, RESET_STUB.LENGTH)).toEqual(code);
    expect(new DataView(page.buffer).getBigUint64(RESET_STUB.CELL, true)).toBe(0x1234_5678n);
    expect(page.subarray(RESET_STUB.IMAGE, RESET_STUB.IMAGE + 512)).toEqual(fx);
    expect(RESET_STUB.IMAGE % 16).toBe(0); // fxrstor's operand must be 16-byte aligned
    // A reset writes (and later puts back) only the first END bytes: nothing of the stub lies beyond.
    expect(RESET_STUB.IMAGE + 512).toBeLessThanOrEqual(RESET_STUB.END);
    expect(page.subarray(RESET_STUB.END).every((b) => b === 0)).toBe(true);
  });
});
