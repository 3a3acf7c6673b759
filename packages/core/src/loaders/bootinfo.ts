/**
 * What every loader shares: the E820-style memory map handed to the guest, an allocator that
 * finds free guest-physical ranges without colliding with the loaded image, a write plan that
 * is validated in full before the first byte reaches guest RAM, and the entry CPU states the
 * `Machine` must establish (loaders never touch vCPU registers).
 * @module
 */
import { ImageFormatError, InvalidArgumentError } from '../errors.js';
import { gpa, type GuestAddress, hex, MAX_GUEST_PHYS } from '../address.js';
import type { GuestMemory } from '../memory.js';
import { alignDown, alignUp } from './bytes.js';

/** E820 / multiboot / `hvm_memmap_table_entry` memory types (the three protocols share them). */
export const E820Type = {
  /** Usable RAM. */
  Ram: 1,
  /** Reserved: the guest must not use it. */
  Reserved: 2,
  /** ACPI tables, reclaimable after they are parsed. */
  Acpi: 3,
  /** ACPI non-volatile storage. */
  Nvs: 4,
  /** Known-bad memory. */
  Unusable: 5,
} as const;

/** Half-open guest-physical range `[start, end)`. */
export interface AddressRange {
  /** First byte. */
  readonly start: GuestAddress;
  /** One past the last byte. */
  readonly end: GuestAddress;
}

/** One entry of the memory map handed to the guest. */
export interface MemoryMapEntry {
  /** First byte. */
  readonly start: bigint;
  /** Length in bytes (never 0). */
  readonly size: bigint;
  /** An {@link E820Type} value. */
  readonly type: number;
}

/** A range the caller wants marked non-RAM in the guest's memory map (e.g. a device window). */
export interface ReservedRange {
  /** First byte. */
  readonly start: number | bigint;
  /** Length in bytes. */
  readonly size: number | bigint;
  /** Memory type; {@link E820Type.Reserved} by default. */
  readonly type?: number;
}

/**
 * Memory below 1 MiB that PC guests expect to be non-RAM: the EBDA, VGA window and BIOS area
 * (`[0x9fc00, 0x100000)`). Pass it in `reserved` when RAM starts at 0 and the guest probes it.
 */
export const LEGACY_BIOS_HOLE: ReservedRange = { start: 0x9fc00n, size: 0x100000n - 0x9fc00n };

/**
 * The guest memory map: writable regions as RAM and read-only regions as reserved, with the
 * caller's `reserved` ranges carved out of RAM and listed with their own type; sorted, and
 * adjacent entries of one type merged.
 * @param reserved - ranges to mark non-RAM; validated (`reserved[i]`).
 */
export function buildMemoryMap(memory: GuestMemory, reserved: readonly ReservedRange[] = []): MemoryMapEntry[] {
  if (!Array.isArray(reserved)) throw new InvalidArgumentError('reserved', 'must be an array');
  const holes = reserved.map((r, i) => {
    const start = gpa(r.start, `reserved[${i}].start`);
    const size = BigInt(gpa(r.size, `reserved[${i}].size`));
    const type = r.type ?? E820Type.Reserved;
    if (size === 0n) throw new InvalidArgumentError(`reserved[${i}].size`, 'must not be 0');
    if (start + size > MAX_GUEST_PHYS + 1n) throw new InvalidArgumentError(`reserved[${i}]`, 'runs past the guest-physical address space');
    if (!Number.isInteger(type) || type < 1 || type > 0xffff_ffff || type === E820Type.Ram) {
      throw new InvalidArgumentError(`reserved[${i}].type`, `must be a non-RAM memory type, got ${String(type)}`);
    }
    return { start: BigInt(start), end: BigInt(start) + size, type };
  });
  const out: { start: bigint; end: bigint; type: number }[] = [];
  for (const region of memory.regions()) {
    const start = BigInt(region.start);
    const end = start + BigInt(region.size);
    if (region.readonly) {
      out.push({ start, end, type: E820Type.Reserved });
      continue;
    }
    // Carve every hole out of this RAM region.
    let pieces = [{ start, end }];
    for (const h of holes) {
      pieces = pieces.flatMap((p) => {
        if (h.end <= p.start || h.start >= p.end) return [p];
        const left = { start: p.start, end: h.start };
        const right = { start: h.end, end: p.end };
        return [left, right].filter((q) => q.end > q.start);
      });
    }
    for (const p of pieces) out.push({ ...p, type: E820Type.Ram });
  }
  for (const h of holes) out.push({ ...h });
  out.sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : a.type - b.type));
  const merged: { start: bigint; end: bigint; type: number }[] = [];
  for (const e of out) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.type === e.type && e.start <= last.end) {
      if (e.end > last.end) last.end = e.end;
    } else {
      merged.push({ ...e });
    }
  }
  return merged.map((e) => ({ start: e.start, size: e.end - e.start, type: e.type }));
}

/** Constraints for {@link AddressAllocator.allocate}. */
export interface AllocateOptions {
  /** Alignment of the start (a power of two); 4096 by default. */
  readonly align?: bigint;
  /** Lowest acceptable start; 0 by default. */
  readonly min?: bigint;
  /** Exclusive upper bound for the end; 4 GiB by default (boot structures hold 32-bit pointers). */
  readonly max?: bigint;
  /** Search from the top down (initrds go high so the kernel can grow below them). */
  readonly fromTop?: boolean;
  /** Tried first, before any search (a conventional address such as the zero page at 0x7000). */
  readonly prefer?: bigint;
}

interface Claim {
  readonly start: bigint;
  readonly end: bigint;
  readonly label: string;
}

/**
 * Tracks which guest-physical ranges a load has claimed and finds free ones. Claims must lie
 * inside one memory region; allocations only use writable regions. All failures are typed:
 * an image that does not fit is an {@link ImageFormatError}, a caller-chosen address that does
 * not work is an {@link InvalidArgumentError}.
 */
export class AddressAllocator {
  readonly #memory: GuestMemory;
  readonly #claims: Claim[] = [];

  /** @param memory - the guest RAM the load targets. */
  constructor(memory: GuestMemory) {
    this.#memory = memory;
  }

  /** Everything claimed so far, lowest first. */
  get claims(): readonly { readonly start: bigint; readonly end: bigint; readonly label: string }[] {
    return [...this.#claims].sort((a, b) => (a.start < b.start ? -1 : 1));
  }

  /**
   * Marks a range off-limits without requiring it to be RAM (the Machine's own GDT, page
   * tables, or device windows that the loader must not use).
   */
  avoid(start: bigint, size: bigint, label: string): void {
    if (size > 0n) this.#claims.push({ start, end: start + size, label });
  }

  /** Claims a range the image dictates; a range that is not RAM or overlaps is the image's fault. */
  claimImage(field: string, start: bigint, size: bigint): void {
    const why = this.#whyNot(start, size, false);
    if (why !== undefined) throw new ImageFormatError(field, why);
    if (size > 0n) this.#claims.push({ start, end: start + size, label: field });
  }

  /** Claims a range at an address the caller chose; failure blames that argument. */
  claimArgument(argument: string, start: bigint, size: bigint): void {
    const why = this.#whyNot(start, size, false);
    if (why !== undefined) throw new InvalidArgumentError(argument, why);
    if (size > 0n) this.#claims.push({ start, end: start + size, label: argument });
  }

  /**
   * Finds and claims a free range of `size` bytes in writable RAM.
   * @param field - what is being placed; named in the error when nothing fits.
   * @returns the start address.
   */
  allocate(field: string, size: bigint, options: AllocateOptions = {}): GuestAddress {
    const align = options.align ?? 4096n;
    const min = options.min ?? 0n;
    const max = options.max ?? 1n << 32n;
    if (size <= 0n) throw new InvalidArgumentError(field, 'allocation size must be positive');
    const claim = (start: bigint): GuestAddress => {
      this.#claims.push({ start, end: start + size, label: field });
      return start as GuestAddress;
    };
    const p = options.prefer;
    if (p !== undefined && p >= min && p + size <= max && p % align === 0n && this.#whyNot(p, size, true) === undefined) {
      return claim(p);
    }
    const regions = this.#memory
      .regions()
      .filter((r) => !r.readonly)
      .map((r) => ({ start: BigInt(r.start), end: BigInt(r.start) + BigInt(r.size) }));
    if (options.fromTop === true) regions.reverse();
    for (const r of regions) {
      const lo = r.start > min ? r.start : min;
      const hi = r.end < max ? r.end : max;
      if (options.fromTop === true) {
        let cursor = hi - size >= 0n ? alignDown(hi - size, align) : -1n;
        while (cursor >= lo) {
          const hit = this.#overlap(cursor, cursor + size, true);
          if (hit === undefined) return claim(cursor);
          if (hit.start < size) break;
          cursor = alignDown(hit.start - size, align);
        }
      } else {
        let cursor = alignUp(lo, align);
        while (cursor + size <= hi) {
          const hit = this.#overlap(cursor, cursor + size);
          if (hit === undefined) return claim(cursor);
          cursor = alignUp(hit.end, align);
        }
      }
    }
    throw new ImageFormatError(
      field,
      `no free ${hex(size)}-byte range in guest RAM within [${hex(min)}, ${hex(max)}) aligned to ${hex(align)}`,
    );
  }

  /** The overlapping claim that ends highest (or, with `lowest`, starts lowest): the one to skip past. */
  #overlap(start: bigint, end: bigint, lowest = false): Claim | undefined {
    let found: Claim | undefined;
    for (const c of this.#claims) {
      if (!(start < c.end && c.start < end)) continue;
      if (found === undefined || (lowest ? c.start < found.start : c.end > found.end)) found = c;
    }
    return found;
  }

  #whyNot(start: bigint, size: bigint, writableOnly: boolean): string | undefined {
    if (start < 0n || size < 0n) return 'negative address or size';
    if (start + size > MAX_GUEST_PHYS + 1n) return `[${hex(start)}, +${hex(size)}) overflows the guest-physical address space`;
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) return `${hex(size)} bytes is larger than any guest RAM`;
    if (size > 0n && !this.#memory.contains(start, Number(size))) {
      return `[${hex(start)}, ${hex(start + size)}) is not inside one guest RAM region`;
    }
    if (writableOnly && size > 0n && this.#memory.regionAt(start, Number(size)).readonly) {
      return `[${hex(start)}, ${hex(start + size)}) is read-only memory`;
    }
    const hit = this.#overlap(start, start + size);
    if (hit !== undefined) {
      return `[${hex(start)}, ${hex(start + size)}) overlaps ${hit.label} at [${hex(hit.start)}, ${hex(hit.end)})`;
    }
    return undefined;
  }
}

/** One pending write of a {@link LoadPlan}. */
export type PlannedWrite =
  | { readonly kind: 'copy'; readonly address: bigint; readonly data: Uint8Array; readonly label: string }
  | { readonly kind: 'zero'; readonly address: bigint; readonly length: number; readonly label: string };

/**
 * Writes collected during validation and applied only once everything has been checked, so a
 * rejected image leaves guest RAM untouched.
 */
export class LoadPlan {
  readonly #writes: PlannedWrite[] = [];

  /** The pending writes, in order. */
  get writes(): readonly PlannedWrite[] {
    return this.#writes;
  }

  /** Queues a copy of `data` (not copied now: the caller must not mutate it before commit). */
  copy(address: bigint, data: Uint8Array, label: string): void {
    if (data.length > 0) this.#writes.push({ kind: 'copy', address, data, label });
  }

  /** Queues zeroing `length` bytes. */
  zero(address: bigint, length: bigint, label: string): void {
    if (length <= 0n) return;
    if (length > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageFormatError(label, `${hex(length)} bytes cannot be zeroed`);
    this.#writes.push({ kind: 'zero', address, length: Number(length), label });
  }

  /** Appends another plan's writes. */
  append(other: LoadPlan): void {
    this.#writes.push(...other.writes);
  }

  /** Re-checks every write against `memory`, then performs them all. */
  commit(memory: GuestMemory): void {
    for (const w of this.#writes) {
      const length = w.kind === 'copy' ? w.data.length : w.length;
      if (!memory.contains(w.address, length)) {
        throw new ImageFormatError(w.label, `[${hex(w.address)}, +${hex(length)}) is not inside guest RAM`);
      }
    }
    for (const w of this.#writes) {
      if (w.kind === 'copy') memory.write(w.address, w.data);
      else memory.fill(w.address, w.length, 0);
    }
  }
}

/**
 * 32-bit protected mode, flat, paging off: CR0.PE=1, CR0.PG=0, CR4=0, EFER=0; CS a 4 GiB
 * execute/read 32-bit code segment with base 0; DS/ES/FS/GS/SS 4 GiB read/write data
 * segments with base 0; EFLAGS=0x2 (IF, TF, VM clear). Used by multiboot, PVH and the 32-bit
 * Linux entry (which additionally wants selectors 0x10/0x18).
 */
export interface Protected32Entry {
  /** Discriminant. */
  readonly mode: 'protected32';
  /** EIP. */
  readonly rip: bigint;
  /** General registers to set; all others 0. */
  readonly registers: Readonly<Partial<Record<'rax' | 'rbx' | 'rsi', bigint>>>;
}

/**
 * 64-bit long mode: CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CS a 64-bit code segment, data segments
 * flat, EFLAGS=0x2, and page tables identity-mapping at least {@link Long64Entry.identityMap}.
 */
export interface Long64Entry {
  /** Discriminant. */
  readonly mode: 'long64';
  /** RIP. */
  readonly rip: bigint;
  /** General registers to set; all others 0. */
  readonly registers: Readonly<Partial<Record<'rax' | 'rbx' | 'rsi', bigint>>>;
  /** Ranges that must be identity-mapped by the initial page tables. */
  readonly identityMap: readonly AddressRange[];
}

/** The CPU state a loader asks the Machine to establish before the first `KVM_RUN`. */
export type EntryState = Protected32Entry | Long64Entry;

/** Validates an optional caller-supplied address and returns it as a bigint. */
export function optionalAddress(value: unknown, argument: string): bigint | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' && typeof value !== 'bigint') {
    throw new InvalidArgumentError(argument, `must be a number or bigint, got ${typeof value}`);
  }
  return BigInt(gpa(value, argument));
}

/**
 * Reads the `avoid` option shared by the loaders: ranges the loader must leave alone (the
 * Machine's GDT, page tables, stacks), registered with the allocator.
 */
export function applyAvoid(allocator: AddressAllocator, avoid: readonly { start: number | bigint; size: number | bigint }[] | undefined): void {
  if (avoid === undefined) return;
  if (!Array.isArray(avoid)) throw new InvalidArgumentError('avoid', 'must be an array');
  avoid.forEach((r, i) => {
    const start = BigInt(gpa(r.start, `avoid[${i}].start`));
    const size = BigInt(gpa(r.size, `avoid[${i}].size`));
    allocator.avoid(start, size, `avoid[${i}]`);
  });
}
