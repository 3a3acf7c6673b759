/**
 * Little-endian byte helpers shared by the loaders: a bounds-checked reader over an
 * untrusted image (every overrun becomes an {@link ImageFormatError} naming the field, never a
 * `RangeError`) and a writer for building boot structures in a host buffer before they are
 * copied into guest RAM.
 * @module
 */
import { ImageFormatError, InvalidArgumentError } from '../errors.js';

/**
 * Bounds-checked little-endian reads from an image supplied by the user. Offsets may be
 * `number` or `bigint` (ELF64 offsets are 64-bit); anything past the end names `field`.
 */
export class ImageReader {
  /** The image bytes (not copied). */
  readonly bytes: Uint8Array;
  readonly #view: DataView;

  /** @param bytes - the image. */
  constructor(bytes: Uint8Array) {
    if (!(bytes instanceof Uint8Array)) throw new InvalidArgumentError('image', 'must be a Uint8Array');
    this.bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** Image length in bytes. */
  get length(): number {
    return this.bytes.length;
  }

  /**
   * Checks that `[offset, offset+length)` lies inside the image and returns `offset` as a number.
   * @param field - header field blamed when it does not.
   */
  check(offset: number | bigint, length: number | bigint, field: string): number {
    const o = BigInt(offset);
    const l = BigInt(length);
    if (o < 0n || l < 0n || o + l > BigInt(this.bytes.length)) {
      throw new ImageFormatError(
        field,
        `[0x${o.toString(16)}, +0x${l.toString(16)}) lies beyond the end of the ${this.bytes.length}-byte image`,
      );
    }
    return Number(o);
  }

  /** Reads an unsigned byte. */
  u8(offset: number, field: string): number {
    return this.#view.getUint8(this.check(offset, 1, field));
  }

  /** Reads a little-endian u16. */
  u16(offset: number, field: string): number {
    return this.#view.getUint16(this.check(offset, 2, field), true);
  }

  /** Reads a little-endian u32. */
  u32(offset: number | bigint, field: string): number {
    return this.#view.getUint32(this.check(offset, 4, field), true);
  }

  /** Reads a little-endian u64. */
  u64(offset: number | bigint, field: string): bigint {
    return this.#view.getBigUint64(this.check(offset, 8, field), true);
  }

  /** A view of `[offset, offset+length)` (not a copy). */
  slice(offset: number | bigint, length: number | bigint, field: string): Uint8Array {
    const o = this.check(offset, length, field);
    return this.bytes.subarray(o, o + Number(length));
  }
}

/** Builds a little-endian structure in a zero-filled host buffer. */
export class StructWriter {
  /** The buffer being built. */
  readonly bytes: Uint8Array;
  readonly #view: DataView;

  /** @param size - buffer size in bytes (zero-filled). */
  constructor(size: number) {
    this.bytes = new Uint8Array(size);
    this.#view = new DataView(this.bytes.buffer);
  }

  /** Writes a byte. */
  u8(offset: number, value: number): void {
    this.#view.setUint8(offset, value);
  }

  /** Writes a little-endian u16. */
  u16(offset: number, value: number): void {
    this.#view.setUint16(offset, value, true);
  }

  /** Writes a little-endian u32 (`bigint` values must fit in 32 bits). */
  u32(offset: number, value: number | bigint): void {
    this.#view.setUint32(offset, Number(BigInt.asUintN(32, BigInt(value))), true);
  }

  /** Writes a little-endian u64. */
  u64(offset: number, value: number | bigint): void {
    this.#view.setBigUint64(offset, BigInt.asUintN(64, BigInt(value)), true);
  }

  /** Copies `data` in at `offset`. */
  set(offset: number, data: Uint8Array): void {
    this.bytes.set(data, offset);
  }
}

/**
 * Encodes a command line or module string as UTF-8 plus a terminating NUL.
 * @param argument - option name blamed for an embedded NUL or a non-string.
 */
export function cString(value: unknown, argument: string): Uint8Array {
  if (typeof value !== 'string') throw new InvalidArgumentError(argument, `must be a string, got ${typeof value}`);
  if (value.includes('\0')) throw new InvalidArgumentError(argument, 'must not contain NUL characters');
  const encoded = new TextEncoder().encode(value);
  const out = new Uint8Array(encoded.length + 1);
  out.set(encoded);
  return out;
}

/** Rounds `value` up to a multiple of `align` (a power of two). */
export function alignUp(value: bigint, align: bigint): bigint {
  return (value + align - 1n) & ~(align - 1n);
}

/** Rounds `value` down to a multiple of `align` (a power of two). */
export function alignDown(value: bigint, align: bigint): bigint {
  return value & ~(align - 1n);
}
