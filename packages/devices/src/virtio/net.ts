/**
 * virtio-net (virtio 1.2 §5.1, device ID 1): Ethernet frames between a guest and the host.
 * Queue 0 is receiveq1 (device → driver), 1 is transmitq1 (driver → device); no control queue,
 * no multiqueue. Every buffer starts with the 12-byte `virtio_net_hdr` (its VERSION_1 size, with
 * `num_buffers`), little-endian:
 *
 * | off | field | | off | field |
 * |---|---|---|---|---|
 * | 0 | flags u8 | | 6 | csum_start le16 |
 * | 1 | gso_type u8 | | 8 | csum_offset le16 |
 * | 2 | hdr_len le16 | | 10 | num_buffers le16 |
 * | 4 | gso_size le16 | | | |
 *
 * Offered features: MAC (bit 5), MTU (bit 3), STATUS (bit 16); the transport adds VERSION_1. No
 * checksum or segmentation offload and no mergeable rx buffers are offered, so a transmitted
 * header must say `flags = 0`, `gso_type = GSO_NONE`, and every received frame goes into one
 * buffer whose header says `num_buffers = 1` (§5.1.6.4: MUST without MRG_RXBUF).
 *
 * This model only frames and checks; forwarding, learning and mediation are the
 * {@link VirtualSwitch}'s. What it drops (and counts) is what no switch should see: a header
 * shorter than 12 bytes, a header asking for an offload that was not negotiated, a frame shorter
 * than an Ethernet header or longer than the MTU allows — without reading a byte of an oversized
 * chain. Frames for the guest wait in a bounded backlog until the driver posts rx buffers; a
 * buffer too small for the frame (the driver broke §5.1.6.3.1) completes empty and the frame is
 * dropped.
 * @module
 */
import { InvalidArgumentError, SnapshotFormatError } from '@tsvm/core';
import { SnapshotReader } from '../snapshot-fields.js';
import { BacklogDevice } from './backlog-device.js';
import { ChainReader, ChainWriter } from './chain-io.js';
import type { VirtioContext, VirtioDevice } from './device.js';
import type { DescriptorChain } from './virtqueue.js';

/** Virtio device ID of a network card. */
export const NET_DEVICE_ID = 1;
/** Size of `struct virtio_net_hdr` with VERSION_1 (`num_buffers` included). */
export const NET_HEADER_SIZE = 12;
/** Destination MAC, source MAC and EtherType. */
export const ETHERNET_HEADER_SIZE = 14;
/** Bytes an 802.1Q tag adds to a frame. */
export const VLAN_TAG_SIZE = 4;
/** Default MTU (payload bytes after the Ethernet header). */
export const DEFAULT_MTU = 1500;

/** Device feature bits of §5.1.3 this model offers. */
export const NetFeature = {
  /** Config space holds `mtu`. */
  Mtu: 1n << 3n,
  /** Config space holds `mac`. */
  Mac: 1n << 5n,
  /** Config space holds `status` (link up). */
  Status: 1n << 16n,
} as const;

/** `virtio_net_hdr.flags` bit: the driver left the checksum to the device (needs CSUM). */
export const NET_HDR_F_NEEDS_CSUM = 1;
/** `virtio_net_hdr.gso_type` of a frame without segmentation offload. */
export const NET_HDR_GSO_NONE = 0;
/** `status` bit: link up. */
export const NET_S_LINK_UP = 1;

/** A 6-byte MAC address as text, `02:00:00:00:00:01`. */
export type MacAddress = string;

/** Parses `aa:bb:cc:dd:ee:ff` (or `-`-separated) into 6 bytes; throws `InvalidArgumentError`. */
export function parseMac(text: string, argument = 'mac'): Uint8Array {
  const m = /^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$/i.exec(text);
  if (m === null) throw new InvalidArgumentError(argument, `not a MAC address: ${JSON.stringify(text)}`);
  return Uint8Array.from(m.slice(1), (h) => parseInt(h, 16));
}

/** Formats 6 bytes at `offset` of `b` as `aa:bb:cc:dd:ee:ff`. */
export function formatMac(b: Uint8Array, offset = 0): MacAddress {
  let s = '';
  for (let i = 0; i < 6; i++) s += (i ? ':' : '') + (b[offset + i] ?? 0).toString(16).padStart(2, '0');
  return s;
}

/** Largest frame (Ethernet header included) an interface with `mtu` sends or accepts; an 802.1Q tag adds 4. */
export function maxFrameSize(mtu: number, frame?: Uint8Array): number {
  const tagged = frame !== undefined && frame.length >= ETHERNET_HEADER_SIZE && frame[12] === 0x81 && frame[13] === 0x00;
  return mtu + ETHERNET_HEADER_SIZE + (tagged ? VLAN_TAG_SIZE : 0);
}

/** Why a transmitted frame was dropped by the device. */
export type NetDropReason = 'short-header' | 'offload-not-negotiated' | 'runt' | 'oversized';

/** Device counters. */
export interface NetDeviceStats {
  /** Frames handed to the uplink. */
  txFrames: number;
  /** Frame bytes handed to the uplink. */
  txBytes: number;
  /** Frames dropped at the device, by reason. */
  txDropped: Record<NetDropReason, number>;
  /** Frames written to rx buffers. */
  rxFrames: number;
  /** Frame bytes written to rx buffers. */
  rxBytes: number;
  /** Frames discarded because the rx backlog was full (the guest does not read). */
  rxOverflow: number;
  /** Frames dropped because the rx buffer could not hold them (completed empty). */
  rxTooSmall: number;
}

/** Where the device sends what the guest transmits (a {@link VirtualSwitch} installs itself). */
export interface NetUplink {
  /** One frame from the guest (header stripped, length checked against the MTU). */
  transmit(frame: Uint8Array): void;
}

/** Options of a {@link VirtioNet}. */
export interface VirtioNetOptions {
  /** The card's MAC address (`aa:bb:cc:dd:ee:ff`, unicast). */
  readonly mac: MacAddress;
  /** Device name. Default `virtio-net`. */
  readonly name?: string;
  /** MTU advertised (feature MTU) and enforced on transmit, 68..65535. Default 1500. */
  readonly mtu?: number;
  /** Queue size of each queue. Default 256. */
  readonly queueSize?: number;
  /** Most frames waiting for rx buffers; beyond it new ones are dropped. Default 256. */
  readonly maxBacklog?: number;
}

/** A virtio network card. Put it behind a {@link VirtioMmio} transport and attach it to a {@link VirtualSwitch}. */
export class VirtioNet extends BacklogDevice<Uint8Array, NetUplink> implements VirtioDevice {
  /** Device name. */
  readonly name: string;
  /** Virtio device ID (1). */
  readonly deviceId = NET_DEVICE_ID;
  /** receiveq1, transmitq1 sizes. */
  readonly queueMaxSizes: readonly number[];
  /** MAC, MTU and STATUS; no offloads. */
  readonly deviceFeatures = NetFeature.Mac | NetFeature.Mtu | NetFeature.Status;
  /** The card's MAC address. */
  readonly mac: MacAddress;
  /** The MTU. */
  readonly mtu: number;
  /** Counters. */
  readonly stats: NetDeviceStats = {
    txFrames: 0, txBytes: 0, txDropped: { 'short-header': 0, 'offload-not-negotiated': 0, runt: 0, oversized: 0 },
    rxFrames: 0, rxBytes: 0, rxOverflow: 0, rxTooSmall: 0,
  };
  /** struct virtio_net_config: mac[6], status le16, max_virtqueue_pairs le16, mtu le16. */
  protected readonly config: Uint8Array;

  /** @param options - MAC, name, MTU, queue size, backlog bound. */
  constructor(options: VirtioNetOptions) {
    super(options.maxBacklog ?? 256);
    const mac = parseMac(options.mac);
    if ((mac[0] as number) & 1) throw new InvalidArgumentError('mac', `${options.mac} is a multicast address; a card needs a unicast one`);
    this.mac = formatMac(mac);
    this.mtu = options.mtu ?? DEFAULT_MTU;
    if (!Number.isInteger(this.mtu) || this.mtu < 68 || this.mtu > 65535) throw new InvalidArgumentError('mtu', `must be an integer 68..65535, got ${this.mtu}`);
    this.name = options.name ?? 'virtio-net';
    const q = options.queueSize ?? 256;
    this.queueMaxSizes = [q, q];
    this.config = new Uint8Array(12);
    this.config.set(mac, 0);
    const v = new DataView(this.config.buffer);
    v.setUint16(6, NET_S_LINK_UP, true);
    v.setUint16(8, 1, true);
    v.setUint16(10, this.mtu, true);
  }

  /**
   * Queues a frame for the guest and writes what fits into posted rx buffers. The frame is the
   * caller's to keep: the device copies it into guest RAM.
   * @returns false if the backlog was full and the frame was dropped.
   */
  deliver(frame: Uint8Array): boolean {
    return this.deliverItem(frame);
  }

  /** Device reset: frames waiting for the guest are dropped. */
  reset(): void {
    this.pending.clear();
  }

  /** State as JSON: the MAC and MTU (frames in flight do not survive a snapshot, as on a wire). */
  snapshot(): unknown {
    return { version: 1, mac: this.mac, mtu: this.mtu };
  }

  /** Restores {@link VirtioNet.snapshot} output; MAC and MTU must match this card's. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    r.int('mtu', this.mtu, this.mtu);
    if (r.raw('mac') !== this.mac) throw new SnapshotFormatError(`${this.name}: snapshot is of MAC ${String(r.raw('mac'))}, this card is ${this.mac}`);
    this.reset();
  }

  /** Counts a frame the full backlog refused. */
  protected overflowed(): void {
    this.stats.rxOverflow++;
  }

  #drop(reason: NetDropReason): void {
    this.stats.txDropped[reason]++;
  }

  /** Checks one transmitted frame (header, offloads, size) and hands it to the switch. */
  protected transmitChain(ctx: VirtioContext, chain: DescriptorChain): void {
    const r = new ChainReader(ctx.memory, chain.readable);
    if (r.remaining < NET_HEADER_SIZE) return this.#drop('short-header');
    const len = r.remaining - NET_HEADER_SIZE;
    // Checked before reading: a chain may describe far more than any frame.
    if (len < ETHERNET_HEADER_SIZE) return this.#drop('runt');
    if (len > this.mtu + ETHERNET_HEADER_SIZE + VLAN_TAG_SIZE) return this.#drop('oversized');
    const hdr = r.read(NET_HEADER_SIZE);
    if ((hdr[0] as number) !== 0 || (hdr[1] as number) !== NET_HDR_GSO_NONE) return this.#drop('offload-not-negotiated');
    const frame = r.read(len);
    if (len > maxFrameSize(this.mtu, frame)) return this.#drop('oversized');
    this.stats.txFrames++;
    this.stats.txBytes += len;
    this.uplink?.transmit(frame);
  }

  /** Writes one frame into one rx buffer (no MRG_RXBUF: a frame that does not fit is dropped). */
  protected fillChain(ctx: VirtioContext, chain: DescriptorChain): number {
    const frame = this.pending.shift() as Uint8Array;
    const w = new ChainWriter(ctx.memory, chain.writable);
    if (w.remaining < NET_HEADER_SIZE + frame.length) {
      this.stats.rxTooSmall++;
      return 0;
    }
    const hdr = new Uint8Array(NET_HEADER_SIZE);
    hdr[10] = 1; // num_buffers = 1 (le16): no MRG_RXBUF, one buffer per frame.
    w.write(hdr);
    w.write(frame);
    this.stats.rxFrames++;
    this.stats.rxBytes += frame.length;
    return w.written;
  }
}
