/**
 * A ring-3 guest cannot reach the host-built system area or run its own code at CPL0: the area
 * is supervisor-only in the page tables, the LDT is empty, `syscall` lands in a host stub. And
 * the CPU writes none of the tables it walks (accessed/dirty bits preset), so a run leaves the
 * control pages as the host built them.
 */
import { describe, expect, it } from 'vitest';
import { asm } from '../asm.js';
import { Machine } from '../machine.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import { CONTROL_PAGES, SYS, SYSTEM_AREA_SIZE, controlPagesIntact } from './x86.js';

const kvm = kvmAvailability();
const MiB = 1 << 20;

async function ring3(program: string, memory = 4 * MiB): Promise<{ vm: Machine; sys: number }> {
  const vm = await Machine.create({ memory, name: 'sysarea' });
  vm.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  vm.loadFlat(await asm(program, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  return { vm, sys: vm.layout.systemArea as number };
}

describe.skipIf(!kvm.available)(`the system area against a ring-3 guest${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('a store into the IDT, the page tables, the GDT/LDT or the stubs is a user-mode #PF; the tables stay as built', async () => {
    for (const off of [SYS.IDT, SYS.PML4, SYS.STUBS, SYS.PT, SYS.GDT, SYS.LDT]) {
      const { vm, sys } = await ring3(`mov rbx, ${sys0(4 * MiB) + off}\n mov qword ptr [rbx], rax\n mov dx, 0xf4\n out dx, al`);
      const stop = await vm.run({ timeout: 5000 });
      // #PF, error code: present | write | user.
      expect(stop).toMatchObject({ reason: 'exception', vector: 14, errorCode: 7, cr2: BigInt(sys + off) });
      expect(controlPagesIntact(vm.memory.read(sys, SYSTEM_AREA_SIZE), sys)).toBe(true);
      await vm.close();
    }
  });

  it('the probe trampoline page is readable and executable from ring 3, not writable; the stack below the area is', async () => {
    const t = sys0(4 * MiB) + SYS.PROBE_TRAMPOLINE;
    const { vm } = await ring3(`mov rbx, ${t}\n mov rax, qword ptr [rbx]\n push 0x55\n pop rcx\n mov dx, 0xf4\n out dx, al`);
    expect((await vm.run({ timeout: 5000 })).reason).toBe('debug-exit');
    expect(vm.vcpu(0).getRegs().rcx).toBe(0x55n);
    await vm.close();
    const w = await ring3(`mov rbx, ${t}\n mov byte ptr [rbx], 1\n mov dx, 0xf4\n out dx, al`);
    expect(await w.vm.run({ timeout: 5000 })).toMatchObject({ reason: 'exception', vector: 14, errorCode: 7, cr2: BigInt(t) });
    await w.vm.close();
  });

  it('an LDT selector faults (#GP with the selector) instead of reading a descriptor from guest RAM', async () => {
    const { vm } = await ring3('mov ax, 0x7\n mov ds, ax\n mov dx, 0xf4\n out dx, al');
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'exception', vector: 13, errorCode: 4, faultRip: 0x1004n });
    await vm.close();
  });

  it('`syscall` with no handler set is #UD at the instruction; with the host\'s handler it runs that', async () => {
    const { vm } = await ring3('nop\n syscall\n mov dx, 0xf4\n out dx, al');
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'exception', vector: 6, faultRip: 0x1001n, errorCode: undefined });
    await vm.close();
    // The host points IA32_LSTAR at its own handler (as the syscall-tracer example does).
    const h = await ring3('syscall\n mov dx, 0xf4\n out dx, al');
    h.vm.memory.write(0x3000, await asm('mov r15, 0x77\n jmp rcx', { bits: 64, address: 0x3000 }));
    h.vm.vcpu(0).setMsrs([{ index: 0xc000_0081, data: 0x0018_0008n << 32n }, { index: 0xc000_0082, data: 0x3000n }]);
    expect((await h.vm.run({ timeout: 5000 })).reason).toBe('debug-exit');
    expect(h.vm.vcpu(0).getRegs().r15).toBe(0x77n);
    await h.vm.close();
  });

  it('a run that touches new memory, faults and uses the stack leaves every control page as built', async () => {
    const { vm, sys } = await ring3(`
      mov rbx, 0x200000
      l: mov qword ptr [rbx], rbx
      add rbx, 0x200000
      cmp rbx, 0x400000
      jb l
      push rax
      pop rax
      ud2`, 4 * MiB);
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'exception', vector: 6 });
    const area = vm.memory.read(sys, SYSTEM_AREA_SIZE);
    expect(controlPagesIntact(area, sys)).toBe(true);
    // The check can fail: one byte changed in any control page is seen.
    for (const off of CONTROL_PAGES) {
      const copy = area.slice();
      copy[off + 0x123] = (copy[off + 0x123] as number) ^ 1;
      expect(controlPagesIntact(copy, sys)).toBe(false);
    }
    await vm.close();
  });
});

/** Where the system area of a machine with one region of `size` bytes at 0 lies. */
function sys0(size: number): number { return size - SYSTEM_AREA_SIZE; }
