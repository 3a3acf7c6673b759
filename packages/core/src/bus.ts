/**
 * Address buses for port I/O and MMIO. A bus maps non-overlapping, non-empty ranges to
 * {@link Device}s and finds the owner of an address; PIO and MMIO share one handler
 * signature (the rust-vmm `vm-device` habit).
 * @module
 */
import { InvalidArgumentError } from './errors.js';
import { hex } from './address.js';
import type { Device } from './device.js';
import { RESERVED_PORTS, type ReservedPorts } from './reserved.js';
import { checkInt, checkObject, show } from './check.js';

/** A range on a bus. `start` is a port number (PIO) or guest-physical address (MMIO). */
export interface BusRange {
  readonly start: bigint;
  readonly size: number;
}

/** A registered device and its range. */
export interface BusEntry {
  readonly start: bigint;
  readonly end: bigint; // exclusive
  readonly device: Device;
}

/**
 * @internal A {@link BusEntry} with its bounds as numbers (exact: every address on either bus
 * is below 2^52), as {@link Bus.findNumber} returns it.
 */
export interface BusSpan {
  /** `entry.start` as a number. */
  readonly lo: number;
  /** `entry.end` as a number (exclusive). */
  readonly hi: number;
  /** The entry. */
  readonly entry: BusEntry;
}

/** What a caller passes to register: `{ port, size }` on the PIO bus, `{ address, size }` on MMIO. */
export type RangeSpec = { readonly port: number; readonly size: number } | { readonly address: number | bigint; readonly size: number };

/** A PIO or MMIO bus. */
export class Bus {
  /** `'pio'` or `'mmio'`. */
  readonly space: 'pio' | 'mmio';
  #entries: BusEntry[] = [];
  /** The entries with their bounds as numbers, in `#entries` order, for {@link Bus.findNumber}. */
  #spans: BusSpan[] = [];
  #sealed = false;
  readonly #limit: bigint;

  /** @param space - which address space this bus decodes. */
  constructor(space: 'pio' | 'mmio') {
    this.space = space;
    this.#limit = space === 'pio' ? 0x10000n : 1n << 52n;
  }

  /**
   * Maps `device` at `range`. Rejects zero-sized, out-of-space and overlapping ranges,
   * naming the device already there, and ports tsvm reserves ({@link RESERVED_PORTS}) unless
   * `options.claim` names their owner.
   * @returns a function that unregisters the device.
   */
  register(range: RangeSpec, device: Device, options: { readonly claim?: ReservedPorts['owner'] } = {}): () => void {
    // tsvm's own reserved ports (the exception reporter `loadFlat` installs) may still be taken
    // after sealing: they add no device behind the monitor's back, and sealing before loading
    // an image must not be an order trap.
    if (this.#sealed && options.claim === undefined) throw new InvalidArgumentError('range', `the ${this.space} bus is sealed; register devices before sealing`);
    checkObject(range, 'range');
    if (!device || typeof device !== 'object' || typeof device.name !== 'string') throw new InvalidArgumentError('device', 'must be a Device with a name');
    for (const m of ['read', 'write'] as const) if (device[m] !== undefined && typeof device[m] !== 'function') throw new InvalidArgumentError(`device.${m}`, `must be a function, got ${show(device[m])}`);
    const raw = 'port' in range ? range.port : range.address;
    if (this.space === 'pio' && !('port' in range)) throw new InvalidArgumentError('range', 'PIO ranges are given as { port, size }');
    if (this.space === 'mmio' && !('address' in range)) throw new InvalidArgumentError('range', 'MMIO ranges are given as { address, size }');
    if ((typeof raw !== 'number' && typeof raw !== 'bigint') || (typeof raw === 'number' && (!Number.isSafeInteger(raw) || raw < 0))) {
      throw new InvalidArgumentError('range.start', `must be a non-negative integer, got ${show(raw)}`);
    }
    if (!Number.isSafeInteger(range.size) || range.size <= 0) throw new InvalidArgumentError('range.size', `must be a positive integer, got ${show(range.size)}`);
    const start = BigInt(raw);
    const end = start + BigInt(range.size);
    if (start < 0n || end > this.#limit) throw new InvalidArgumentError('range', `[${hex(start)}, ${hex(end)}) is outside the ${this.space} space`);
    if (this.space === 'pio') {
      for (const r of RESERVED_PORTS) {
        if (start < BigInt(r.port + r.size) && BigInt(r.port) < end && options.claim !== r.owner) {
          throw new InvalidArgumentError('range', `[${hex(start)}, ${hex(end)}) for '${device.name}' includes reserved port ${hex(r.port)} (${r.owner}: ${r.why})`);
        }
      }
    }
    for (const e of this.#entries) {
      if (start < e.end && e.start < end) {
        throw new InvalidArgumentError('range', `[${hex(start)}, ${hex(end)}) for '${device.name}' overlaps '${e.device.name}' at [${hex(e.start)}, ${hex(e.end)})`);
      }
    }
    const entry: BusEntry = { start, end, device };
    this.#entries.push(entry);
    this.#entries.sort((a, b) => (a.start < b.start ? -1 : 1));
    this.#reindex();
    return () => { this.#entries = this.#entries.filter((e) => e !== entry); this.#reindex(); };
  }

  #reindex(): void {
    this.#spans = this.#entries.map((entry) => ({ lo: Number(entry.start), hi: Number(entry.end), entry }));
  }

  /**
   * @internal {@link Bus.find} for the exit path: `address` and `size` are numbers the backend
   * decoded (a port, or an MMIO address below 2^52), so the argument checks and the BigInt
   * arithmetic of `find` are skipped, and the span found carries its start as a number (the
   * device's offset needs no BigInt either). The entry is the one `find` returns.
   */
  findNumber(address: number, size: number): BusSpan | undefined {
    const spans = this.#spans;
    const end = address + size;
    for (let i = 0; i < spans.length; i++) {
      const sp = spans[i] as BusSpan;
      if (address >= sp.lo && end <= sp.hi) return sp;
    }
    return undefined;
  }

  /** Finds the device owning `address` (and the access end), or undefined. */
  find(address: bigint, size = 1): BusEntry | undefined {
    if (typeof address !== 'bigint') throw new InvalidArgumentError('address', `must be a bigint, got ${show(address)}`);
    checkInt(size, 'size', 0, 1 << 30);
    const end = address + BigInt(size);
    // Few devices per machine: a linear scan beats a tree at this size.
    for (const e of this.#entries) {
      if (address >= e.start && end <= e.end) return e;
    }
    return undefined;
  }

  /** All registered entries, lowest first. */
  entries(): readonly BusEntry[] {
    return this.#entries.slice();
  }

  /** Freezes the bus: later registrations throw. */
  seal(): void {
    this.#sealed = true;
  }
}
