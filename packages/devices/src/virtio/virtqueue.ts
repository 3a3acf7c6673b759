/**
 * The split virtqueue (virtio 1.x, 2.7) seen from the device side. The driver owns the rings,
 * so every field read here is hostile input: each guest pointer goes through the device's
 * `DeviceMemory` (checked translation; ring writes are DMA and pass the DMA gate), and every
 * structural rule the spec puts on the driver is checked before a chain reaches a device. A
 * violation throws {@link VirtqueueError}; the transport turns it into DEVICE_NEEDS_RESET (what
 * QEMU's `virtio_error` does).
 * @module
 */
import { type DeviceMemory, GuestMemoryError, TsvmError } from '@tsvm/core';
import { DESC_SIZE, DescFlag, VIRTQ_AVAIL_F_NO_INTERRUPT } from './constants.js';

/** Most entries an indirect table may hold (QEMU's VIRTQUEUE_MAX_SIZE). */
export const MAX_INDIRECT_ENTRIES = 1024;
const U32_MAX = 0xffffffff;
const U64_LIMIT = 1n << 64n;

/** The driver broke a virtqueue rule. Thrown inside the transport only; never reaches the run loop. */
export class VirtqueueError extends TsvmError {
  /** @param message - which rule, with the offending values. */
  constructor(message: string, options?: { cause?: unknown }) {
    super('TSVM_VIRTQUEUE', message, options);
  }
}

/** One guest buffer of a descriptor chain, already checked to lie inside guest RAM. */
export interface Segment {
  /** Guest-physical address. */
  readonly addr: bigint;
  /** Length in bytes (never 0). */
  readonly len: number;
}

/** A validated descriptor chain: device-readable segments first, then device-writable ones. */
export interface DescriptorChain {
  /** Head descriptor index: the id returned in the used ring. */
  readonly head: number;
  /** Segments the device may read. */
  readonly readable: readonly Segment[];
  /** Segments the device may write. */
  readonly writable: readonly Segment[];
  /** Total readable bytes. */
  readonly readableLength: number;
  /** Total writable bytes. */
  readonly writableLength: number;
  /** Descriptors read to build the chain (indirect tables included): the cost of walking it. */
  readonly descriptors: number;
}

/** Where a queue lives and what was negotiated for it. */
export interface QueueLayout {
  /** Number of entries (power of two, checked by the transport). */
  readonly size: number;
  /** Descriptor table address. */
  readonly desc: bigint;
  /** Driver (available) ring address. */
  readonly driver: bigint;
  /** Device (used) ring address. */
  readonly device: bigint;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  readonly eventIdx: boolean;
}

/** Ring positions: the part of a queue's state that is not in guest memory. */
export interface QueuePosition {
  /** Next available-ring slot the device will consume (free-running u16). */
  lastAvail: number;
  /** Next used-ring slot the device will fill (free-running u16). */
  usedIdx: number;
}

/** Runs `fn`, turning a guest-memory fault into a {@link VirtqueueError} that says what was read. */
function guarded<T>(what: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    if (e instanceof GuestMemoryError) throw new VirtqueueError(`${what}: ${e.message}`, { cause: e });
    throw e;
  }
}

/** Device side of one split virtqueue. */
export class SplitVirtqueue {
  readonly #mem: DeviceMemory;
  /** Layout as configured by the driver. */
  readonly layout: QueueLayout;
  /** Ring positions (shared with the transport's snapshot). */
  readonly position: QueuePosition;
  #usedAtLastSignal: number;

  /**
   * @param memory - the device's view of guest RAM.
   * @param layout - validated queue layout.
   * @param position - ring positions, mutated in place.
   */
  constructor(memory: DeviceMemory, layout: QueueLayout, position: QueuePosition) {
    this.#mem = memory;
    this.layout = layout;
    this.position = position;
    this.#usedAtLastSignal = position.usedIdx;
  }

  /** Checks that the three rings lie inside guest RAM and are aligned (2.7, table "alignment"). */
  static validateLayout(memory: Pick<DeviceMemory, 'contains'>, l: QueueLayout): string | undefined {
    const n = BigInt(l.size);
    const parts: [string, bigint, bigint, bigint][] = [
      ['descriptor table', l.desc, 16n * n, 16n],
      ['driver ring', l.driver, 6n + 2n * n, 2n],
      ['device ring', l.device, 6n + 8n * n, 4n],
    ];
    for (const [what, addr, len, align] of parts) {
      if (addr % align !== 0n) return `${what} at 0x${addr.toString(16)} is not ${align}-byte aligned`;
      if (!memory.contains(addr, Number(len))) return `${what} [0x${addr.toString(16)}, +${len}) is not inside guest RAM`;
    }
    return undefined;
  }

  /** Number of chains the driver made available that the device has not consumed. */
  pending(): number {
    const avail = guarded('reading avail.idx', () => this.#mem.readUint(this.layout.driver + 2n, 2));
    const n = (avail - this.position.lastAvail) & 0xffff;
    if (n > this.layout.size) {
      throw new VirtqueueError(`avail.idx moved from ${this.position.lastAvail} to ${avail}: more than the queue size ${this.layout.size}`);
    }
    return n;
  }

  /** Takes the next available chain, validated, or `undefined` if there is none. */
  pop(): DescriptorChain | undefined {
    if (this.pending() === 0) return undefined;
    const slot = this.position.lastAvail % this.layout.size;
    const head = guarded('reading avail.ring', () => this.#mem.readUint(this.layout.driver + 4n + 2n * BigInt(slot), 2));
    const chain = this.#walk(head);
    this.position.lastAvail = (this.position.lastAvail + 1) & 0xffff;
    if (this.layout.eventIdx) {
      // avail_event: ask to be notified for anything past what we consumed.
      const at = this.layout.device + 4n + 8n * BigInt(this.layout.size);
      guarded('writing avail_event', () => this.#mem.writeUint(at, 2, this.position.lastAvail));
    }
    return chain;
  }

  /** Returns a chain to the driver with `len` bytes written into its writable part. */
  pushUsed(head: number, len: number): void {
    const slot = this.position.usedIdx % this.layout.size;
    const elem = this.layout.device + 4n + 8n * BigInt(slot);
    guarded('writing used.ring', () => {
      this.#mem.writeUint(elem, 4, head);
      this.#mem.writeUint(elem + 4n, 4, Math.min(len, U32_MAX));
      this.position.usedIdx = (this.position.usedIdx + 1) & 0xffff;
      this.#mem.writeUint(this.layout.device + 2n, 2, this.position.usedIdx);
    });
  }

  /**
   * Whether the driver wants an interrupt for the used entries added since the last call
   * that returned true (VIRTQ_AVAIL_F_NO_INTERRUPT, or `used_event` with EVENT_IDX).
   */
  shouldSignal(): boolean {
    const old = this.#usedAtLastSignal;
    const now = this.position.usedIdx;
    if (old === now) return false;
    let signal: boolean;
    if (this.layout.eventIdx) {
      const at = this.layout.driver + 4n + 2n * BigInt(this.layout.size);
      const usedEvent = guarded('reading used_event', () => this.#mem.readUint(at, 2));
      // vring_need_event(): did used.idx step over used_event since the last signal?
      signal = ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    } else {
      const flags = guarded('reading avail.flags', () => this.#mem.readUint(this.layout.driver, 2));
      signal = (flags & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    }
    this.#usedAtLastSignal = now;
    return signal;
  }

  #readDesc(table: bigint, index: number): { addr: bigint; len: number; flags: number; next: number } {
    return guarded(`reading descriptor ${index}`, () => {
      const at = table + BigInt(index * DESC_SIZE);
      const addr = this.#mem.readU64(at);
      const len = this.#mem.readUint(at + 8n, 4);
      const flags = this.#mem.readUint(at + 12n, 2);
      const next = this.#mem.readUint(at + 14n, 2);
      return { addr, len, flags, next };
    });
  }

  #walk(head: number): DescriptorChain {
    const size = this.layout.size;
    if (head >= size) throw new VirtqueueError(`head descriptor ${head} is outside the queue of ${size}`);
    const readable: Segment[] = [];
    const writable: Segment[] = [];
    let readableLength = 0;
    let writableLength = 0;
    let table = this.layout.desc;
    let tableSize = size;
    let indirect = false;
    let index = head;
    let visited = 0;
    let descriptors = 0;
    for (;;) {
      if (index >= tableSize) throw new VirtqueueError(`descriptor index ${index} is outside a table of ${tableSize}`);
      if (++visited > tableSize) throw new VirtqueueError(`descriptor chain from head ${head} is longer than its table (${tableSize}): a loop`);
      const d = this.#readDesc(table, index);
      descriptors++;
      if (d.flags & DescFlag.Indirect) {
        if (!this.layout.indirect) throw new VirtqueueError('indirect descriptor used but VIRTIO_RING_F_INDIRECT_DESC was not negotiated');
        if (indirect) throw new VirtqueueError('nested indirect descriptor');
        if (index !== head) throw new VirtqueueError('indirect descriptor is not the head of its chain');
        if (d.flags & DescFlag.Next) throw new VirtqueueError('indirect descriptor also has the NEXT flag');
        if (d.len === 0 || d.len % DESC_SIZE !== 0) throw new VirtqueueError(`indirect table length ${d.len} is not a positive multiple of 16`);
        if (d.len / DESC_SIZE > MAX_INDIRECT_ENTRIES) throw new VirtqueueError(`indirect table of ${d.len / DESC_SIZE} entries exceeds ${MAX_INDIRECT_ENTRIES}`);
        this.#checkBuffer(d.addr, d.len, 'indirect table');
        table = d.addr;
        tableSize = d.len / DESC_SIZE;
        indirect = true;
        index = 0;
        visited = 0;
        continue;
      }
      const isWrite = (d.flags & DescFlag.Write) !== 0;
      if (!isWrite && writable.length > 0) throw new VirtqueueError(`device-readable descriptor ${index} follows a device-writable one`);
      if (d.len > 0) {
        this.#checkBuffer(d.addr, d.len, `descriptor ${index}`);
        if (isWrite) {
          writableLength += d.len;
          writable.push({ addr: d.addr, len: d.len });
        } else {
          readableLength += d.len;
          readable.push({ addr: d.addr, len: d.len });
        }
        if (readableLength > U32_MAX || writableLength > U32_MAX) throw new VirtqueueError('descriptor chain is longer than 4 GiB');
      }
      if (!(d.flags & DescFlag.Next)) break;
      index = d.next;
    }
    return { head, readable, writable, readableLength, writableLength, descriptors };
  }

  #checkBuffer(addr: bigint, len: number, what: string): void {
    if (addr + BigInt(len) > U64_LIMIT) throw new VirtqueueError(`${what}: address 0x${addr.toString(16)} + ${len} overflows 64 bits`);
    if (!this.#mem.contains(addr, len)) throw new VirtqueueError(`${what}: [0x${addr.toString(16)}, +${len}) is not inside guest RAM`);
  }
}
