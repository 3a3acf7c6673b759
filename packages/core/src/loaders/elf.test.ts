import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { elfNotes, loadElf, parseElf } from './elf.js';
import { buildElf, expectAtomic, expectImageError, expectTyped, makeMemory, pattern } from './fixtures.test-util.js';

const MiB = 1024 * 1024;

function sample(cls: 32 | 64): Uint8Array {
  return buildElf({
    class: cls,
    entry: 0x100010n,
    segments: [
      { paddr: 0x100000n, vaddr: 0x200000n, data: pattern(300, 1) },
      { paddr: 0x102000n, vaddr: 0x202000n, data: pattern(100, 2), memsz: 0x1000n },
    ],
    notes: [{ name: 'GNU', type: 3, desc: pattern(20, 3) }],
  });
}

describe('loadElf', () => {
  for (const cls of [32, 64] as const) {
    it(`loads ELF${cls} segments at p_paddr and zeroes the bss`, () => {
      const m = makeMemory(4 * MiB);
      const r = loadElf(m.memory, sample(cls));
      expect(r).toEqual({
        entry: 0x100010n,
        class: cls,
        segments: [
          { start: 0x100000n, end: 0x10012cn },
          { start: 0x102000n, end: 0x103000n },
        ],
        highestAddress: 0x103000n,
      });
      expect(m.memory.read(0x100000, 300)).toEqual(pattern(300, 1));
      expect(m.memory.read(0x102000, 100)).toEqual(pattern(100, 2));
      expect(m.memory.read(0x102064, 0x1000 - 100).every((b) => b === 0)).toBe(true);
      // Nothing outside the segments was touched.
      expect(m.memory.readUint(0x10012c, 1)).toBe(0xcc);
      expect(m.memory.readUint(0x103000, 1)).toBe(0xcc);
    });
  }

  it('places segments at p_vaddr on request', () => {
    const m = makeMemory(4 * MiB);
    const r = loadElf(m.memory, sample(64), { addresses: 'virtual' });
    expect(r.segments[0]).toEqual({ start: 0x200000n, end: 0x20012cn });
    expect(m.memory.read(0x200000, 300)).toEqual(pattern(300, 1));
  });

  it('skips empty PT_LOAD segments and other segment types', () => {
    const m = makeMemory(4 * MiB);
    const img = buildElf({
      class: 64,
      entry: 0n,
      segments: [
        { paddr: 0x1000n, data: new Uint8Array(0) },
        { paddr: 0x5000_0000n, data: pattern(8), type: 0x6474e551 /* PT_GNU_STACK */ },
        { paddr: 0x2000n, data: pattern(8) },
      ],
    });
    expect(loadElf(m.memory, img).segments).toEqual([{ start: 0x2000n, end: 0x2008n }]);
  });

  it('iterates notes', () => {
    const img = buildElf({
      class: 64,
      entry: 0n,
      segments: [{ paddr: 0x1000n, data: pattern(8) }],
      notes: [
        { name: 'GNU', type: 3, desc: pattern(20, 3) },
        { name: 'Xen', type: 18, desc: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]) },
      ],
    });
    const notes = [...elfNotes(img)];
    expect(notes.map((n) => [n.name, n.type, n.desc.length])).toEqual([
      ['GNU', 3, 20],
      ['Xen', 18, 8],
    ]);
    expect(notes[0]?.desc).toEqual(pattern(20, 3));
  });
});

describe('loadElf rejects', () => {
  const good = sample(64);
  const patch = (offset: number, bytes: number[]): Uint8Array => {
    const c = good.slice();
    c.set(bytes, offset);
    return c;
  };
  const cases: [string, () => Uint8Array, string][] = [
    ['bad magic', () => patch(1, [0x45 + 1]), 'e_ident[EI_MAG]'],
    ['unknown class', () => patch(4, [3]), 'e_ident[EI_CLASS]'],
    ['big-endian', () => patch(5, [2]), 'e_ident[EI_DATA]'],
    ['ELF version', () => patch(6, [0]), 'e_ident[EI_VERSION]'],
    ['ET_DYN', () => patch(16, [3, 0]), 'e_type'],
    ['an ARM machine', () => patch(18, [40, 0]), 'e_machine'],
    ['wrong e_phentsize', () => patch(54, [32, 0]), 'e_phentsize'],
    ['no program headers', () => patch(56, [0, 0]), 'e_phnum'],
    ['PN_XNUM', () => patch(56, [0xff, 0xff]), 'e_phnum'],
    ['phoff beyond the file', () => patch(32, [0xff, 0xff, 0xff, 0]), 'e_phoff'],
    ['phnum beyond the file', () => patch(56, [0x40, 0]), 'e_phoff'],
    ['filesz > memsz', () => patch(64 + 40, [1, 0, 0, 0, 0, 0, 0, 0]), 'phdr[0].p_filesz'],
    ['segment data beyond the file', () => patch(64 + 8, [0, 0, 1, 0]), 'phdr[0].p_offset'],
    ['truncated header', () => good.subarray(0, 40), 'e_ehsize'],
    ['a tiny file', () => good.subarray(0, 3), 'e_ident'],
  ];
  for (const [what, image, field] of cases) {
    it(what, () => {
      const m = makeMemory(4 * MiB);
      expectImageError(() => loadElf(m.memory, image()), field);
    });
  }

  it('a segment outside RAM, without writing the segments before it', () => {
    const m = makeMemory(4 * MiB);
    const img = buildElf({
      class: 32,
      entry: 0n,
      segments: [
        { paddr: 0x1000n, data: pattern(16) },
        { paddr: 0x3ff000n, data: pattern(16), memsz: 0x2000n },
      ],
    });
    expect(expectAtomic(m, () => expectImageError(() => loadElf(m.memory, img), 'phdr[1].p_paddr'))).toBe(true);
    expect(m.memory.readUint(0x1000, 1)).toBe(0xcc);
  });

  it('a segment straddling two regions', () => {
    const m = makeMemory([
      { start: 0, size: MiB },
      { start: MiB, size: MiB },
    ]);
    const img = buildElf({ class: 64, entry: 0n, segments: [{ paddr: BigInt(MiB - 8), data: pattern(16) }] });
    expectImageError(() => loadElf(m.memory, img), 'phdr[0].p_paddr');
  });

  it('a segment that overflows the address space', () => {
    const m = makeMemory(MiB);
    const img = buildElf({ class: 64, entry: 0n, segments: [{ paddr: 0xffff_ffff_ffff_f000n, data: pattern(16), memsz: 0x2000n }] });
    expectImageError(() => loadElf(m.memory, img), 'phdr[0].p_paddr');
  });

  it('overlapping segments', () => {
    const m = makeMemory(MiB);
    const img = buildElf({
      class: 64,
      entry: 0n,
      segments: [
        { paddr: 0x1000n, data: pattern(16), memsz: 0x1000n },
        { paddr: 0x1800n, data: pattern(16) },
      ],
    });
    const err = expectImageError(() => loadElf(m.memory, img), 'phdr[1].p_paddr');
    expect(err.message).toMatch(/overlaps phdr\[0\]/);
  });

  it('a malformed note', () => {
    const img = buildElf({ class: 64, entry: 0n, segments: [{ paddr: 0x1000n, data: pattern(8) }], notes: [{ name: 'Xen', type: 18, desc: pattern(8) }] });
    const noteOff = img.length - 24;
    new DataView(img.buffer).setUint32(noteOff + 4, 0x1000, true); // descsz far past the segment
    expect(() => [...elfNotes(img)]).toThrow(/runs past its segment/);
  });

  it('bad options', () => {
    const m = makeMemory(MiB);
    // @ts-expect-error -- deliberately wrong at runtime
    expect(() => loadElf(m.memory, good, { addresses: 'linear' })).toThrow(/addresses/);
    // @ts-expect-error -- deliberately wrong at runtime
    expect(() => parseElf('nope')).toThrow(/image/);
  });
});

describe('loadElf properties', () => {
  const good = sample(64);
  const good32 = sample(32);

  it('every truncation is rejected with a typed error and leaves memory untouched', () => {
    for (const img of [good, good32]) {
      const m = makeMemory([{ start: 0x100000, size: 0x10000 }]);
      for (let cut = 0; cut < img.length; cut++) {
        expect(expectAtomic(m, () => loadElf(m.memory, img.subarray(0, cut)))).toBe(false);
      }
    }
  });

  it('random corruption either loads or throws a typed error without touching memory', () => {
    const m = makeMemory([{ start: 0x100000, size: 0x10000 }]);
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(good.length - 1), fc.nat(255)), { minLength: 1, maxLength: 8 }), (edits) => {
        const img = good.slice();
        for (const [at, v] of edits) img[at] = v;
        expectAtomic(m, () => loadElf(m.memory, img));
        expectTyped(() => [...elfNotes(img)]);
      }),
      { numRuns: 500 },
    );
  });
});
