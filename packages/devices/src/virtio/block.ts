/**
 * virtio-blk (device ID 2). Requests are `virtio_blk_req`: a 16-byte device-readable header
 * (type, reserved, sector), data, then one device-writable status byte.
 *
 * Responses: a chain too short to hold a header and a status byte has no way to report an
 * error, so it puts the device into DEVICE_NEEDS_RESET (as QEMU does). Everything else is
 * answered per request: out-of-range sectors, data not a multiple of 512 bytes, data in the
 * wrong direction, writes to a read-only disk and host I/O errors → VIRTIO_BLK_S_IOERR;
 * unknown request types → VIRTIO_BLK_S_UNSUPP.
 *
 * Capacity is the backing size rounded down to 512-byte sectors. A backing whose size is not
 * a multiple of 512 keeps its tail: it is not addressable by the guest, never read or written
 * (choosing this over zero-padding a last sector keeps writes from growing the host file).
 * @module
 */
import type { AccessSize } from '@tsvm/core';
import { DmaDeniedError, InvalidArgumentError, SnapshotFormatError } from '@tsvm/core';
import { SnapshotReader } from '../snapshot-fields.js';
import { type BlockBacking, FileBacking, MemoryBacking } from './block-backing.js';
import { positiveInt } from './budget.js';
import { ChainReader, ChainWriter } from './chain-io.js';
import { DeviceId } from './constants.js';
import { readConfigBytes, type VirtioContext, type VirtioDevice } from './device.js';
import { type DescriptorChain, VirtqueueError } from './virtqueue.js';

/** Sector size of the virtio-blk protocol. */
export const SECTOR_SIZE = 512;

/** virtio-blk feature bits used here. */
export const BlockFeature = {
  SizeMax: 1n << 1n,
  SegMax: 1n << 2n,
  Ro: 1n << 5n,
  BlkSize: 1n << 6n,
  Flush: 1n << 9n,
} as const;

/** Request types. */
export const BlockRequest = { In: 0, Out: 1, Flush: 4, GetId: 8 } as const;

/** Status byte values. */
export const BlockStatus = { Ok: 0, IoErr: 1, Unsupp: 2 } as const;

/** Length of the GET_ID answer. */
export const BLOCK_ID_BYTES = 20;
const HEADER = 16;

/** Options of a {@link VirtioBlock}. Exactly one of `buffer`, `path`, `backing`. */
export type VirtioBlockOptions = {
  /** Device name. Default `virtio-blk`. */
  readonly name?: string;
  /** Offer VIRTIO_BLK_F_RO and refuse writes. Default false. */
  readonly readonly?: boolean;
  /** Answer to GET_ID, at most 20 bytes of ASCII. Default empty. */
  readonly serial?: string;
  /** Queue size. Default 256. */
  readonly queueSize?: number;
  /**
   * Most data bytes one request may move; a longer one fails with VIRTIO_BLK_S_IOERR. Advertised
   * to the driver as `seg_max` × `size_max` (VIRTIO_BLK_F_SIZE_MAX), so a conforming driver never
   * exceeds it. Bounds the work of one request. At least 4096. Default 1 MiB.
   */
  readonly maxRequestBytes?: number;
} & (
  | { readonly buffer: Uint8Array; readonly path?: never; readonly backing?: never }
  | { readonly path: string; readonly buffer?: never; readonly backing?: never }
  | { readonly backing: BlockBacking; readonly buffer?: never; readonly path?: never }
);

/** A virtio block device with one request queue. Put it behind a {@link VirtioMmio} transport. */
export class VirtioBlock implements VirtioDevice {
  /** Device name. */
  readonly name: string;
  /** Virtio device ID. */
  readonly deviceId = DeviceId.Block;
  /** One request queue. */
  readonly queueMaxSizes: readonly number[];
  /** Device features. */
  readonly deviceFeatures: bigint;
  /** Capacity in 512-byte sectors. */
  readonly capacity: bigint;
  /** Whether writes are refused. */
  readonly readonly: boolean;
  readonly #backing: BlockBacking;
  readonly #id: Uint8Array;
  readonly #config: Uint8Array;
  readonly #maxRequest: number;
  #ctx: VirtioContext | undefined;

  /** @param options - backing store, read-only flag, serial. */
  constructor(options: VirtioBlockOptions) {
    this.name = options.name ?? 'virtio-blk';
    this.readonly = options.readonly ?? false;
    const serial = options.serial ?? '';
    if (serial.length > BLOCK_ID_BYTES || !/^[\x20-\x7e]*$/.test(serial)) {
      throw new InvalidArgumentError('serial', `must be at most ${BLOCK_ID_BYTES} printable ASCII characters`);
    }
    this.#id = new Uint8Array(BLOCK_ID_BYTES);
    this.#id.set(new TextEncoder().encode(serial));
    const q = options.queueSize ?? 256;
    if (!Number.isSafeInteger(q) || q < 2 || q > 32768 || (q & (q - 1)) !== 0) {
      throw new InvalidArgumentError('queueSize', `must be a power of two in [2, 32768], got ${q}`);
    }
    this.queueMaxSizes = [q];
    if (options.buffer !== undefined) this.#backing = new MemoryBacking(options.buffer);
    else if (options.path !== undefined) this.#backing = new FileBacking(options.path, this.readonly);
    else this.#backing = options.backing;
    this.capacity = BigInt(Math.floor(this.#backing.size / SECTOR_SIZE));
    const cap = positiveInt(options.maxRequestBytes, 1 << 20, 'maxRequestBytes', 4096);
    // Segments of whole pages: seg_max × size_max ≤ cap, so a conforming driver stays under it.
    const segMax = Math.max(1, Math.min(q - 2, Math.floor(cap / 4096)));
    const sizeMax = Math.max(4096, Math.floor(cap / segMax / 4096) * 4096);
    this.#maxRequest = cap;
    this.deviceFeatures = BlockFeature.SizeMax | BlockFeature.SegMax | BlockFeature.BlkSize | BlockFeature.Flush | (this.readonly ? BlockFeature.Ro : 0n);
    // struct virtio_blk_config: capacity@0, size_max@8, seg_max@12, geometry@16, blk_size@20.
    this.#config = new Uint8Array(24);
    const dv = new DataView(this.#config.buffer);
    dv.setBigUint64(0, this.capacity, true);
    dv.setUint32(8, sizeMax, true);
    dv.setUint32(12, segMax, true); // header and status take one descriptor each (q - 2 at most)
    dv.setUint32(20, SECTOR_SIZE, true);
  }

  /** @internal Called by the transport. */
  attach(context: VirtioContext): void {
    this.#ctx = context;
  }

  /** Reads `struct virtio_blk_config`. */
  readConfig(offset: number, size: AccessSize): number {
    return readConfigBytes(this.#config, offset, size);
  }

  /** Config space is read-only here (no VIRTIO_BLK_F_CONFIG_WCE). */
  writeConfig(): void {}

  /** Processes every available request. */
  notify(index: number): void {
    const ctx = this.#ctx;
    if (index !== 0 || ctx === undefined) return;
    ctx.processQueue(0, (chain) => this.#handle(ctx, chain));
  }

  /** Nothing in flight survives a kick, so there is nothing to drop. */
  reset(): void {}

  /** State as JSON: the capacity, so a restore onto a different disk is refused. */
  snapshot(): unknown {
    return { version: 1, capacity: Number(this.capacity) };
  }

  /** Checks the snapshot belongs to a disk of the same capacity. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    const cap = r.int('capacity', 0, Number.MAX_SAFE_INTEGER);
    if (BigInt(cap) !== this.capacity) {
      throw new SnapshotFormatError(`${this.name}: snapshot is of a disk of ${cap} sectors, this one has ${this.capacity}`);
    }
  }

  /** Closes the backing file. Idempotent. */
  close(): void {
    this.#backing.close();
  }

  #handle(ctx: VirtioContext, chain: DescriptorChain): number {
    if (chain.readableLength < HEADER || chain.writableLength < 1) {
      throw new VirtqueueError(`${this.name}: request without a 16-byte header and a status byte`);
    }
    const reader = new ChainReader(ctx.memory, chain.readable);
    const writer = new ChainWriter(ctx.memory, chain.writable);
    const header = new DataView(reader.read(HEADER).buffer);
    const type = header.getUint32(0, true);
    const sector = header.getBigUint64(8, true);
    const dataIn = chain.writableLength - 1; // writable bytes before the status byte
    let status: number;
    let len = 1;
    switch (type) {
      case BlockRequest.In:
        status = reader.remaining !== 0 ? BlockStatus.IoErr : this.#transfer(sector, dataIn, (pos, n) => {
          writer.stream(n, (view, done) => this.#backing.readAt(view, pos + done));
        });
        if (status === BlockStatus.Ok) len += dataIn;
        break;
      case BlockRequest.Out:
        status = dataIn !== 0 || this.readonly ? BlockStatus.IoErr : this.#transfer(sector, reader.remaining, (pos, n) => {
          reader.stream(n, (view, done) => this.#backing.writeAt(view, pos + done));
        });
        break;
      case BlockRequest.Flush:
        status = this.#hostIo(() => this.#backing.flush());
        break;
      case BlockRequest.GetId: {
        const n = writer.write(this.#id.subarray(0, Math.min(BLOCK_ID_BYTES, dataIn)));
        len += n;
        status = BlockStatus.Ok;
        break;
      }
      default:
        status = BlockStatus.Unsupp;
    }
    writer.seek(chain.writableLength - 1);
    writer.write(Uint8Array.of(status));
    return len;
  }

  /** Checks a data transfer's range and runs it; a host I/O error becomes S_IOERR. */
  #transfer(sector: bigint, bytes: number, run: (position: number, bytes: number) => void): number {
    if (bytes % SECTOR_SIZE !== 0 || bytes > this.#maxRequest) return BlockStatus.IoErr;
    const sectors = BigInt(bytes / SECTOR_SIZE);
    if (sector > this.capacity || sector + sectors > this.capacity) return BlockStatus.IoErr;
    return this.#hostIo(() => run(Number(sector) * SECTOR_SIZE, bytes));
  }

  #hostIo(fn: () => void): number {
    try {
      fn();
      return BlockStatus.Ok;
    } catch (e) {
      // Guest-memory faults are guest errors and must reach the transport; host I/O errors
      // (EIO, ENOSPC, a closed backing) fail only this request.
      if (e instanceof Error && 'syscall' in e) return BlockStatus.IoErr;
      if (e instanceof Error && (e as { code?: unknown }).code === 'TSVM_STATE') return BlockStatus.IoErr;
      // A monitor refused the DMA of the data: the request fails, RAM is untouched.
      if (e instanceof DmaDeniedError) return BlockStatus.IoErr;
      throw e;
    }
  }
}
