/**
 * Unpacking the `vmlinux` ELF inside a bzImage on the host, so a kernel can be booted through
 * PVH ({@link loadPvh}) without its in-guest decompressor (which, run by an instruction
 * emulator, can take minutes). The bzImage's `payload_offset`/`payload_length` (boot protocol
 * ≥ 2.08) locate the compressed payload; gzip is unpacked with `node:zlib`, and the kernel's
 * LZ4 "legacy" frames with the bounds-checked decoder below. Any malformed input is an
 * `ImageFormatError`: the decoder never reads or writes outside its buffers.
 * @module
 */
import { gunzipSync } from 'node:zlib';
import { ImageFormatError } from '../errors.js';
import { parseBzImage } from './linux.js';

/** Compression formats {@link extractVmlinux} can unpack. */
export type KernelCompression = 'gzip' | 'lz4';

/** What {@link extractVmlinux} found and unpacked. */
export interface ExtractedVmlinux {
  /** The uncompressed ELF image. */
  readonly vmlinux: Uint8Array;
  /** The payload's compression. */
  readonly compression: KernelCompression;
}

const LZ4_LEGACY_MAGIC = 0x184c2102;
/** Refuse to unpack anything claiming to be larger than this (a kernel is tens of MiB). */
const MAX_VMLINUX = 1024 * 1024 * 1024;

/**
 * Unpacks the `vmlinux` ELF from a bzImage.
 * @throws ImageFormatError - not a bzImage, a boot protocol without payload fields, an unknown
 *   compression (the field names its magic bytes), or a corrupt payload.
 *
 * @example
 * ```ts
 * const { vmlinux, compression } = extractVmlinux(readFileSync('/boot/vmlinuz'));   // 'gzip' or 'lz4'
 * const r = loadPvh(vm.memory, vmlinux, { avoid: vm.hostReserved() });
 * ```
 */
export function extractVmlinux(bzImage: Uint8Array): ExtractedVmlinux {
  const bz = parseBzImage(bzImage);
  if (bz.header.version < 0x0208) throw new ImageFormatError('version', 'boot protocol < 2.08 has no payload_offset/payload_length');
  const dv = new DataView(bzImage.buffer, bzImage.byteOffset, bzImage.byteLength);
  const offset = dv.getUint32(0x248, true);
  const length = dv.getUint32(0x24c, true);
  if (length === 0 || offset + length > bz.kernel.length) {
    throw new ImageFormatError('payload_length', `payload [${offset}, +${length}) is outside the ${bz.kernel.length}-byte protected-mode kernel`);
  }
  const payload = bz.kernel.subarray(offset, offset + length);
  let out: Uint8Array;
  let compression: KernelCompression;
  if (payload[0] === 0x1f && payload[1] === 0x8b) {
    compression = 'gzip';
    try {
      out = new Uint8Array(gunzipSync(payload, { maxOutputLength: MAX_VMLINUX }));
    } catch (e) {
      throw new ImageFormatError('payload', `gzip: ${(e as Error).message}`);
    }
  } else if (payload.length >= 8 && dv.getUint32(payload.byteOffset - bzImage.byteOffset, true) === LZ4_LEGACY_MAGIC) {
    compression = 'lz4';
    out = lz4Legacy(payload);
  } else {
    const magic = Buffer.from(payload.subarray(0, 6)).toString('hex');
    throw new ImageFormatError('payload', `compression with magic ${magic} is not supported (gzip and LZ4 only); unpack vmlinux with the kernel's scripts/extract-vmlinux instead`);
  }
  if (out.length < 4 || out[0] !== 0x7f || out[1] !== 0x45 || out[2] !== 0x4c || out[3] !== 0x46) {
    throw new ImageFormatError('payload', `the unpacked ${compression} payload is not an ELF image`);
  }
  return { vmlinux: out, compression };
}

/**
 * LZ4 legacy frame (what `lz4 -l` writes, and the kernel's LZ4 payload): the magic, then
 * blocks of `u32 compressed size` + data, possibly another magic (concatenated frames). The
 * kernel build appends the uncompressed size as the last 4 bytes.
 * @throws ImageFormatError - a truncated or corrupt frame.
 */
export function lz4Legacy(src: Uint8Array): Uint8Array {
  if (src.length < 8) throw new ImageFormatError('payload', 'LZ4 frame is truncated');
  const dv = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const declared = dv.getUint32(src.length - 4, true);
  if (declared === 0 || declared > MAX_VMLINUX) throw new ImageFormatError('payload', `LZ4 trailer declares ${declared} bytes`);
  const out = new Uint8Array(declared);
  let ip = 4;
  let op = 0;
  const end = src.length - 4;
  while (ip + 4 <= end && op < declared) {
    const size = dv.getUint32(ip, true);
    ip += 4;
    if (size === LZ4_LEGACY_MAGIC) continue;
    if (size === 0 || ip + size > end) throw new ImageFormatError('payload', `LZ4 block of ${size} bytes at ${ip - 4} runs past the payload`);
    op = lz4Block(src, ip, ip + size, out, op);
    ip += size;
  }
  if (op < declared) throw new ImageFormatError('payload', `LZ4 payload unpacked to ${op} bytes, trailer says ${declared}`);
  return out;
}

function corrupt(what: string): never {
  throw new ImageFormatError('payload', `corrupt LZ4 block: ${what}`);
}

/** Adds LZ4's 255-continued length bytes at `ip` to `base`; returns the length and the new `ip`. */
function extendedLength(src: Uint8Array, ip: number, end: number, base: number, what: string): [number, number] {
  let n = base;
  let b: number;
  do {
    if (ip >= end) corrupt(`${what} length runs past the block`);
    b = src[ip++] as number;
    n += b;
  } while (b === 255);
  return [n, ip];
}

/** Decodes one LZ4 block into `out` at `op`; returns the new output position. */
function lz4Block(src: Uint8Array, ip: number, end: number, out: Uint8Array, op: number): number {
  while (ip < end) {
    const token = src[ip++] as number;
    let lit = token >> 4;
    if (lit === 15) [lit, ip] = extendedLength(src, ip, end, lit, 'literal');
    if (ip + lit > end) corrupt('literals run past the block');
    if (op + lit > out.length) corrupt('output overflows the declared size');
    out.set(src.subarray(ip, ip + lit), op);
    ip += lit;
    op += lit;
    if (ip >= end) break; // the last sequence carries literals only
    if (ip + 2 > end) corrupt('match offset runs past the block');
    const offset = (src[ip] as number) | ((src[ip + 1] as number) << 8);
    ip += 2;
    let len = token & 15;
    if (len === 15) [len, ip] = extendedLength(src, ip, end, len, 'match');
    len += 4;
    if (offset === 0 || offset > op) corrupt(`match offset ${offset} points before the output`);
    if (op + len > out.length) corrupt('output overflows the declared size');
    let from = op - offset;
    if (offset >= len) {
      out.copyWithin(op, from, from + len);
      op += len;
    } else {
      for (let i = 0; i < len; i++) out[op++] = out[from++] as number;
    }
  }
  return op;
}
