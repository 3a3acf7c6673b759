/**
 * A test-only virtio-mmio driver: performs the init handshake through the register window,
 * lays out split virtqueues in a `GuestMemory` the way a guest driver would, and lets a test
 * write arbitrary (also malicious) descriptors. Works against any `Device` that implements
 * the virtio-mmio register file, so in-guest tests can compare notes with it.
 * @module
 */
import type { Access, Device, GuestMemory } from '@tsvm/core';
import { DESC_SIZE, DescFlag, Feature, MmioReg, Status } from '../virtio/constants.js';
import { recordingAccess } from './fakes.js';

/** One raw descriptor. */
export interface RawDescriptor {
  /** Buffer address. */
  readonly addr: bigint | number;
  /** Buffer length. */
  readonly len: number;
  /** `DescFlag` bits. */
  readonly flags: number;
  /** Next descriptor index. */
  readonly next: number;
}

/** A buffer of a chain: `data` is device-readable; `writable` reserves that many device-writable bytes. */
export type TestBuffer = { readonly data: Uint8Array } | { readonly writable: number };

/** A used-ring entry. */
export interface UsedEntry {
  /** Head descriptor index. */
  readonly id: number;
  /** Bytes written by the device. */
  readonly len: number;
}

/** A queue the test driver set up. */
export class TestQueue {
  /** Queue index. */
  readonly index: number;
  /** Number of entries. */
  readonly size: number;
  /** Descriptor table address. */
  readonly desc: bigint;
  /** Driver ring address. */
  readonly avail: bigint;
  /** Device ring address. */
  readonly used: bigint;
  /** Driver's free-running avail index. */
  availIdx = 0;
  /** Last used index the driver consumed. */
  lastUsed = 0;
  #nextDesc = 0;
  readonly #drv: VirtioMmioTestDriver;

  /** @internal */
  constructor(drv: VirtioMmioTestDriver, index: number, size: number, desc: bigint, avail: bigint, used: bigint) {
    this.#drv = drv;
    this.index = index;
    this.size = size;
    this.desc = desc;
    this.avail = avail;
    this.used = used;
  }

  /** Writes descriptor `i` of the main table (or of the table at `table`). */
  writeDesc(i: number, d: RawDescriptor, table: bigint = this.desc): void {
    const m = this.#drv.memory;
    const at = table + BigInt(i * DESC_SIZE);
    m.writeU64(at, BigInt.asUintN(64, BigInt(d.addr)));
    m.writeUint(at + 8n, 4, d.len);
    m.writeUint(at + 12n, 2, d.flags);
    m.writeUint(at + 14n, 2, d.next);
  }

  /** Puts `head` in the next avail slot and publishes it by bumping `avail.idx`. */
  publish(head: number): void {
    const m = this.#drv.memory;
    m.writeUint(this.avail + 4n + 2n * BigInt(this.availIdx % this.size), 2, head);
    this.setAvailIdx(this.availIdx + 1);
  }

  /** Writes `avail.idx` directly (for malicious jumps). */
  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.#drv.memory.writeUint(this.avail + 2n, 2, this.availIdx);
  }

  /** Writes `avail.flags`. */
  setAvailFlags(v: number): void {
    this.#drv.memory.writeUint(this.avail, 2, v);
  }

  /** Writes `used_event` (EVENT_IDX). */
  setUsedEvent(v: number): void {
    this.#drv.memory.writeUint(this.avail + 4n + 2n * BigInt(this.size), 2, v);
  }

  /** Reads `avail_event` (EVENT_IDX). */
  availEvent(): number {
    return this.#drv.memory.readUint(this.used + 4n + 8n * BigInt(this.size), 2);
  }

  /**
   * Builds a chain from `buffers` (allocating and filling guest memory), publishes it and
   * returns its head and the guest addresses of the buffers. With `indirect`, the chain is one
   * indirect descriptor pointing at a table holding the buffers.
   */
  addChain(buffers: readonly TestBuffer[], options: { indirect?: boolean } = {}): { head: number; addrs: bigint[] } {
    const addrs: bigint[] = [];
    const descs: RawDescriptor[] = buffers.map((b, i) => {
      const isData = 'data' in b;
      const len = isData ? b.data.length : b.writable;
      const addr = this.#drv.alloc(Math.max(len, 1), 8);
      if (isData) this.#drv.memory.write(addr, b.data);
      addrs.push(addr);
      const last = i === buffers.length - 1;
      return { addr, len, flags: (isData ? 0 : DescFlag.Write) | (last ? 0 : DescFlag.Next), next: i + 1 };
    });
    let head: number;
    if (options.indirect === true) {
      const table = this.#drv.alloc(descs.length * DESC_SIZE, 16);
      descs.forEach((d, i) => this.writeDesc(i, d, table));
      head = this.#take(1);
      this.writeDesc(head, { addr: table, len: descs.length * DESC_SIZE, flags: DescFlag.Indirect, next: 0 });
    } else {
      head = this.#take(descs.length);
      descs.forEach((d, i) => this.writeDesc(head + i, { ...d, next: head + i + 1 }));
    }
    this.publish(head);
    return { head, addrs };
  }

  /** Notifies the device. */
  kick(): void {
    this.#drv.write32(MmioReg.QueueNotify, this.index);
  }

  /** `used.idx` as the device last wrote it. */
  usedIdx(): number {
    return this.#drv.memory.readUint(this.used + 2n, 2);
  }

  /** Used entries added since the last call. */
  takeUsed(): UsedEntry[] {
    const out: UsedEntry[] = [];
    const m = this.#drv.memory;
    const idx = this.usedIdx();
    while (this.lastUsed !== idx) {
      const at = this.used + 4n + 8n * BigInt(this.lastUsed % this.size);
      out.push({ id: m.readUint(at, 4), len: m.readUint(at + 4n, 4) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** Reserves `n` consecutive descriptors (wrapping to 0 when the table end is reached). */
  #take(n: number): number {
    if (n > this.size) throw new RangeError(`chain of ${n} does not fit a queue of ${this.size}`);
    if (this.#nextDesc + n > this.size) this.#nextDesc = 0;
    const head = this.#nextDesc;
    this.#nextDesc += n;
    return head;
  }
}

/** Options of {@link VirtioMmioTestDriver.init}. */
export interface TestDriverInit {
  /** Features to accept; default: all offered. */
  readonly features?: bigint;
  /** Queue sizes to set up (index = queue); default: each queue's `QueueNumMax`. */
  readonly queueSizes?: readonly number[];
  /** Stop before DRIVER_OK. */
  readonly skipDriverOk?: boolean;
  /** Set up no queues (the test will). */
  readonly skipQueues?: boolean;
}

/** Drives a virtio-mmio register window from the guest side. */
export class VirtioMmioTestDriver {
  /** The transport under test. */
  readonly device: Device;
  /** Guest RAM. */
  readonly memory: GuestMemory;
  /** Access context passed to every register access. */
  readonly access: Access;
  /** Queues set up by `init` / `setupQueue`. */
  readonly queues: TestQueue[] = [];
  #brk: bigint;

  /**
   * @param device - the transport.
   * @param memory - guest RAM.
   * @param options - where the driver's allocator starts (default 0x1000) and an access context.
   */
  constructor(device: Device, memory: GuestMemory, options: { heapStart?: bigint; access?: Access } = {}) {
    this.device = device;
    this.memory = memory;
    this.access = options.access ?? recordingAccess('mmio');
    this.#brk = options.heapStart ?? 0x1000n;
  }

  /** Allocates `len` bytes of guest memory aligned to `align` (never freed). */
  alloc(len: number, align = 16): bigint {
    const a = BigInt(align);
    this.#brk = (this.#brk + a - 1n) / a * a;
    const at = this.#brk;
    this.#brk += BigInt(len);
    return at;
  }

  /** 32-bit register read. */
  read32(offset: number): number {
    return this.device.read?.(offset, 4, this.access) ?? 0;
  }

  /** 32-bit register write. */
  write32(offset: number, value: number): void {
    this.device.write?.(offset, value >>> 0, 4, this.access);
  }

  /** The 64 feature bits the device offers. */
  deviceFeatures(): bigint {
    this.write32(MmioReg.DeviceFeaturesSel, 0);
    const lo = BigInt(this.read32(MmioReg.DeviceFeatures));
    this.write32(MmioReg.DeviceFeaturesSel, 1);
    return (BigInt(this.read32(MmioReg.DeviceFeatures)) << 32n) | lo;
  }

  /** Writes the 64 driver feature bits. */
  writeDriverFeatures(f: bigint): void {
    this.write32(MmioReg.DriverFeaturesSel, 0);
    this.write32(MmioReg.DriverFeatures, Number(f & 0xffffffffn));
    this.write32(MmioReg.DriverFeaturesSel, 1);
    this.write32(MmioReg.DriverFeatures, Number((f >> 32n) & 0xffffffffn));
  }

  /** `Status` register. */
  status(): number {
    return this.read32(MmioReg.Status);
  }

  /** The full 3.1.1 handshake. Returns the features accepted. */
  init(options: TestDriverInit = {}): bigint {
    this.write32(MmioReg.Status, 0);
    this.write32(MmioReg.Status, Status.Acknowledge);
    this.write32(MmioReg.Status, Status.Acknowledge | Status.Driver);
    const features = options.features ?? this.deviceFeatures();
    this.writeDriverFeatures(features);
    this.write32(MmioReg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk);
    for (let i = 0; options.skipQueues !== true; i++) {
      this.write32(MmioReg.QueueSel, i);
      const max = this.read32(MmioReg.QueueNumMax);
      if (max === 0) break;
      this.setupQueue(i, options.queueSizes?.[i] ?? max);
    }
    if (options.skipDriverOk !== true) {
      this.write32(MmioReg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk | Status.DriverOk);
    }
    return features;
  }

  /** Allocates rings for queue `index` with `size` entries and sets QueueReady. */
  setupQueue(index: number, size: number): TestQueue {
    const desc = this.alloc(DESC_SIZE * size, 16);
    const avail = this.alloc(6 + 2 * size, 2);
    const used = this.alloc(6 + 8 * size, 4);
    this.write32(MmioReg.QueueSel, index);
    this.write32(MmioReg.QueueNum, size);
    this.write32(MmioReg.QueueDescLow, Number(desc & 0xffffffffn));
    this.write32(MmioReg.QueueDescHigh, Number(desc >> 32n));
    this.write32(MmioReg.QueueDriverLow, Number(avail & 0xffffffffn));
    this.write32(MmioReg.QueueDriverHigh, Number(avail >> 32n));
    this.write32(MmioReg.QueueDeviceLow, Number(used & 0xffffffffn));
    this.write32(MmioReg.QueueDeviceHigh, Number(used >> 32n));
    this.write32(MmioReg.QueueReady, 1);
    const q = new TestQueue(this, index, size, desc, avail, used);
    this.queues[index] = q;
    return q;
  }

  /** Queue `index` (throws if it was not set up). */
  queue(index: number): TestQueue {
    const q = this.queues[index];
    if (q === undefined) throw new RangeError(`queue ${index} was not set up`);
    return q;
  }

  /** Whether the device reports DEVICE_NEEDS_RESET. */
  needsReset(): boolean {
    return (this.status() & Status.DeviceNeedsReset) !== 0;
  }

  /** Reads and acknowledges `InterruptStatus`. */
  ackInterrupts(): number {
    const isr = this.read32(MmioReg.InterruptStatus);
    this.write32(MmioReg.InterruptAck, isr);
    return isr;
  }
}

/** All transport feature bits a modern driver cares about. */
export const TRANSPORT_FEATURES = Feature.Version1 | Feature.RingIndirectDesc | Feature.RingEventIdx;
