import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { LEGACY_BIOS_HOLE } from './bootinfo.js';
import { findMultibootHeader, loadMultiboot } from './multiboot.js';
import { buildElf, Bytes, expectArgumentError, expectAtomic, expectImageError, makeMemory, pattern } from './fixtures.test-util.js';

const MiB = 1024 * 1024;
const MAGIC = 0x1badb002;

function header(flags: number, aout?: number[]): Uint8Array {
  const b = new Bytes().u32(0, MAGIC).u32(4, flags).u32(8, -(MAGIC + flags) >>> 0);
  (aout ?? []).forEach((v, i) => b.u32(12 + 4 * i, v));
  return b.bytes;
}

/** a.out-kludge kernel: 4 KiB file, header at 0x40, loaded at 1 MiB, bss to 0x103000. */
function aoutKernel(fields: Partial<Record<'header' | 'load' | 'loadEnd' | 'bssEnd' | 'entry', number>> = {}): Uint8Array {
  const img = pattern(0x1000, 7);
  img.set(
    header(0x10003, [
      fields.header ?? 0x100040,
      fields.load ?? 0x100000,
      fields.loadEnd ?? 0x101000,
      fields.bssEnd ?? 0x103000,
      fields.entry ?? 0x100080,
    ]),
    0x40,
  );
  return img;
}

describe('loadMultiboot (a.out kludge)', () => {
  it('loads the kernel, zeroes the bss and builds the info structure above it', () => {
    const m = makeMemory(16 * MiB);
    const kernel = aoutKernel();
    const mod0 = pattern(5000, 9);
    const mod1 = pattern(10, 10);
    const r = loadMultiboot(m.memory, kernel, {
      cmdline: 'console=ttyS0',
      modules: [{ data: mod0, cmdline: 'initrd' }, { data: mod1 }],
      reserved: [LEGACY_BIOS_HOLE],
    });
    expect(r.format).toBe('aout-kludge');
    expect(r.entry).toBe(0x100080n);
    expect(r.kernel).toEqual([{ start: 0x100000n, end: 0x103000n }]);
    expect(m.memory.read(0x100000, 0x1000)).toEqual(kernel);
    expect(m.memory.read(0x101000, 0x2000).every((b) => b === 0)).toBe(true);

    const info = 0x103000;
    expect(r.infoAddress).toBe(BigInt(info));
    expect(r.registers).toEqual({ eax: 0x2badb002n, ebx: BigInt(info) });
    expect(r.entryState).toEqual({ mode: 'protected32', rip: 0x100080n, registers: { rax: 0x2badb002n, rbx: BigInt(info) } });

    const u32 = (off: number): number => m.memory.readUint(info + off, 4);
    expect(u32(0)).toBe(0x24d); // mem, cmdline, mods, mmap, boot loader name
    expect(u32(4)).toBe(639); // mem_lower: [0, 0x9fc00)
    expect(u32(8)).toBe(15 * 1024); // mem_upper: [1 MiB, 16 MiB)
    expect(u32(12)).toBe(0); // boot_device not provided
    expect(m.memory.readCString(u32(16))).toBe('console=ttyS0');
    expect(u32(20)).toBe(2);
    expect(m.memory.readCString(u32(64))).toBe('tsvm');

    // mmap: 24-byte entries whose `size` (20) excludes itself.
    expect(u32(44)).toBe(3 * 24);
    const mmap = u32(48);
    const entries = [0, 1, 2].map((i) => [
      m.memory.readUint(mmap + i * 24, 4),
      m.memory.readU64(mmap + i * 24 + 4),
      m.memory.readU64(mmap + i * 24 + 12),
      m.memory.readUint(mmap + i * 24 + 20, 4),
    ]);
    expect(entries).toEqual([
      [20, 0n, 0x9fc00n, 1],
      [20, 0x9fc00n, 0x100000n - 0x9fc00n, 2],
      [20, 0x100000n, BigInt(15 * MiB), 1],
    ]);

    // Modules: page-aligned, contents copied, strings present.
    const mods = u32(24);
    const mod = (i: number, f: number): number => m.memory.readUint(mods + i * 16 + f, 4);
    expect(mod(0, 0) % 4096).toBe(0);
    expect(mod(0, 4) - mod(0, 0)).toBe(5000);
    expect(m.memory.read(mod(0, 0), 5000)).toEqual(mod0);
    expect(m.memory.readCString(mod(0, 8))).toBe('initrd');
    expect(mod(1, 0) % 4096).toBe(0);
    expect(mod(1, 0)).toBeGreaterThanOrEqual(mod(0, 4));
    expect(m.memory.read(mod(1, 0), 10)).toEqual(mod1);
    expect(m.memory.readCString(mod(1, 8))).toBe('');
    expect(r.modules).toEqual([
      { start: BigInt(mod(0, 0)), end: BigInt(mod(0, 4)) },
      { start: BigInt(mod(1, 0)), end: BigInt(mod(1, 4)) },
    ]);
  });

  it('puts the info block where the caller says and honours avoid ranges', () => {
    const m = makeMemory(16 * MiB);
    const r = loadMultiboot(m.memory, aoutKernel(), { infoAddress: 0x9000, bootLoaderName: 'x' });
    expect(r.infoAddress).toBe(0x9000n);
    expect(m.memory.readCString(m.memory.readUint(0x9000 + 64, 4))).toBe('x');
    const r2 = loadMultiboot(makeMemory(16 * MiB).memory, aoutKernel(), { avoid: [{ start: 0x103000, size: 0x2000 }] });
    expect(r2.infoAddress).toBe(0x105000n);
  });

  it('loads to the end of the file when load_end_addr is 0 and has no bss when bss_end_addr is 0', () => {
    const m = makeMemory(4 * MiB);
    const r = loadMultiboot(m.memory, aoutKernel({ loadEnd: 0, bssEnd: 0 }));
    expect(r.kernel).toEqual([{ start: 0x100000n, end: 0x101000n }]);
    expect(r.infoAddress).toBe(0x101000n);
  });
});

describe('loadMultiboot (ELF)', () => {
  it('loads the ELF segments and enters at e_entry', () => {
    const code = pattern(256, 3);
    code.set(header(0x3), 0);
    const img = buildElf({ class: 32, entry: 0x100020n, segments: [{ paddr: 0x100000n, vaddr: 0xc0100000n, data: code, memsz: 0x3000n }] });
    const m = makeMemory(8 * MiB);
    const r = loadMultiboot(m.memory, img, { cmdline: 'hello' });
    expect(r.format).toBe('elf');
    expect(r.entry).toBe(0x100020n);
    expect(m.memory.read(0x100000, 256)).toEqual(code);
    expect(r.infoAddress).toBe(0x103000n);
    expect(m.memory.readCString(m.memory.readUint(0x103000 + 16, 4))).toBe('hello');
  });

  it('finds a header at any 4-aligned offset below 8 KiB but not beyond', () => {
    const img = new Uint8Array(9000);
    img.set(header(0x3), 8188 - 12 + 4); // header starts at 8180
    expect(findMultibootHeader(img).offset).toBe(8180);
    const far = new Uint8Array(9000);
    far.set(header(0x3), 8192);
    expectImageError(() => findMultibootHeader(far), 'multiboot.magic');
  });
});

describe('loadMultiboot rejects', () => {
  const cases: [string, () => Uint8Array, string][] = [
    ['no header', () => pattern(9000, 1), 'multiboot.magic'],
    [
      'a bad checksum',
      () => {
        const i = aoutKernel();
        i[0x48] = (i[0x48] ?? 0) ^ 1;
        return i;
      },
      'multiboot.checksum',
    ],
    [
      'required flags it does not understand',
      () => {
        const i = new Uint8Array(64);
        i.set(header(0x8));
        return i;
      },
      'multiboot.flags',
    ],
    ['header_addr below load_addr', () => aoutKernel({ header: 0xfffff, load: 0x100000 }), 'multiboot.header_addr'],
    ['load_addr before the file start', () => aoutKernel({ header: 0x100040, load: 0x0fff00 }), 'multiboot.load_addr'],
    ['load_end_addr beyond the file', () => aoutKernel({ loadEnd: 0x101001 }), 'multiboot.load_end_addr'],
    ['load_end_addr below load_addr', () => aoutKernel({ loadEnd: 0x100000 }), 'multiboot.load_end_addr'],
    ['bss_end_addr below load_end_addr', () => aoutKernel({ bssEnd: 0x100fff }), 'multiboot.bss_end_addr'],
    ['entry outside the kernel', () => aoutKernel({ entry: 0x103000 }), 'multiboot.entry_addr'],
    ['a kernel outside RAM', () => aoutKernel({ header: 0x1000040, load: 0x1000000, loadEnd: 0x1001000, bssEnd: 0, entry: 0x1000080 }), 'multiboot.load_addr'],
    ['a truncated a.out header', () => aoutKernel().subarray(0, 0x40 + 14), 'multiboot.header_addr'],
    [
      'an ELF without PT_LOAD above 4 GiB',
      () => {
        const code = pattern(64, 3);
        code.set(header(0x3), 0);
        return buildElf({ class: 64, entry: 0x100000n, segments: [{ paddr: 0x1_0000_0000n, data: code }] });
      },
      'phdr[0].p_paddr',
    ],
  ];
  for (const [what, image, field] of cases) {
    it(what, () => {
      const m = makeMemory(16 * MiB);
      expect(expectAtomic(m, () => expectImageError(() => loadMultiboot(m.memory, image()), field))).toBe(true);
    });
  }

  it('an info address that collides with the kernel, or is misaligned', () => {
    const m = makeMemory(16 * MiB);
    expectArgumentError(() => loadMultiboot(m.memory, aoutKernel(), { infoAddress: 0x100800 }), 'infoAddress');
    expectArgumentError(() => loadMultiboot(m.memory, aoutKernel(), { infoAddress: 0x9001 }), 'infoAddress');
    expectArgumentError(() => loadMultiboot(m.memory, aoutKernel(), { cmdline: 'a\0b' }), 'cmdline');
  });

  it('modules that do not fit, without writing the kernel', () => {
    const m = makeMemory(2 * MiB);
    expect(expectAtomic(m, () => expectImageError(() => loadMultiboot(m.memory, aoutKernel(), { modules: [{ data: new Uint8Array(MiB) }] }), 'modules[0]'))).toBe(true);
    expect(m.memory.readUint(0x100000, 1)).toBe(0xcc);
  });
});

describe('loadMultiboot properties', () => {
  const kernel = aoutKernel();
  const small = (): ReturnType<typeof makeMemory> => makeMemory([{ start: 0x100000, size: 0x10000 }]);

  it('truncation is rejected atomically unless the cut keeps a loadable kernel', () => {
    const m = small();
    for (let cut = 0; cut < kernel.length; cut += 3) {
      const ok = expectAtomic(m, () => loadMultiboot(m.memory, kernel.subarray(0, cut)));
      // load_end_addr demands the whole 4 KiB file: every cut must fail.
      expect(ok).toBe(false);
    }
  });

  it('random corruption of the header either loads or fails atomically with a typed error', () => {
    const m = small();
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0x40, max: 0x40 + 31 }), fc.nat(255)), { minLength: 1, maxLength: 6 }), fc.boolean(), (edits, fix) => {
        const img = kernel.slice();
        for (const [at, v] of edits) img[at] = v;
        if (fix) {
          // Re-seal the checksum so corruption reaches the address fields.
          const dv = new DataView(img.buffer);
          dv.setUint32(0x40, MAGIC, true);
          dv.setUint32(0x48, -(MAGIC + dv.getUint32(0x44, true)) >>> 0, true);
        }
        expectAtomic(m, () => loadMultiboot(m.memory, img, { modules: [{ data: pattern(100) }] }));
      }),
      { numRuns: 1000 },
    );
  });
});
