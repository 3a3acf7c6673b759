/**
 * virtio-vsock (virtio 1.2 §5.10, device ID 19): stream and seqpacket sockets between a guest and
 * the host. Queue 0 is rx (device → driver), 1 is tx (driver → device), 2 is event: the device
 * writes `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` there after a restore (the restored driver's
 * connections are gone) or when the host asks ({@link VirtioVsock.transportReset}). Config space
 * holds the guest's CID (le64). SEQPACKET (feature bit 1) keeps message boundaries: the last RW
 * fragment of a message carries `VIRTIO_VSOCK_SEQ_EOM` (and `SEQ_EOR` if it ends a record). Every packet starts with the 44-byte little-endian `virtio_vsock_hdr`:
 *
 * | off | field | | off | field |
 * |---|---|---|---|---|
 * | 0 | src_cid u64 | | 28 | type u16 (1 stream, 2 seqpacket) |
 * | 8 | dst_cid u64 | | 30 | op u16 |
 * | 16 | src_port u32 | | 32 | flags u32 |
 * | 20 | dst_port u32 | | 36 | buf_alloc u32 |
 * | 24 | len u32 | | 40 | fwd_cnt u32 |
 *
 * This model only parses and frames packets; connections, credit and mediation are the
 * {@link VsockRouter}'s. What it checks is what no router should ever see: a header shorter than
 * 44 bytes, a `len` the chain does not carry, a payload above {@link VSOCK_MAX_PAYLOAD}, a source
 * CID that is not the guest's own (spoofing). Such packets are dropped and counted; the driver
 * keeps working. Host → guest packets wait in a bounded backlog until the driver posts rx buffers;
 * a payload larger than one buffer is split across several, each with its own header, as Linux
 * expects (only the last piece keeps EOM/EOR).
 * @module
 */
import { InvalidArgumentError } from '@tsvm/core';
import { SnapshotReader } from '../snapshot-fields.js';
import { BacklogDevice } from './backlog-device.js';
import { ChainReader, ChainWriter } from './chain-io.js';
import type { VirtioContext, VirtioDevice } from './device.js';
import type { DescriptorChain } from './virtqueue.js';

/** Virtio device ID of vsock. */
export const VSOCK_DEVICE_ID = 19;
/** Size of `struct virtio_vsock_hdr`. */
export const VSOCK_HEADER_SIZE = 44;
/** Largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). */
export const VSOCK_MAX_PAYLOAD = 64 * 1024;
/** The host's CID. */
export const VSOCK_HOST_CID = 2;
/** `type` of a stream socket. */
export const VSOCK_TYPE_STREAM = 1;
/** `type` of a seqpacket socket (message boundaries kept; needs {@link VSOCK_F_SEQPACKET}). */
export const VSOCK_TYPE_SEQPACKET = 2;
/** Feature bit 1, VIRTIO_VSOCK_F_SEQPACKET: SEQPACKET sockets are supported. */
export const VSOCK_F_SEQPACKET = 1n << 1n;
/** RW `flags` of a SEQPACKET fragment: the last fragment of a message (VIRTIO_VSOCK_SEQ_EOM). */
export const VSOCK_SEQ_EOM = 1;
/** RW `flags`: the message ends a record (MSG_EOR; VIRTIO_VSOCK_SEQ_EOR), set with EOM. */
export const VSOCK_SEQ_EOR = 2;

/** `op` values. */
export const VsockOp = {
  Invalid: 0,
  Request: 1,
  Response: 2,
  Rst: 3,
  Shutdown: 4,
  Rw: 5,
  CreditUpdate: 6,
  CreditRequest: 7,
} as const;

/** SHUTDOWN `flags`. */
export const VsockShutdown = { Receive: 1, Send: 2 } as const;

const EVENT_QUEUE = 2;

/** A decoded vsock packet (header fields plus payload). CIDs above 2^32 are rejected at decode. */
export interface VsockPacket {
  /** Source CID. */
  readonly srcCid: number;
  /** Destination CID. */
  readonly dstCid: number;
  /** Source port. */
  readonly srcPort: number;
  /** Destination port. */
  readonly dstPort: number;
  /** Socket type (1 = stream). */
  readonly type: number;
  /** Operation ({@link VsockOp}). */
  readonly op: number;
  /** Op-specific flags. */
  readonly flags: number;
  /** Sender's receive buffer size. */
  readonly bufAlloc: number;
  /** Bytes the sender has consumed from this connection so far (free-running u32). */
  readonly fwdCnt: number;
  /** Payload (only RW carries one); `len` is its length. */
  readonly payload: Uint8Array;
}

/** Encodes a header for `p` (its `len` is `p.payload.length`). */
export function encodeVsockHeader(p: VsockPacket): Uint8Array {
  const b = new Uint8Array(VSOCK_HEADER_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(p.srcCid), true);
  v.setBigUint64(8, BigInt(p.dstCid), true);
  v.setUint32(16, p.srcPort >>> 0, true);
  v.setUint32(20, p.dstPort >>> 0, true);
  v.setUint32(24, p.payload.length, true);
  v.setUint16(28, p.type, true);
  v.setUint16(30, p.op, true);
  v.setUint32(32, p.flags >>> 0, true);
  v.setUint32(36, p.bufAlloc >>> 0, true);
  v.setUint32(40, p.fwdCnt >>> 0, true);
  return b;
}

/** Header fields of a raw 44-byte header, or a reason it is unusable. `len` is returned apart. */
export function decodeVsockHeader(b: Uint8Array): { ok: true; header: Omit<VsockPacket, 'payload'>; len: number } | { ok: false; reason: string } {
  if (b.length < VSOCK_HEADER_SIZE) return { ok: false, reason: `header is ${b.length} bytes, not ${VSOCK_HEADER_SIZE}` };
  const v = new DataView(b.buffer, b.byteOffset, VSOCK_HEADER_SIZE);
  const src = v.getBigUint64(0, true), dst = v.getBigUint64(8, true);
  if (src > 0xffffffffn || dst > 0xffffffffn) return { ok: false, reason: `CID beyond 32 bits (src ${src}, dst ${dst})` };
  return {
    ok: true,
    len: v.getUint32(24, true),
    header: {
      srcCid: Number(src), dstCid: Number(dst), srcPort: v.getUint32(16, true), dstPort: v.getUint32(20, true),
      type: v.getUint16(28, true), op: v.getUint16(30, true), flags: v.getUint32(32, true), bufAlloc: v.getUint32(36, true), fwdCnt: v.getUint32(40, true),
    },
  };
}

/** Why a transmitted packet was dropped by the device. */
export type VsockDropReason = 'short-header' | 'bad-cid' | 'spoofed-source' | 'truncated' | 'oversized';

/** Device counters. */
export interface VsockDeviceStats {
  /** Packets handed to the router. */
  txPackets: number;
  /** Packets dropped at the device, by reason. */
  txDropped: Record<VsockDropReason, number>;
  /** Packets written to rx buffers. */
  rxPackets: number;
  /** Packets discarded because the rx backlog was full. */
  rxOverflow: number;
  /** rx buffers too small for a header (completed empty). */
  rxTooSmall: number;
  /** TRANSPORT_RESET events written to the event queue. */
  events: number;
}

/** Where the device sends what the guest transmits (a {@link VsockRouter} installs itself). */
export interface VsockUplink {
  /** A well-formed packet from the guest (source CID already checked). */
  transmit(packet: VsockPacket): void;
  /** The driver reset the device: every connection of this guest is gone. */
  deviceReset(): void;
}

/** Options of a {@link VirtioVsock}. */
export interface VirtioVsockOptions {
  /** The guest's CID (≥ 3). */
  readonly cid: number;
  /** Device name. Default `virtio-vsock`. */
  readonly name?: string;
  /** Queue size of each queue. Default 128. */
  readonly queueSize?: number;
  /** Most packets waiting for rx buffers; beyond it new ones are dropped. Default 1024. */
  readonly maxBacklog?: number;
  /** Offer {@link VSOCK_F_SEQPACKET}. Default true. */
  readonly seqpacket?: boolean;
}

/** A virtio-vsock device. Put it behind a {@link VirtioMmio} transport and attach it to a {@link VsockRouter}. */
export class VirtioVsock extends BacklogDevice<VsockPacket, VsockUplink> implements VirtioDevice {
  /** Device name. */
  readonly name: string;
  /** Virtio device ID (19). */
  readonly deviceId = VSOCK_DEVICE_ID;
  /** rx, tx, event queue sizes. */
  readonly queueMaxSizes: readonly number[];
  /** {@link VSOCK_F_SEQPACKET} unless `seqpacket: false` (stream sockets need no feature bit). */
  readonly deviceFeatures: bigint;
  /** The guest's CID. */
  readonly cid: number;
  /** Counters. */
  readonly stats: VsockDeviceStats = {
    txPackets: 0, txDropped: { 'short-header': 0, 'bad-cid': 0, 'spoofed-source': 0, truncated: 0, oversized: 0 },
    rxPackets: 0, rxOverflow: 0, rxTooSmall: 0, events: 0,
  };
  /** Config space: `guest_cid` (le64). */
  protected readonly config: Uint8Array;
  #backlogBytes = 0;
  #eventPending = false;

  /** @param options - CID, name, queue size, backlog bound, SEQPACKET. */
  constructor(options: VirtioVsockOptions) {
    super(options.maxBacklog ?? 1024);
    if (!Number.isInteger(options.cid) || options.cid < 3 || options.cid > 0xfffffffe) throw new InvalidArgumentError('cid', `must be an integer 3..0xfffffffe, got ${options.cid}`);
    this.cid = options.cid;
    this.name = options.name ?? 'virtio-vsock';
    const q = options.queueSize ?? 128;
    this.queueMaxSizes = [q, q, q];
    this.deviceFeatures = options.seqpacket === false ? 0n : VSOCK_F_SEQPACKET;
    this.config = new Uint8Array(8);
    new DataView(this.config.buffer).setBigUint64(0, BigInt(this.cid), true);
  }

  /** Whether the driver negotiated {@link VSOCK_F_SEQPACKET} (only then may it use SEQPACKET sockets). */
  get seqpacket(): boolean {
    return ((this.ctx?.features ?? 0n) & VSOCK_F_SEQPACKET) !== 0n;
  }

  /** Payload bytes waiting for rx buffers. */
  get backlogBytes(): number {
    return this.#backlogBytes;
  }

  /** Whether a TRANSPORT_RESET event waits for an event-queue buffer. */
  get eventPending(): boolean {
    return this.#eventPending;
  }

  /**
   * Queues a packet for the guest and writes what fits into posted rx buffers.
   * @returns false if the backlog was full and the packet was dropped.
   */
  deliver(packet: VsockPacket): boolean {
    if (!this.deliverItem(packet)) return false;
    this.#backlogBytes += packet.payload.length;
    return true;
  }

  /**
   * Ends every connection of this guest from the host side: packets waiting for it are dropped,
   * the router resets its connections (peers see RST), and the driver is told
   * (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, §5.10.6.7: it shuts its sockets down and rereads the
   * CID) in the next buffer it posts on the event queue; several resets before it do not pile up.
   */
  transportReset(): void {
    this.pending.clear();
    this.#backlogBytes = 0;
    this.uplink?.deviceReset();
    this.#eventPending = true;
    this.#sendEvent();
  }

  /** DRIVER_OK: deliver what waited, the event included. */
  override activate(): void {
    super.activate();
    this.#sendEvent();
  }

  /** Device reset: the backlog and a pending event are dropped and the router forgets this guest's connections. */
  reset(): void {
    this.pending.clear();
    this.#backlogBytes = 0;
    this.#eventPending = false;
    this.uplink?.deviceReset();
  }

  /** State as JSON: the CID only (connections do not survive a snapshot; peers see a reset). */
  snapshot(): unknown {
    return { version: 1, cid: this.cid };
  }

  /**
   * Restores {@link VirtioVsock.snapshot} output; the CID must match. The restored driver still
   * believes in its connections, which the router never heard of: it gets a TRANSPORT_RESET event.
   */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    r.int('cid', this.cid, this.cid);
    this.reset();
    this.#eventPending = true;
  }

  /** The event queue was kicked: a buffer for a pending event may be there now. */
  protected override notifyOther(index: number): void {
    if (index === EVENT_QUEUE) this.#sendEvent();
  }

  /** Counts a packet the full backlog refused. */
  protected overflowed(): void {
    this.stats.rxOverflow++;
  }

  #drop(reason: VsockDropReason): void {
    this.stats.txDropped[reason]++;
  }

  #sendEvent(): void {
    const ctx = this.ctx;
    if (ctx === undefined || !ctx.active || !this.#eventPending) return;
    ctx.processQueue(EVENT_QUEUE, (chain) => {
      const w = new ChainWriter(ctx.memory, chain.writable);
      // A buffer too small for struct virtio_vsock_event completes empty; the event waits for the next.
      if (w.remaining < 4) return 0;
      w.write(new Uint8Array(4)); // le32 id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0)
      this.#eventPending = false;
      this.stats.events++;
      return w.written;
    }, () => this.#eventPending);
  }

  /** Checks one transmitted packet (header, length, source CID) and hands it to the router. */
  protected transmitChain(ctx: VirtioContext, chain: DescriptorChain): void {
    const r = new ChainReader(ctx.memory, chain.readable);
    const d = decodeVsockHeader(r.read(VSOCK_HEADER_SIZE));
    if (!d.ok) return this.#drop(d.reason.startsWith('CID') ? 'bad-cid' : 'short-header');
    if (d.len > VSOCK_MAX_PAYLOAD) return this.#drop('oversized');
    if (d.len > r.remaining) return this.#drop('truncated');
    if (d.header.srcCid !== this.cid) return this.#drop('spoofed-source');
    const packet: VsockPacket = { ...d.header, payload: r.read(d.len) };
    this.stats.txPackets++;
    this.uplink?.transmit(packet);
  }

  /** Writes the head packet (or as much of it as fits, with its own header) into one rx buffer. */
  protected fillChain(ctx: VirtioContext, chain: DescriptorChain): number {
    const w = new ChainWriter(ctx.memory, chain.writable);
    if (w.remaining < VSOCK_HEADER_SIZE) {
      this.stats.rxTooSmall++;
      return 0;
    }
    const p = this.pending.peek() as VsockPacket;
    const room = w.remaining - VSOCK_HEADER_SIZE;
    const take = Math.min(room, p.payload.length);
    // Only the last piece of a split SEQPACKET fragment may end the message (EOM/EOR).
    const part = take === p.payload.length ? p : { ...p, payload: p.payload.subarray(0, take), flags: p.type === VSOCK_TYPE_SEQPACKET ? p.flags & ~(VSOCK_SEQ_EOM | VSOCK_SEQ_EOR) : p.flags };
    w.write(encodeVsockHeader(part));
    w.write(part.payload);
    this.#backlogBytes -= take;
    if (take < p.payload.length) {
      // The rest goes into the next buffer with a fresh header (Linux reassembles by len).
      this.pending.replaceHead({ ...p, payload: p.payload.subarray(take) });
    } else {
      this.pending.shift();
    }
    this.stats.rxPackets++;
    return w.written;
  }
}
