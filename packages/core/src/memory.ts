/**
 * Guest RAM. Every guest-physical access made by the host goes through one checked
 * translation ({@link GuestMemory.translate}) that validates start, length, overflow and the
 * region map — Solo5's `HVT_CHECKED_GPA_P` rather than kvmtool's unchecked
 * `guest_flat_to_host`. No method hands out a view that outlives the call.
 * @module
 */
import { GuestMemoryError, InvalidArgumentError } from './errors.js';
import { gpa, type GuestAddress, hex } from './address.js';
import { checkBytes, checkInt, checkObject, show } from './check.js';

/** Host memory backing one region (a `memfd` mapping on KVM, an `ArrayBuffer` in the mock). */
export interface HostMemory {
  /**
   * The host mapping. SAFETY: the view is valid until {@link HostMemory.close}; only
   * {@link GuestMemory} holds it, and it drops its reference when the region is removed.
   */
  readonly bytes: Uint8Array;
  /** Host virtual address of `bytes[0]` (0n for memory KVM never sees). */
  readonly hostAddress: bigint;
  /** The memfd backing the mapping, or -1. */
  readonly fd: number;
  /**
   * Optional: where the mapping holds data, as `[start, end)` byte ranges in order; the rest
   * was never written and reads as zeros (undefined: cannot tell). A snapshot copies only these,
   * instead of reading, and so allocating, every page.
   */
  dataExtents?(): ReadonlyArray<readonly [number, number]> | undefined;
  /** Unmaps and closes. Idempotent. */
  close(): void;
}

/** A contiguous range of guest-physical RAM. */
export interface MemoryRegion {
  /** KVM memslot number. */
  readonly slot: number;
  /** First guest-physical address. */
  readonly start: GuestAddress;
  /** Size in bytes (a multiple of 4 KiB). */
  readonly size: number;
  /** Whether guest writes fault to the VMM (KVM_MEM_READONLY) instead of reaching RAM. */
  readonly readonly: boolean;
  /** Optional label for diagnostics. */
  readonly name: string;
}

interface RegionEntry extends MemoryRegion {
  readonly startN: bigint;
  readonly endN: bigint; // exclusive
  host: HostMemory;
}

/** Accessible integer widths. */
export type IntWidth = 1 | 2 | 4 | 8;

/**
 * Bounds-checked view of a machine's guest-physical memory. Addresses may be given as
 * `number` or `bigint`; both are validated.
 */
export class GuestMemory {
  #regions: RegionEntry[] = [];

  /** Registers a region; used by `Machine`. Overlap and alignment are checked by the caller too. */
  addRegion(region: MemoryRegion, host: HostMemory): void {
    checkObject(region, 'region');
    checkBytes(checkObject(host, 'host')['bytes'], 'host.bytes');
    gpa(region.start, 'region.start');
    checkInt(region.size, 'region.size', 1, Number.MAX_SAFE_INTEGER);
    const startN = BigInt(region.start);
    const endN = startN + BigInt(region.size);
    for (const r of this.#regions) {
      if (startN < r.endN && r.startN < endN) {
        throw new InvalidArgumentError(
          'region',
          `[${hex(startN)}, ${hex(endN)}) overlaps region '${r.name}' [${hex(r.startN)}, ${hex(r.endN)})`,
        );
      }
    }
    if (host.bytes.byteLength < region.size) {
      throw new InvalidArgumentError('region', `host mapping (${host.bytes.byteLength} bytes) is smaller than the region`);
    }
    this.#regions.push({ ...region, startN, endN, host });
    this.#regions.sort((a, b) => (a.startN < b.startN ? -1 : 1));
  }

  /** Removes the region that uses `slot` and returns its host memory (the caller closes it). */
  removeRegion(slot: number): HostMemory | undefined {
    const i = this.#regions.findIndex((r) => r.slot === slot);
    if (i < 0) return undefined;
    const [r] = this.#regions.splice(i, 1);
    return r?.host;
  }

  /**
   * @internal Where region `slot`'s host memory holds data (byte ranges from the region's start;
   * see {@link HostMemory.dataExtents}), or undefined when its host cannot tell.
   */
  dataExtents(slot: number): ReadonlyArray<readonly [number, number]> | undefined {
    return this.#regions.find((r) => r.slot === slot)?.host.dataExtents?.();
  }

  /** All regions, lowest address first. */
  regions(): readonly MemoryRegion[] {
    return this.#regions.map(({ slot, start, size, readonly, name }) => ({ slot, start, size, readonly, name }));
  }

  /** Total bytes of guest RAM. */
  get totalSize(): number {
    return this.#regions.reduce((n, r) => n + r.size, 0);
  }

  /** Whether `[address, address+length)` lies entirely inside one region. Never throws for bad input. */
  contains(address: number | bigint, length: number): boolean {
    // Without building an error: callers ask this on hot paths (every MMIO exit asks whether
    // the address is RAM), and an Error with its stack costs ~10 µs.
    if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0) return false;
    let a: bigint;
    if (typeof address === 'bigint') a = address;
    else if (typeof address === 'number' && Number.isSafeInteger(address)) a = BigInt(address);
    else return false;
    if (a < 0n) return false;
    const end = a + BigInt(length);
    for (const r of this.#regions) {
      if (a >= r.startN && a < r.endN) return end <= r.endN;
      if (length === 0 && a === r.endN) return true;
    }
    return false;
  }

  /**
   * Checks `[address, address+length)` as every access does and returns the region holding it
   * (a description, never a view of its bytes). Throws {@link GuestMemoryError} otherwise.
   */
  regionAt(address: number | bigint, length: number): MemoryRegion {
    const { slot, start, size, readonly, name } = this.#translate(address, length).region;
    return { slot, start, size, readonly, name };
  }

  /**
   * The one checked translation: guest-physical range → (host bytes, offset). Rejects negative
   * or non-integer input, zero-crossing overflow, holes, and ranges straddling two regions.
   * SAFETY: private on purpose — `bytes` is the whole region's mapping; every caller below uses
   * it synchronously for exactly `[offset, offset+length)` and never lets it escape.
   */
  #translate(address: number | bigint, length: number): { bytes: Uint8Array; offset: number; region: RegionEntry } {
    if (typeof address !== 'number' && typeof address !== 'bigint') throw new InvalidArgumentError('address', `must be a number or bigint, got ${show(address)}`);
    if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0) {
      throw new GuestMemoryError(typeof address === 'bigint' ? address : BigInt(Math.trunc(address) || 0), typeof length === 'number' ? length || 0 : 0, `length must be a non-negative integer, got ${show(length)}`);
    }
    let a: bigint;
    if (typeof address === 'bigint') a = address;
    else if (Number.isSafeInteger(address)) a = BigInt(address);
    else throw new GuestMemoryError(0n, length, `address ${String(address)} is not an integer`);
    if (a < 0n) throw new GuestMemoryError(a, length, 'negative address');
    const end = a + BigInt(length);
    for (const r of this.#regions) {
      if (a >= r.startN && a < r.endN) {
        if (end > r.endN) throw new GuestMemoryError(a, length, `runs past the end of region '${r.name}' at ${hex(r.endN)}`);
        return { bytes: r.host.bytes, offset: Number(a - r.startN), region: r };
      }
      if (length === 0 && a === r.endN) return { bytes: r.host.bytes, offset: r.size, region: r };
    }
    throw new GuestMemoryError(a, length, 'not backed by guest RAM');
  }

  /** Reads exactly `length` bytes into a new buffer (a copy). */
  read(address: number | bigint, length: number): Uint8Array {
    const { bytes, offset } = this.#translate(address, length);
    return bytes.slice(offset, offset + length);
  }

  /** Reads exactly `into.length` bytes into `into`. */
  readInto(address: number | bigint, into: Uint8Array): void {
    checkBytes(into, 'into');
    const { bytes, offset } = this.#translate(address, into.length);
    into.set(bytes.subarray(offset, offset + into.length));
  }

  /** Writes all of `data` (host writes ignore the read-only flag: it only binds the guest). */
  write(address: number | bigint, data: Uint8Array): void {
    checkBytes(data, 'data');
    const { bytes, offset } = this.#translate(address, data.length);
    bytes.set(data, offset);
    if (this.#hostWrites) this.#mark(address, data.length);
  }

  /**
   * @internal Reset's copy back: for each offset `o` of `pages` (4 KiB aligned, inside the
   * region of `size` bytes at `start`), the page at `start + o` gets `src[srcOffset + o, +4 KiB)`
   * — one translation for all of them; marked as host writes like {@link write}.
   */
  writePages(start: bigint, size: number, src: Uint8Array, srcOffset: number, pages: readonly number[]): void {
    if (pages.length === 0) return;
    const { bytes, offset } = this.#translate(start, size);
    for (const o of pages) {
      if (!Number.isInteger(o) || o < 0 || o % 0x1000 !== 0 || o + 0x1000 > size) throw new InvalidArgumentError('pages', `offset ${o} is not a page of the region`);
      if (srcOffset + o + 0x1000 > src.length) throw new InvalidArgumentError('src', `has no page at ${srcOffset + o}`);
      bytes.set(src.subarray(srcOffset + o, srcOffset + o + 0x1000), offset + o);
    }
    const set = this.#hostWrites;
    if (set) for (const o of pages) set.add(start + BigInt(o));
  }

  #hostWrites: Set<bigint> | undefined;

  /**
   * @internal From now on, every page the host writes through this object (`write`, `fill`,
   * `writeUint`, `writeU64`) is added to the returned set (guest-physical page addresses): KVM's
   * dirty log sees only the guest's own stores, and a reset must also undo the host's (a
   * monitor's write-through, probe traps, device DMA).
   */
  trackHostWrites(): Set<bigint> {
    this.#hostWrites ??= new Set();
    return this.#hostWrites;
  }

  #mark(address: number | bigint, length: number): void {
    const set = this.#hostWrites as Set<bigint>;
    const a = BigInt(address);
    for (let p = a & ~0xfffn; p < a + BigInt(length); p += 0x1000n) set.add(p);
  }

  /** Fills `length` bytes with `value`. */
  fill(address: number | bigint, length: number, value = 0): void {
    checkInt(value, 'value', 0, 0xff);
    const { bytes, offset } = this.#translate(address, length);
    bytes.fill(value, offset, offset + length);
    if (this.#hostWrites) this.#mark(address, length);
  }

  /** Reads a little-endian unsigned integer of 1, 2 or 4 bytes. */
  readUint(address: number | bigint, width: 1 | 2 | 4): number {
    checkWidth(width);
    const { bytes, offset } = this.#translate(address, width);
    let v = 0;
    for (let i = width - 1; i >= 0; i--) v = v * 256 + (bytes[offset + i] as number);
    return v;
  }

  /** Reads a little-endian 64-bit unsigned integer. */
  readU64(address: number | bigint): bigint {
    const { bytes, offset } = this.#translate(address, 8);
    return new DataView(bytes.buffer, bytes.byteOffset + offset, 8).getBigUint64(0, true);
  }

  /**
   * Writes a little-endian integer of 1, 2 or 4 bytes. `value` must fit the width, unsigned or
   * two's complement (`-1` writes all ones); anything else is refused, never truncated.
   */
  writeUint(address: number | bigint, width: 1 | 2 | 4, value: number): void {
    checkWidth(width);
    checkInt(value, 'value', -(2 ** (8 * width - 1)), 2 ** (8 * width) - 1);
    const { bytes, offset } = this.#translate(address, width);
    let v = value >>> 0;
    for (let i = 0; i < width; i++) {
      bytes[offset + i] = v & 0xff;
      v >>>= 8;
    }
    if (this.#hostWrites) this.#mark(address, width);
  }

  /** Writes a little-endian 64-bit integer (`value` a bigint, unsigned or two's complement). */
  writeU64(address: number | bigint, value: bigint): void {
    if (typeof value !== 'bigint' || value < -(1n << 63n) || value >= 1n << 64n) throw new InvalidArgumentError('value', `must be a 64-bit bigint, got ${show(value)}`);
    const { bytes, offset } = this.#translate(address, 8);
    new DataView(bytes.buffer, bytes.byteOffset + offset, 8).setBigUint64(0, BigInt.asUintN(64, value), true);
    if (this.#hostWrites) this.#mark(address, 8);
  }

  /** Reads a NUL-terminated string of at most `max` bytes (latin1). */
  readCString(address: number | bigint, max = 4096): string {
    if (typeof address !== 'number' && typeof address !== 'bigint') throw new InvalidArgumentError('address', `must be a number or bigint, got ${show(address)}`);
    if (typeof address === 'number' && !Number.isSafeInteger(address)) throw new GuestMemoryError(0n, 0, `address ${address} is not an integer`);
    checkInt(max, 'max', 0, 1 << 30);
    let out = '';
    const base = typeof address === 'bigint' ? address : BigInt(address);
    for (let i = 0; i < max; i++) {
      const c = this.readUint(base + BigInt(i), 1);
      if (c === 0) return out;
      out += String.fromCharCode(c);
    }
    throw new GuestMemoryError(base, max, 'string is not terminated within the limit');
  }

  /** Drops every region without closing host memory (used by `Machine.close`). */
  clear(): HostMemory[] {
    const hosts = this.#regions.map((r) => r.host);
    this.#regions = [];
    return hosts;
  }
}

function checkWidth(width: unknown): void {
  if (width !== 1 && width !== 2 && width !== 4) throw new InvalidArgumentError('width', `must be 1, 2 or 4, got ${show(width)}`);
}

/** Validates a region size: positive, 4 KiB multiple, below `max`. */
export function checkRegionSize(size: unknown, argument: string, max = 64 * 1024 ** 3): number {
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
    throw new InvalidArgumentError(argument, `must be a positive integer number of bytes, got ${show(size)}`);
  }
  if (size % 4096 !== 0) throw new InvalidArgumentError(argument, `must be a multiple of 4096, got ${size}`);
  if (size > max) throw new InvalidArgumentError(argument, `${size} bytes exceeds the limit of ${max}`);
  return size;
}

export { gpa };
