// The dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL) on this host: a guest's stores show up as ring
// entries naming slot and page, KVM_RESET_DIRTY_RINGS write-protects them again (the next round
// logs them anew), and without a reset a page already logged is not logged twice.
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { KvmSystem } from './system.js';
import { MemfdMapping } from './memfd.js';
import { KVM_CAP, KVM_CONST } from './raw/ioctls.js';

const usable = existsSync('/dev/kvm') && (() => { try { KvmSystem.open().close(); return true; } catch { return false; } })();
const sys = usable ? KvmSystem.open() : undefined;
const ringMax = sys ? sys.checkExtension(KVM_CAP.DIRTY_LOG_RING_ACQ_REL) : 0;
sys?.close();

describe.skipIf(!usable || ringMax === 0)(`dirty ring on real KVM${!usable ? ' (SKIPPED: /dev/kvm is not usable here)' : ringMax === 0 ? ' (SKIPPED: this host has no KVM_CAP_DIRTY_LOG_RING_ACQ_REL)' : ''}`, () => {
  it('logs each page a guest stores to once per reset, by slot and page offset', () => {
    const sys = KvmSystem.open();
    const vm = sys.createVm();
    const SIZE = 1 << 20;
    const mem = MemfdMapping.create(SIZE);
    // Real mode at 0:0, DS = 0x1000 (linear 0x10000): store to 4 pages, out 0x80, loop.
    mem.bytes.set([
      0xb8, 0x00, 0x10, 0x8e, 0xd8, // mov ax, 0x1000 ; mov ds, ax
      0xfe, 0x06, 0x00, 0x00, // top: inc byte [0x0000]
      0xfe, 0x06, 0x00, 0x10, // inc byte [0x1000]
      0xfe, 0x06, 0x00, 0x20, // inc byte [0x2000]
      0xfe, 0x06, 0x00, 0x30, // inc byte [0x3000]
      0xe6, 0x80, // out 0x80, al
      0xeb, 0xee, // jmp top
    ], 0);
    try {
      const bytes = Math.min(ringMax, 4096); // 256 entries
      vm.enableDirtyRing(bytes);
      vm.setUserMemoryRegion(0, 0n, SIZE, mem.hostAddress, { readonly: false, logDirty: true });
      const v = vm.createVcpu(0);
      v.mapDirtyRing(bytes);
      try {
        const s = v.getSregs();
        for (const seg of [s.cs, s.ds, s.es, s.ss]) { seg.base = 0n; seg.selector = 0; }
        v.setSregs(s);
        v.setRegs({ ...v.getRegs(), rip: 0n, rflags: 2n });
        const harvest = (): string[] => { const got: string[] = []; v.harvestDirtyRing((slot, off) => got.push(`${slot}:${off.toString(16)}`)); return got.sort(); };
        const want = ['0:10', '0:11', '0:12', '0:13'];
        expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
        expect(harvest()).toEqual(want);
        expect(vm.resetDirtyRings()).toBe(4);
        // Re-protected by the reset: the next round logs the same pages again.
        expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
        const t0 = process.hrtime.bigint();
        const again = harvest();
        vm.resetDirtyRings();
        const ns = Number(process.hrtime.bigint() - t0);
        expect(again).toEqual(want);
        process.stderr.write(`[tsvm] dirty ring: harvest 4 entries + KVM_RESET_DIRTY_RINGS ${(ns / 1000).toFixed(1)} µs\n`);
        // Harvested but not reset: the pages stay writable, so a further round adds nothing
        // (at CPL3; at CPL0 on PVM every store is emulated, and each emulated store is logged).
        expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
        expect(harvest()).toEqual(want);
        expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
        const fourth = harvest();
        process.stderr.write(`[tsvm] dirty ring: a round without a reset before it logged ${fourth.length} entries\n`);
        expect(vm.resetDirtyRings()).toBe(4 + fourth.length);
        expect(v.run()).toMatchObject({ kind: 'io', port: 0x80 });
        expect(harvest()).toEqual(want);
        // With the ring on, the bitmap interface is refused.
        const bitmap = MemfdMapping.create(4096);
        try { expect(() => vm.getDirtyLog(0, bitmap.hostAddress)).toThrow(/KVM_GET_DIRTY_LOG/); } finally { bitmap.close(); }
      } finally {
        v.close();
      }
    } finally {
      vm.close();
      mem.close();
      sys.close();
    }
  });
});
