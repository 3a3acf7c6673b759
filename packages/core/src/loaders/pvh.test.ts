import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { findPvhEntry, loadPvh } from './pvh.js';
import { buildElf, Bytes, expectArgumentError, expectAtomic, expectImageError, makeMemory, pattern } from './fixtures.test-util.js';

const MiB = 1024 * 1024;
/** Low memory plus 4 MiB where the kernel lives: small enough to snapshot cheaply. */
const pvhMemory = (): ReturnType<typeof makeMemory> => makeMemory([{ start: 0, size: MiB }, { start: 16 * MiB, size: 4 * MiB }]);

/** A vmlinux-like ELF64: linked at 0xffffffff81000000, physically at 16 MiB, with a PVH note. */
function vmlinux(desc: Uint8Array | null = new Bytes().u64(0, 0x1000100n).bytes): Uint8Array {
  return buildElf({
    class: 64,
    entry: 0x1000000n,
    segments: [
      { paddr: 0x1000000n, vaddr: 0xffffffff81000000n, data: pattern(0x800, 4), memsz: 0x2000n },
      { paddr: 0x1004000n, vaddr: 0xffffffff81004000n, data: pattern(0x100, 6) },
    ],
    notes: [
      { name: 'GNU', type: 3, desc: pattern(20) },
      { name: 'Linux', type: 18, desc: new Uint8Array(4) }, // same type, other owner: ignored
      ...(desc === null ? [] : [{ name: 'Xen', type: 18, desc }]),
    ],
  });
}

describe('findPvhEntry', () => {
  it('reads 8-byte and 4-byte descriptors', () => {
    expect(findPvhEntry(vmlinux())).toBe(0x1000100n);
    expect(findPvhEntry(vmlinux(new Bytes().u32(0, 0x1000200).bytes))).toBe(0x1000200n);
    expect(findPvhEntry(vmlinux(null))).toBeUndefined();
  });
});

describe('loadPvh', () => {
  it('loads by p_paddr and builds hvm_start_info with a module list and memory map', () => {
    const m = makeMemory([
      { start: 0, size: 64 * MiB },
      { start: 0xfffc0000, size: 0x40000, readonly: true },
    ]);
    const initrd = pattern(3000, 8);
    const r = loadPvh(m.memory, vmlinux(), {
      cmdline: 'console=hvc0',
      modules: [{ data: initrd, cmdline: 'initrd' }, { data: pattern(1) }],
      reserved: [{ start: 0xe0000, size: 0x20000, type: 3 }],
    });
    expect(r.entry).toBe(0x1000100n);
    expect(r.elf.segments).toEqual([
      { start: 0x1000000n, end: 0x1002000n },
      { start: 0x1004000n, end: 0x1004100n },
    ]);
    expect(m.memory.read(0x1000000, 0x800)).toEqual(pattern(0x800, 4));
    expect(m.memory.read(0x1000800, 0x1800).every((b) => b === 0)).toBe(true);
    const si = 0x6000;
    expect(r.startInfoAddress).toBe(BigInt(si));
    expect(r.registers).toEqual({ ebx: BigInt(si) });
    expect(r.entryState).toEqual({ mode: 'protected32', rip: 0x1000100n, registers: { rbx: BigInt(si) } });

    const u32 = (o: number): number => m.memory.readUint(si + o, 4);
    const u64 = (o: number): bigint => m.memory.readU64(si + o);
    expect(u32(0)).toBe(0x336ec578);
    expect(u32(4)).toBe(1);
    expect(u32(8)).toBe(0);
    expect(u32(12)).toBe(2);
    expect(m.memory.readCString(u64(24))).toBe('console=hvc0');
    expect(u64(32)).toBe(0n); // rsdp_paddr
    expect(u32(48)).toBe(4);
    expect(u32(52)).toBe(0);

    // hvm_modlist_entry { u64 paddr, size, cmdline_paddr, reserved }
    const modlist = Number(u64(16));
    const mod = (i: number, f: number): bigint => m.memory.readU64(modlist + i * 32 + f);
    expect(mod(0, 0) % 4096n).toBe(0n);
    expect(mod(0, 0)).toBeGreaterThanOrEqual(0x1004100n);
    expect(mod(0, 8)).toBe(3000n);
    expect(m.memory.read(mod(0, 0), 3000)).toEqual(initrd);
    expect(m.memory.readCString(mod(0, 16))).toBe('initrd');
    expect(mod(1, 8)).toBe(1n);
    expect(mod(1, 16)).toBe(0n);
    expect(mod(1, 24)).toBe(0n);

    // hvm_memmap_table_entry { u64 addr, u64 size, u32 type, u32 reserved }
    const memmap = Number(u64(40));
    const entries = [0, 1, 2, 3].map((i) => [
      m.memory.readU64(memmap + i * 24),
      m.memory.readU64(memmap + i * 24 + 8),
      m.memory.readUint(memmap + i * 24 + 16, 4),
      m.memory.readUint(memmap + i * 24 + 20, 4),
    ]);
    expect(entries).toEqual([
      [0n, 0xe0000n, 1, 0],
      [0xe0000n, 0x20000n, 3, 0],
      [0x100000n, BigInt(63 * MiB), 1, 0],
      [0xfffc0000n, 0x40000n, 2, 0],
    ]);
  });

  it('puts start info where the caller says, and sets rsdp_paddr on request', () => {
    const m = pvhMemory();
    const r = loadPvh(m.memory, vmlinux(), { startInfoAddress: 0x9000, rsdpAddress: 0xf0000 });
    expect(r.startInfoAddress).toBe(0x9000n);
    expect(m.memory.readU64(0x9000 + 32)).toBe(0xf0000n);
    expect(m.memory.readU64(0x9000 + 16)).toBe(0n); // no modules: modlist_paddr 0
  });
});

describe('loadPvh rejects', () => {
  it('an image without the note', () => {
    const m = pvhMemory();
    expect(expectAtomic(m, () => expectImageError(() => loadPvh(m.memory, vmlinux(null)), 'XEN_ELFNOTE_PHYS32_ENTRY'))).toBe(true);
  });

  it('a note with a bad descriptor size', () => {
    for (const size of [0, 2, 6, 16]) {
      expectImageError(() => loadPvh(pvhMemory().memory, vmlinux(new Uint8Array(size))), 'XEN_ELFNOTE_PHYS32_ENTRY');
    }
  });

  it('an entry above 4 GiB or outside the kernel', () => {
    expectImageError(() => findPvhEntry(vmlinux(new Bytes().u64(0, 0x1_0000_0000n).bytes)), 'XEN_ELFNOTE_PHYS32_ENTRY');
    const m = pvhMemory();
    expect(expectAtomic(m, () => expectImageError(() => loadPvh(m.memory, vmlinux(new Bytes().u32(0, 0x1003000).bytes)), 'XEN_ELFNOTE_PHYS32_ENTRY'))).toBe(true);
  });

  it('a kernel outside RAM', () => {
    expectImageError(() => loadPvh(makeMemory(16 * MiB).memory, vmlinux()), 'phdr[0].p_paddr');
  });

  it('a start info address that collides with the kernel', () => {
    const m = pvhMemory();
    expect(expectAtomic(m, () => expectArgumentError(() => loadPvh(m.memory, vmlinux(), { startInfoAddress: 0x1001000 }), 'startInfoAddress'))).toBe(true);
    expectArgumentError(() => loadPvh(m.memory, vmlinux(), { startInfoAddress: 0x9004 }), 'startInfoAddress');
  });
});

describe('loadPvh properties', () => {
  const image = vmlinux();
  const small = (): ReturnType<typeof makeMemory> => makeMemory([{ start: 0, size: 0x10000 }, { start: 0x1000000, size: 0x10000 }]);

  it('every truncation is rejected atomically with a typed error', () => {
    const m = small();
    for (let cut = 0; cut < image.length; cut++) {
      expect(expectAtomic(m, () => loadPvh(m.memory, image.subarray(0, cut)))).toBe(false);
    }
  });

  it('random corruption either loads or fails atomically with a typed error', () => {
    const m = small();
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(image.length - 1), fc.nat(255)), { minLength: 1, maxLength: 8 }), (edits) => {
        const img = image.slice();
        for (const [at, v] of edits) img[at] = v;
        expectAtomic(m, () => loadPvh(m.memory, img, { cmdline: 'x', modules: [{ data: pattern(64) }] }));
      }),
      { numRuns: 1000 },
    );
  });
});
