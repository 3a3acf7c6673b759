import { gzipSync } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ImageFormatError } from '../errors.js';
import { extractVmlinux, lz4Legacy } from './vmlinux.js';
import { Bytes, expectImageError, pattern } from './fixtures.test-util.js';

/** A bzImage (protocol 2.15) whose protected-mode kernel is `prefix` then `payload`. */
function bzWithPayload(payload: Uint8Array, prefix = 0x40): Uint8Array {
  const setupSize = 5 * 512;
  const kernel = new Uint8Array(Math.ceil((prefix + payload.length) / 16) * 16);
  kernel.set(payload, prefix);
  const b = new Bytes(setupSize);
  b.u8(0x1f1, 4).u32(0x1f4, Math.ceil(kernel.length / 16)).u16(0x1fe, 0xaa55);
  b.u8(0x200, 0xeb).u8(0x201, 0x6a);
  b.u32(0x202, 0x53726448).u16(0x206, 0x020f).u8(0x211, 0x01);
  b.u32(0x22c, 0x7fffffff).u32(0x230, 0x200000).u8(0x234, 1).u16(0x236, 1).u32(0x238, 255);
  b.u32(0x248, prefix).u32(0x24c, payload.length);
  b.u64(0x258, 0x1000000n).u32(0x260, 0x400000);
  b.set(setupSize, kernel);
  return b.bytes;
}

/** A fake ELF: the magic then a pattern. */
function fakeElf(n: number): Uint8Array {
  const e = pattern(n, 9);
  e.set([0x7f, 0x45, 0x4c, 0x46]);
  return e;
}

/** LZ4 legacy frame of one block holding `sequences`, plus the size trailer. */
function lz4Frame(block: number[], declared: number): Uint8Array {
  const b = new Bytes();
  b.u32(0, 0x184c2102).u32(4, block.length).set(8, Uint8Array.from(block)).u32(8 + block.length, declared);
  return b.bytes;
}

/** One literal-only LZ4 block (the encoding every LZ4 decoder must accept). */
function literalBlock(data: Uint8Array): number[] {
  const out: number[] = [];
  let n = data.length - 15;
  out.push(data.length >= 15 ? 0xf0 : data.length << 4);
  if (data.length >= 15) {
    while (n >= 255) { out.push(255); n -= 255; }
    out.push(n);
  }
  out.push(...data);
  return out;
}

describe('extractVmlinux', () => {
  it('unpacks a gzip payload', () => {
    const elf = fakeElf(10_000);
    const r = extractVmlinux(bzWithPayload(gzipSync(elf)));
    expect(r.compression).toBe('gzip');
    expect(r.vmlinux).toEqual(elf);
  });

  it('unpacks an LZ4 legacy payload with literals and overlapping matches', () => {
    // "\x7fELF" literal, then a match of offset 4 length 12 (overlapping copy), then literals "xyz".
    const block = [0x48, 0x7f, 0x45, 0x4c, 0x46, 0x04, 0x00, 0x30, 0x78, 0x79, 0x7a];
    const want = [0x7f, 0x45, 0x4c, 0x46, ...Array(3).fill([0x7f, 0x45, 0x4c, 0x46]).flat(), 0x78, 0x79, 0x7a];
    const r = extractVmlinux(bzWithPayload(lz4Frame(block, want.length)));
    expect(r.compression).toBe('lz4');
    expect([...r.vmlinux]).toEqual(want);
  });

  it('unpacks a long literal run (length extension bytes)', () => {
    const elf = fakeElf(1000);
    expect(lz4Legacy(lz4Frame(literalBlock(elf), elf.length))).toEqual(elf);
  });

  it('rejects payloads it cannot unpack, naming the field', () => {
    expectImageError(() => extractVmlinux(bzWithPayload(Uint8Array.of(0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4))), 'payload');
    expectImageError(() => extractVmlinux(bzWithPayload(gzipSync(pattern(100)))), 'payload'); // not an ELF
    expectImageError(() => extractVmlinux(bzWithPayload(gzipSync(fakeElf(100)).subarray(0, 30))), 'payload');
    const bad = bzWithPayload(gzipSync(fakeElf(100)));
    new DataView(bad.buffer).setUint32(0x24c, 1 << 30, true);
    expectImageError(() => extractVmlinux(bad), 'payload_length');
    expectImageError(() => extractVmlinux(new Uint8Array(100)), /boot_flag|header/);
  });

  it('rejects corrupt LZ4: offsets before the output, blocks past the end, short output', () => {
    expectImageError(() => lz4Legacy(lz4Frame([0x10, 0x41, 0x09, 0x00, 0x00], 10)), 'payload'); // offset 9 > 1 byte out
    expectImageError(() => lz4Legacy(lz4Frame([0x10, 0x41, 0x00, 0x00, 0x00], 10)), 'payload'); // offset 0
    expectImageError(() => lz4Legacy(lz4Frame([0xf0, 0xff], 300)), 'payload'); // length runs off the block
    expectImageError(() => lz4Legacy(lz4Frame(literalBlock(pattern(20)), 40)), 'payload'); // short
    const frame = lz4Frame(literalBlock(pattern(20)), 20);
    new DataView(frame.buffer).setUint32(4, 1 << 20, true);
    expectImageError(() => lz4Legacy(frame), 'payload');
  });

  it('never throws anything but ImageFormatError on random LZ4 frames', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.integer({ min: 1, max: 4096 }), (block, declared) => {
        try {
          const out = lz4Legacy(lz4Frame([...block], declared));
          expect(out.length).toBe(declared);
        } catch (e) {
          expect(e).toBeInstanceOf(ImageFormatError);
        }
      }),
      { numRuns: 2000 },
    );
  });
});
