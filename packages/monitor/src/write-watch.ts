/**
 * Write-watching guest RAM. Mediation makes the watched pages a read-only memslot, so every
 * guest write exits as MMIO and the monitor decides before writing the bytes itself; observing
 * turns on the dirty log and samples it.
 *
 * Core has no call to change the flags of part of a region, so the monitor *re-slots*: it copies
 * the region out, removes it, adds the pieces (before / watched / after) with the new flags and
 * copies the bytes back. This is set-up-time work (the machine must not be running), costs one
 * copy of the region, and changes slot numbers. Constraints, checked:
 * - the watched pages must lie inside one region and outside the host system area (the CPU
 *   writes accessed/dirty bits into page tables: a read-only page table would break paging);
 * - call it after `loadFlat` (which needs the first region whole to place the system area).
 * @module
 */
import { InvalidArgumentError, StateError, type Machine, type MemoryRegion } from '@tsvm/core';

const PAGE = 4096n;

/** A piece of a region after re-slotting. */
interface Piece { start: bigint; size: number; readonly: boolean; logDirty: boolean }

/** Per-machine bookkeeping: which regions log dirty pages (core does not report it). */
export class RegionFlags {
  readonly #machine: Machine;
  readonly #logDirty = new Set<bigint>();

  /** @param machine - the machine whose regions are re-slotted. */
  constructor(machine: Machine) {
    this.#machine = machine;
  }

  /** Regions with dirty logging turned on by the monitor. */
  dirtyRegions(): MemoryRegion[] {
    return this.#machine.memory.regions().filter((r) => this.#logDirty.has(BigInt(r.start)));
  }

  /** Page-aligned `[lo, hi)` covering the inclusive byte range `[first, last]`. */
  static pages(first: bigint, last: bigint): [bigint, bigint] {
    return [first - (first % PAGE), last - (last % PAGE) + PAGE];
  }

  /** Makes the pages of `[first, last]` read-only for the guest (writes exit as MMIO). */
  protect(first: bigint, last: bigint): void {
    const [lo, hi] = RegionFlags.pages(first, last);
    const r = this.#region(lo, hi);
    const sys = this.#machine.layout.systemArea;
    if (sys !== undefined && lo < BigInt(sys) + 0x10000n && BigInt(sys) < hi) {
      throw new InvalidArgumentError('range', `[0x${lo.toString(16)}, 0x${hi.toString(16)}) overlaps the host system area at 0x${sys.toString(16)} (page tables must stay writable)`);
    }
    const start = BigInt(r.start), end = start + BigInt(r.size);
    const dirty = this.#logDirty.has(start);
    const pieces: Piece[] = [];
    if (lo > start) pieces.push({ start, size: Number(lo - start), readonly: r.readonly, logDirty: dirty });
    pieces.push({ start: lo, size: Number(hi - lo), readonly: true, logDirty: dirty });
    if (hi < end) pieces.push({ start: hi, size: Number(end - hi), readonly: r.readonly, logDirty: dirty });
    if (pieces.length === 1 && r.readonly) return;
    this.#reslot(r, pieces);
  }

  /** Turns on dirty logging for the region(s) covering `[first, last]`. */
  logDirty(first: bigint, last: bigint): void {
    const [lo, hi] = RegionFlags.pages(first, last);
    for (const r of this.#machine.memory.regions()) {
      const start = BigInt(r.start), end = start + BigInt(r.size);
      if (end <= lo || start >= hi || this.#logDirty.has(start)) continue;
      this.#reslot(r, [{ start, size: r.size, readonly: r.readonly, logDirty: true }]);
    }
  }

  #region(lo: bigint, hi: bigint): MemoryRegion {
    const r = this.#machine.memory.regions().find((x) => lo >= BigInt(x.start) && hi <= BigInt(x.start) + BigInt(x.size));
    if (!r) throw new InvalidArgumentError('range', `[0x${lo.toString(16)}, 0x${hi.toString(16)}) is not inside one RAM region`);
    return r;
  }

  #reslot(r: MemoryRegion, pieces: Piece[]): void {
    const m = this.#machine;
    const bytes = m.memory.read(r.start, r.size);
    try {
      m.removeRegion(r.slot);
    } catch (e) {
      throw new StateError(`cannot re-slot region '${r.name}' now (the machine must not be running): ${(e as Error).message}`);
    }
    this.#logDirty.delete(BigInt(r.start));
    pieces.forEach((p, i) => {
      m.addRegion({ start: p.start, size: p.size, readonly: p.readonly, logDirty: p.logDirty, name: pieces.length === 1 ? r.name : `${r.name}.${i}` });
      if (p.logDirty) this.#logDirty.add(p.start);
      const off = Number(p.start - BigInt(r.start));
      m.memory.write(p.start, bytes.subarray(off, off + p.size));
    });
  }
}

/** Guest-physical addresses of the dirty pages in `bitmap` (bit per page, little-endian) of `region`. */
export function dirtyPageAddresses(region: MemoryRegion, bitmap: Uint8Array): bigint[] {
  const out: bigint[] = [];
  const pages = Math.ceil(region.size / 4096);
  for (let byte = 0; byte < bitmap.length; byte++) {
    const b = bitmap[byte] ?? 0;
    if (b === 0) continue;
    for (let bit = 0; bit < 8; bit++) {
      const page = byte * 8 + bit;
      if ((b >> bit) & 1 && page < pages) out.push(BigInt(region.start) + BigInt(page) * PAGE);
    }
  }
  return out;
}
