// KVM_CAP_SYNC_REGS on this host: the registers KVM stores into kvm_run at an exit are the ones
// KVM_GET_REGS returns, and registers written there are loaded at the next KVM_RUN.
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { KvmSystem } from './system.js';
import { MemfdMapping } from './memfd.js';
import { KVM_CAP, KVM_CONST } from './raw/ioctls.js';

const usable = existsSync('/dev/kvm') && (() => { try { KvmSystem.open().close(); return true; } catch { return false; } })();

describe.skipIf(!usable)(`sync regs on real KVM${usable ? '' : ' (SKIPPED: /dev/kvm is not usable here)'}`, () => {
  it('synced registers match KVM_GET_REGS at an exit, and written ones take effect at the next entry', () => {
    const sys = KvmSystem.open();
    const supported = (sys.checkExtension(KVM_CAP.SYNC_REGS) & KVM_CONST.SYNC_X86_REGS) !== 0;
    process.stderr.write(`[tsvm] KVM_CAP_SYNC_REGS: ${sys.checkExtension(KVM_CAP.SYNC_REGS)}\n`);
    if (!supported) { sys.close(); expect(supported).toBe(false); return; }
    const vm = sys.createVm();
    const mem = MemfdMapping.create(4096);
    // Real mode at 0:0: mov ax, 0x1234 ; out 0x80, al ; mov bx, ax ; out 0x81, al ; hlt
    mem.bytes.set([0xb8, 0x34, 0x12, 0xe6, 0x80, 0x89, 0xc3, 0xe6, 0x81, 0xf4], 0);
    vm.setUserMemoryRegion(0, 0n, 4096, mem.hostAddress);
    const v = vm.createVcpu(0);
    try {
      const s = v.getSregs();
      for (const seg of [s.cs, s.ds, s.es, s.ss]) { seg.base = 0n; seg.selector = 0; }
      v.setSregs(s);
      v.setRegs({ ...v.getRegs(), rip: 0n, rflags: 2n });
      v.setSyncRegs(true);
      expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
      const synced = v.syncedRegs();
      expect(synced).toEqual(v.getRegs());
      expect(synced.rax & 0xffffn).toBe(0x1234n);
      // Change RAX through kvm_run only: the guest copies it to BX before the next exit.
      v.setSyncedRegs({ ...synced, rax: 0x5678n });
      expect(v.run()).toMatchObject({ kind: 'io', port: 0x81 });
      expect(v.syncedRegs().rbx & 0xffffn).toBe(0x5678n);
      expect(v.getRegs().rbx & 0xffffn).toBe(0x5678n);
    } finally {
      v.close();
      vm.close();
      mem.close();
      sys.close();
    }
  });

  it('synced special registers match KVM_GET_SREGS at every exit, including after the guest changes a segment', () => {
    const sys = KvmSystem.open();
    const bits = sys.checkExtension(KVM_CAP.SYNC_REGS);
    if ((bits & KVM_CONST.SYNC_X86_SREGS) === 0) { sys.close(); expect(bits & KVM_CONST.SYNC_X86_SREGS).toBe(0); return; }
    const vm = sys.createVm();
    const mem = MemfdMapping.create(4096);
    // Real mode at 0:0: out 0x80, al ; mov ax, 0x40 ; mov ds, ax ; out 0x81, al ; hlt
    mem.bytes.set([0xe6, 0x80, 0xb8, 0x40, 0x00, 0x8e, 0xd8, 0xe6, 0x81, 0xf4], 0);
    vm.setUserMemoryRegion(0, 0n, 4096, mem.hostAddress);
    const v = vm.createVcpu(0);
    try {
      const s = v.getSregs();
      for (const seg of [s.cs, s.ds, s.es, s.ss]) { seg.base = 0n; seg.selector = 0; }
      v.setSregs(s);
      v.setRegs({ ...v.getRegs(), rip: 0n, rflags: 2n });
      v.setSyncRegs(true, true);
      expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
      expect(v.syncedSregs()).toEqual(v.getSregs());
      expect(v.run()).toMatchObject({ kind: 'io', port: 0x81 });
      const after = v.syncedSregs();
      expect(after).toEqual(v.getSregs());
      expect(after.ds.selector).toBe(0x40);
      expect(after.ds.base).toBe(0x400n);
    } finally {
      v.close();
      vm.close();
      mem.close();
      sys.close();
    }
  });
});
