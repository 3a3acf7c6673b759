import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { LEGACY_BIOS_HOLE } from './bootinfo.js';
import { loadLinux, parseBzImage } from './linux.js';
import { Bytes, expectArgumentError, expectAtomic, expectImageError, makeMemory, pattern } from './fixtures.test-util.js';

const MiB = 1024 * 1024;

interface BzSpec {
  version?: number;
  setupSects?: number;
  loadflags?: number;
  xloadflags?: number;
  kernelSize?: number;
  initSize?: number;
  prefAddress?: bigint;
  cmdlineSize?: number;
  initrdAddrMax?: number;
  kernelAlignment?: number;
  relocatable?: boolean;
}

/** A fake bzImage: setup sectors with a real-looking setup header, then a patterned "kernel". */
function bzImage(s: BzSpec = {}): Uint8Array {
  const sects = s.setupSects ?? 4;
  const setupSize = ((sects === 0 ? 4 : sects) + 1) * 512;
  const kernelSize = s.kernelSize ?? 0x3000;
  const b = new Bytes(setupSize);
  b.u8(0x1f1, sects).u32(0x1f4, Math.ceil(kernelSize / 16)).u16(0x1fe, 0xaa55);
  b.u8(0x200, 0xeb).u8(0x201, 0x6a); // jmp to 0x26c: the header ends there
  b.u32(0x202, 0x53726448).u16(0x206, s.version ?? 0x020f).u8(0x211, s.loadflags ?? 0x01);
  b.u32(0x22c, s.initrdAddrMax ?? 0x7fffffff).u32(0x230, s.kernelAlignment ?? 0x200000).u8(0x234, s.relocatable === false ? 0 : 1);
  b.u16(0x236, s.xloadflags ?? 0x1).u32(0x238, s.cmdlineSize ?? 255);
  b.u64(0x258, s.prefAddress ?? 0x1000000n).u32(0x260, s.initSize ?? 0x400000);
  b.u8(0x270, 0x55); // setup code after the header: must not reach boot_params
  b.set(setupSize, pattern(kernelSize, 5));
  return b.bytes;
}

describe('parseBzImage', () => {
  it('reads the setup header', () => {
    const bz = parseBzImage(bzImage());
    expect(bz.setupSize).toBe(2560);
    expect(bz.kernel.length).toBe(0x3000);
    expect(bz.supports64).toBe(true);
    expect(bz.header).toMatchObject({ version: 0x020f, cmdlineSize: 255, prefAddress: 0x1000000n, initSize: 0x400000, headerEnd: 0x26c, relocatable: true });
  });

  it('reads setup_sects 0 as 4', () => {
    expect(parseBzImage(bzImage({ setupSects: 0 })).setupSize).toBe(2560);
  });

  it('has no 64-bit entry before 2.12 or without XLF_KERNEL_64', () => {
    expect(parseBzImage(bzImage({ version: 0x020b })).supports64).toBe(false);
    expect(parseBzImage(bzImage({ xloadflags: 0 })).supports64).toBe(false);
  });
});

describe('loadLinux', () => {
  it('loads the kernel at 1 MiB and builds boot_params, cmdline, initrd and E820', () => {
    const m = makeMemory(64 * MiB);
    const image = bzImage();
    const initrd = pattern(10000, 11);
    const r = loadLinux(m.memory, image, { cmdline: 'console=ttyS0 quiet', initrd, reserved: [LEGACY_BIOS_HOLE] });
    expect(r.mode).toBe(64);
    expect(r.kernel).toEqual({ start: 0x100000n, end: 0x103000n });
    expect(r.kernelFootprint).toEqual([
      { start: 0x100000n, end: 0x103000n },
      { start: 0x1000000n, end: 0x1400000n },
    ]);
    expect(m.memory.read(0x100000, 0x3000)).toEqual(pattern(0x3000, 5));
    expect(r.bootParamsAddress).toBe(0x7000n);
    expect(r.cmdlineAddress).toBe(0x20000n);
    expect(m.memory.readCString(0x20000)).toBe('console=ttyS0 quiet');
    // The initrd sits as high as possible, page-aligned.
    const initrdStart = BigInt(64 * MiB - 12288);
    expect(r.initrd).toEqual({ start: initrdStart, end: initrdStart + 10000n });
    expect(m.memory.read(initrdStart, 10000)).toEqual(initrd);

    expect(r.entryState).toEqual({
      mode: 'long64',
      rip: 0x100200n,
      registers: { rsi: 0x7000n },
      identityMap: [
        { start: 0x100000n, end: 0x103000n },
        { start: 0x1000000n, end: 0x1400000n },
        { start: 0x7000n, end: 0x8000n },
        { start: 0x20000n, end: 0x20014n },
      ],
    });

    const bp = 0x7000;
    const u8 = (o: number): number => m.memory.readUint(bp + o, 1);
    const u16 = (o: number): number => m.memory.readUint(bp + o, 2);
    const u32 = (o: number): number => m.memory.readUint(bp + o, 4);
    // The setup header is copied verbatim from 0x1f1 to its end at 0x26c ...
    expect(m.memory.read(bp + 0x1f1, 0x210 - 0x1f1)).toEqual(image.subarray(0x1f1, 0x210));
    expect(m.memory.read(bp + 0x230, 0x26c - 0x230)).toEqual(image.subarray(0x230, 0x26c));
    expect(u16(0x1fe)).toBe(0xaa55);
    expect(u32(0x202)).toBe(0x53726448);
    expect(u8(0x270)).toBe(0); // ... and not beyond.
    expect(u8(0x1ef)).toBe(0); // sentinel clear, or the kernel scrubs the header
    // ... with the loader's fields filled in.
    expect(u8(0x210)).toBe(0xff);
    expect(u32(0x214)).toBe(0x100000);
    expect(u32(0x218)).toBe(Number(initrdStart));
    expect(u32(0x21c)).toBe(10000);
    expect(u32(0x228)).toBe(0x20000);
    expect(u32(0xc0) + u32(0xc4) + u32(0xc8)).toBe(0);
    // E820: 20-byte packed entries at 0x2d0.
    expect(u8(0x1e8)).toBe(3);
    const e820 = [0, 1, 2].map((i) => [m.memory.readU64(bp + 0x2d0 + i * 20), m.memory.readU64(bp + 0x2d8 + i * 20), u32(0x2e0 + i * 20)]);
    expect(e820).toEqual([
      [0n, 0x9fc00n, 1],
      [0x9fc00n, 0x100000n - 0x9fc00n, 2],
      [0x100000n, BigInt(63 * MiB), 1],
    ]);
    expect(r.e820).toHaveLength(3);
  });

  it('uses the 32-bit entry on request or when the image has no 64-bit one', () => {
    const a = loadLinux(makeMemory(40 * MiB).memory, bzImage(), { entry: '32' });
    expect(a.entryState).toEqual({ mode: 'protected32', rip: 0x100000n, registers: { rsi: 0x7000n } });
    const b = loadLinux(makeMemory(40 * MiB).memory, bzImage({ version: 0x020b }));
    expect(b.mode).toBe(32);
  });

  it('loads at pref_address on request, keeping the initrd below initrd_addr_max', () => {
    const m = makeMemory(64 * MiB);
    const r = loadLinux(m.memory, bzImage({ initrdAddrMax: 0x27fffff }), { loadAddress: 'preferred', initrd: pattern(100) });
    expect(r.kernel.start).toBe(0x1000000n);
    expect(r.kernelFootprint).toEqual([{ start: 0x1000000n, end: 0x1400000n }]);
    expect(r.entryState.rip).toBe(0x1000200n);
    expect(r.initrd?.end).toBeLessThanOrEqual(0x2800000n);
    expect(r.initrd?.start).toBe(0x27ff000n);
  });

  it('honours caller-chosen addresses and avoid ranges', () => {
    const m = makeMemory(40 * MiB);
    const r = loadLinux(m.memory, bzImage(), { bootParamsAddress: 0x10000, cmdlineAddress: 0x11000, initrd: pattern(10), initrdAddress: 0x2000000, rsdpAddress: 0xe0000 });
    expect([r.bootParamsAddress, r.cmdlineAddress, r.initrd?.start]).toEqual([0x10000n, 0x11000n, 0x2000000n]);
    expect(m.memory.readU64(0x10000 + 0x70)).toBe(0xe0000n);
    const r2 = loadLinux(makeMemory(40 * MiB).memory, bzImage(), { avoid: [{ start: 0x7000, size: 0x1000 }, { start: 0x20000, size: 0x10 }] });
    expect(r2.bootParamsAddress).not.toBe(0x7000n);
    expect(r2.cmdlineAddress).not.toBe(0x20000n);
  });
});

describe('loadLinux rejects', () => {
  const patch = (img: Uint8Array, off: number, bytes: number[]): Uint8Array => {
    const c = img.slice();
    c.set(bytes, off);
    return c;
  };
  const cases: [string, () => Uint8Array, string][] = [
    ['a missing boot_flag', () => patch(bzImage(), 0x1fe, [0, 0]), 'boot_flag'],
    ['a missing HdrS magic', () => patch(bzImage(), 0x202, [0x48, 0x64, 0x72, 0x54]), 'header'],
    ['a protocol older than 2.06', () => bzImage({ version: 0x0205 }), 'version'],
    ['a zImage', () => bzImage({ loadflags: 0 }), 'loadflags'],
    ['setup sectors beyond the file', () => bzImage({ setupSects: 4 }).subarray(0, 2000), 'setup_sects'],
    ['a kernel shorter than syssize', () => bzImage().subarray(0, 2560 + 0x2000), 'syssize'],
    ['a non-power-of-two kernel_alignment', () => bzImage({ kernelAlignment: 0x300000 }), 'kernel_alignment'],
    ['a file too short for the header', () => bzImage().subarray(0, 0x1ff), 'boot_flag'],
    ['an init_size that does not fit in RAM', () => bzImage({ initSize: 0x8000000 }), 'init_size'],
  ];
  for (const [what, image, field] of cases) {
    it(what, () => {
      const m = makeMemory(24 * MiB);
      expect(expectAtomic(m, () => expectImageError(() => loadLinux(m.memory, image()), field))).toBe(true);
    });
  }

  it('a 64-bit entry the image lacks', () => {
    const m = makeMemory(24 * MiB);
    expectImageError(() => loadLinux(m.memory, bzImage({ version: 0x020b }), { entry: '64' }), 'version');
    expectImageError(() => loadLinux(m.memory, bzImage({ xloadflags: 0 }), { entry: '64' }), 'xloadflags');
  });

  it('a kernel that does not fit in RAM', () => {
    const m = makeMemory(MiB + 0x2000);
    expectImageError(() => loadLinux(m.memory, bzImage({ initSize: 0 })), 'kernel');
  });

  it('bad arguments, without writing anything', () => {
    const m = makeMemory(24 * MiB);
    const img = bzImage({ cmdlineSize: 10 });
    const cases: [object, string][] = [
      [{ cmdline: 'x'.repeat(11) }, 'cmdline'],
      [{ initrd: new Uint8Array(70 * MiB) }, 'initrd'],
      [{ initrd: pattern(10), initrdAddress: 0x7fffffff }, 'initrdAddress'],
      [{ bootParamsAddress: 0x100800 }, 'bootParamsAddress'],
      [{ cmdlineAddress: 0x7000 + 0x10, bootParamsAddress: 0x7000 }, 'cmdlineAddress'],
      [{ loadAddress: 0x100001 }, 'loadAddress'],
      [{ entry: '16' }, 'entry'],
      [{ reserved: Array.from({ length: 130 }, (_, i) => ({ start: 0x2000000 + i * 0x2000, size: 0x1000 })) }, 'reserved'],
    ];
    for (const [options, argument] of cases) {
      expect(expectAtomic(m, () => expectArgumentError(() => loadLinux(m.memory, img, options), argument))).toBe(true);
    }
    expect(() => loadLinux(m.memory, img, { cmdline: 'x'.repeat(10) })).not.toThrow();
  });

  it('an rsdpAddress before protocol 2.14', () => {
    expectArgumentError(() => loadLinux(makeMemory(24 * MiB).memory, bzImage({ version: 0x020d }), { rsdpAddress: 0xe0000 }), 'rsdpAddress');
  });
});

describe('loadLinux properties', () => {
  const image = bzImage({ initSize: 0x10000, prefAddress: 0x100000n, kernelSize: 0x400 });
  const small = (): ReturnType<typeof makeMemory> =>
    makeMemory([
      { start: 0, size: 0x30000 },
      { start: 0x100000, size: 0x20000 },
    ]);

  it('every truncation is rejected atomically with a typed error', () => {
    const m = small();
    for (let cut = 0; cut < image.length; cut += 3) {
      expect(expectAtomic(m, () => loadLinux(m.memory, image.subarray(0, cut), { cmdline: 'a' }))).toBe(false);
    }
  });

  it('random corruption of the setup header either loads or fails atomically with a typed error', () => {
    const m = small();
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0x1f1, max: 0x268 }), fc.nat(255)), { minLength: 1, maxLength: 6 }), (edits) => {
        const img = image.slice();
        for (const [at, v] of edits) img[at] = v;
        expectAtomic(m, () => loadLinux(m.memory, img, { cmdline: 'console=ttyS0', initrd: pattern(5000) }));
      }),
      { numRuns: 1000 },
    );
  });
});
