/**
 * The driver side of a virtio-net card without a guest: a {@link VirtioNet} behind a real
 * {@link VirtioMmio} transport, with queues in a test `GuestMemory` driven through the register
 * window as a freestanding in-guest driver would. It transmits any buffer (also malformed ones)
 * and parses what the device writes into its rx buffers. For tests, host-level demos and the
 * switch benchmark; a real machine uses the device directly.
 * @module
 */
import { InvalidArgumentError, StateError } from '@tsvm/core';
import { DescFlag } from '../virtio/constants.js';
import { VirtioMmio } from '../virtio/mmio.js';
import { ETHERNET_HEADER_SIZE, NET_HEADER_SIZE, parseMac, VirtioNet, type MacAddress } from '../virtio/net.js';
import { RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { VirtioMmioTestDriver, type TestQueue } from '../testing/virtio-driver.js';

/** Options of a {@link NetTestGuest}. */
export interface NetTestGuestOptions {
  /** The card's MAC. */
  readonly mac: MacAddress;
  /** Device name. Default `net-<mac>`. */
  readonly name?: string;
  /** Receive buffers posted. 0 models a guest that never reads. Default 64. */
  readonly rxBuffers?: number;
  /** Bytes per receive buffer, header included. Default 12 + 1514 (what a 1500-MTU driver posts). */
  readonly rxBufferSize?: number;
  /** MTU of the card. Default 1500. */
  readonly mtu?: number;
  /** Frames the device keeps waiting for rx buffers. Default 256. */
  readonly maxBacklog?: number;
}

/** A received frame with its `virtio_net_hdr`. */
export interface ReceivedFrame {
  /** The 12-byte header the device wrote. */
  readonly header: Uint8Array;
  /** The frame. */
  readonly frame: Uint8Array;
}

const TX_BUFFER = NET_HEADER_SIZE + 65535 + ETHERNET_HEADER_SIZE + 64;

/** A driver-side virtio-net endpoint over a real transport and test guest memory. */
export class NetTestGuest {
  /** The device (attach it to a switch). */
  readonly device: VirtioNet;
  /** The transport in front of it. */
  readonly transport: VirtioMmio;
  /** The test driver. @internal */
  readonly driver: VirtioMmioTestDriver;
  readonly #rx: TestQueue;
  readonly #tx: TestQueue;
  readonly #rxAddr: bigint[] = [];
  readonly #rxSize: number;
  readonly #txBuf: bigint;

  /** @param options - MAC, rx buffers, MTU, backlog. */
  constructor(options: NetTestGuestOptions) {
    const memory = testGuestMemory(8 << 20);
    this.device = new VirtioNet({
      mac: options.mac, name: options.name ?? `net-${options.mac}`,
      ...(options.mtu !== undefined ? { mtu: options.mtu } : {}), ...(options.maxBacklog !== undefined ? { maxBacklog: options.maxBacklog } : {}),
    });
    this.transport = new VirtioMmio({ device: this.device, memory, irq: new RecordingIrq() });
    this.driver = new VirtioMmioTestDriver(this.transport, memory);
    this.driver.init();
    this.#rx = this.driver.queue(0);
    this.#tx = this.driver.queue(1);
    this.#rxSize = options.rxBufferSize ?? NET_HEADER_SIZE + 1514;
    const n = Math.min(options.rxBuffers ?? 64, this.#rx.size);
    for (let i = 0; i < n; i++) {
      this.#rxAddr.push(this.driver.alloc(this.#rxSize, 8));
      this.#post(i);
    }
    this.#txBuf = this.driver.alloc(TX_BUFFER, 8);
    if (n > 0) this.#rx.kick();
  }

  /** The card's MAC. */
  get mac(): MacAddress {
    return this.device.mac;
  }

  /** Transmits `frame` behind a zeroed (no offload) header. */
  send(frame: Uint8Array): void {
    const bytes = new Uint8Array(NET_HEADER_SIZE + frame.length);
    bytes.set(frame, NET_HEADER_SIZE);
    this.sendRaw(bytes);
  }

  /** Transmits raw bytes (header included) as one device-readable buffer, for malformed input. */
  sendRaw(bytes: Uint8Array): void {
    if (bytes.length > TX_BUFFER) throw new InvalidArgumentError('bytes', 'longer than the test transmit buffer');
    this.driver.memory.write(this.#txBuf, bytes);
    this.sendDescriptor(this.#txBuf, bytes.length);
  }

  /** Transmits one descriptor of `len` bytes at guest address `addr` (e.g. far longer than any frame). */
  sendDescriptor(addr: bigint, len: number): void {
    this.#tx.writeDesc(0, { addr, len: Math.max(len, 1), flags: 0, next: 0 });
    this.#tx.publish(0);
    this.#tx.kick();
    this.#tx.takeUsed();
  }

  /** Frames the device wrote since the last call, with headers (their buffers are posted again). */
  receiveWithHeaders(): ReceivedFrame[] {
    const out: ReceivedFrame[] = [];
    const used = this.#rx.takeUsed();
    for (const u of used) {
      const addr = this.#rxAddr[u.id];
      if (addr === undefined) throw new StateError(`device returned unknown rx buffer ${u.id}`);
      if (u.len >= NET_HEADER_SIZE) {
        const raw = this.driver.memory.read(addr, u.len);
        out.push({ header: raw.slice(0, NET_HEADER_SIZE), frame: raw.slice(NET_HEADER_SIZE) });
      }
      this.#post(u.id);
    }
    if (used.length) this.#rx.kick();
    return out;
  }

  /** Frames the device wrote since the last call (their buffers are posted again). */
  receive(): Uint8Array[] {
    return this.receiveWithHeaders().map((r) => r.frame);
  }

  #post(i: number): void {
    this.#rx.writeDesc(i, { addr: this.#rxAddr[i] as bigint, len: this.#rxSize, flags: DescFlag.Write, next: 0 });
    this.#rx.publish(i);
  }
}

/** Builds an Ethernet frame: destination, source, EtherType, payload (no FCS: virtio carries none). */
export function ethernetFrame(destination: MacAddress, source: MacAddress, ethertype: number, payload: Uint8Array | string): Uint8Array {
  const body = typeof payload === 'string' ? new TextEncoder().encode(payload) : payload;
  const f = new Uint8Array(ETHERNET_HEADER_SIZE + body.length);
  f.set(parseMac(destination, 'destination'), 0);
  f.set(parseMac(source, 'source'), 6);
  f[12] = (ethertype >> 8) & 0xff;
  f[13] = ethertype & 0xff;
  f.set(body, ETHERNET_HEADER_SIZE);
  return f;
}

/** The broadcast address. */
export const BROADCAST_MAC: MacAddress = 'ff:ff:ff:ff:ff:ff';
