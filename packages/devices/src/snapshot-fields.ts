/**
 * Shape checks for device `restore()`. A snapshot is untrusted input (it may come from another
 * build or from disk), so every field is validated and a bad one becomes a
 * {@link SnapshotFormatError} naming the device and the field.
 * @module
 */
import { SnapshotFormatError } from '@tsvm/core';

/** Reads typed fields out of one snapshot object; every getter throws `SnapshotFormatError`. */
export class SnapshotReader {
  readonly #device: string;
  readonly #obj: Record<string, unknown>;

  /**
   * @param device - device name used in error messages.
   * @param state - the value handed to `restore()`.
   * @param version - the `version` field the device expects; omit for nested objects.
   */
  constructor(device: string, state: unknown, version?: number) {
    this.#device = device;
    if (typeof state !== 'object' || state === null || Array.isArray(state)) {
      throw new SnapshotFormatError(`${device}: snapshot must be an object`);
    }
    this.#obj = state as Record<string, unknown>;
    const v = this.#obj['version'];
    if (version !== undefined && v !== version) {
      throw new SnapshotFormatError(`${device}: snapshot version ${String(v)} is not ${version}`);
    }
  }

  /** A nested object, itself wrapped in a reader (version is not checked). */
  nested(key: string): Record<string, unknown> {
    const v = this.#obj[key];
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.#fail(key, 'must be an object');
    return v as Record<string, unknown>;
  }

  /** The raw value (for arrays that the caller walks itself). */
  raw(key: string): unknown {
    return this.#obj[key];
  }

  /** An integer in `[min, max]`. */
  int(key: string, min: number, max: number): number {
    const v = this.#obj[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
      this.#fail(key, `must be an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
    }
    return v;
  }

  /** A boolean. */
  bool(key: string): boolean {
    const v = this.#obj[key];
    if (typeof v !== 'boolean') this.#fail(key, `must be a boolean, got ${JSON.stringify(v)}`);
    return v;
  }

  /** A base64 byte string of at most `maxLength` bytes (exactly `exactLength` if given). */
  bytes(key: string, maxLength: number, exactLength?: number): Uint8Array {
    return decodeBytes(this.#obj[key], maxLength, exactLength, (why) => this.#fail(key, why));
  }

  /** A `0x`-prefixed hex string holding an unsigned 64-bit value (bigints do not survive JSON). */
  u64(key: string): bigint {
    return decodeU64(this.#obj[key], (why) => this.#fail(key, why));
  }

  #fail(key: string, why: string): never {
    throw new SnapshotFormatError(`${this.#device}: field '${key}' ${why}`);
  }
}

/** Encodes bytes for a snapshot. */
export function encodeBytes(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

/** Encodes a u64 for a snapshot. */
export function encodeU64(value: bigint): string {
  return `0x${value.toString(16)}`;
}

/** Decodes a base64 byte string, calling `fail` on a bad value. */
export function decodeBytes(v: unknown, maxLength: number, exactLength: number | undefined, fail: (why: string) => never): Uint8Array {
  if (typeof v !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(v) || v.length % 4 !== 0) fail('must be a base64 string');
  const out = new Uint8Array(Buffer.from(v, 'base64'));
  if (out.length > maxLength) fail(`holds ${out.length} bytes, more than ${maxLength}`);
  if (exactLength !== undefined && out.length !== exactLength) fail(`holds ${out.length} bytes, not ${exactLength}`);
  return out;
}

/** Decodes a `0x` hex u64, calling `fail` on a bad value. */
export function decodeU64(v: unknown, fail: (why: string) => never): bigint {
  if (typeof v !== 'string' || !/^0x[0-9a-f]{1,16}$/.test(v)) fail('must be a 0x-prefixed hex u64 string');
  return BigInt(v);
}
