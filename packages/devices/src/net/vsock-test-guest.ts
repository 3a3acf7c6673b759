/**
 * The driver side of a virtio-vsock device without a guest: a {@link VirtioVsock} behind a real
 * {@link VirtioMmio} transport, with queues in a test `GuestMemory` driven through the register
 * window, as a freestanding in-guest driver would. It sends any header (also malformed ones) and
 * parses what the device writes into its rx buffers. For tests and host-level demos; a real
 * machine uses the device directly.
 * @module
 */
import { InvalidArgumentError, StateError } from '@tsvm/core';
import { DescFlag } from '../virtio/constants.js';
import { VirtioMmio } from '../virtio/mmio.js';
import {
  decodeVsockHeader,
  encodeVsockHeader,
  VirtioVsock,
  VSOCK_HEADER_SIZE,
  VSOCK_F_SEQPACKET,
  VSOCK_MAX_PAYLOAD,
  VSOCK_TYPE_STREAM,
  type VsockPacket,
} from '../virtio/vsock.js';
import { RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { VirtioMmioTestDriver, type TestQueue } from '../testing/virtio-driver.js';
import { VsockOp } from '../virtio/vsock.js';
import type { VsockRouter } from './vsock-router.js';

/** Options of a {@link VsockTestGuest}. */
export interface VsockTestGuestOptions {
  /** The guest's CID. */
  readonly cid: number;
  /** Receive buffers posted (each `rxBufferSize` bytes). Default 32. */
  readonly rxBuffers?: number;
  /** Bytes per receive buffer, header included. Default 4096 + 44 (what Linux posts). */
  readonly rxBufferSize?: number;
  /** `buf_alloc` this guest advertises. Default 256 KiB. */
  readonly bufAlloc?: number;
  /** Negotiate VIRTIO_VSOCK_F_SEQPACKET (as a driver that knows it does). Default true. */
  readonly seqpacket?: boolean;
  /** Event-queue buffers posted (4 bytes each, for TRANSPORT_RESET). Default 4. */
  readonly eventBuffers?: number;
}

/** A driver-side vsock endpoint over a real transport and test guest memory. */
export class VsockTestGuest {
  /** The device (attach it to a router). */
  readonly device: VirtioVsock;
  /** The transport in front of it. */
  readonly transport: VirtioMmio;
  /** The test driver (from `@tsvm/devices/testing`). @internal */
  readonly driver: VirtioMmioTestDriver;
  /** The guest's CID. */
  readonly cid: number;
  /** `buf_alloc` sent in every header. */
  bufAlloc: number;
  /** `fwd_cnt` sent in every header: bytes this guest's "application" has consumed. */
  fwdCnt = 0;
  readonly #rx: TestQueue;
  readonly #tx: TestQueue;
  readonly #ev: TestQueue;
  readonly #evAddr: bigint[] = [];
  readonly #rxAddr: bigint[] = [];
  readonly #rxSize: number;
  readonly #txBuf: bigint;

  /** @param options - CID, rx buffers, advertised buffer. */
  constructor(options: VsockTestGuestOptions) {
    this.cid = options.cid;
    this.bufAlloc = options.bufAlloc ?? 256 * 1024;
    const memory = testGuestMemory(8 << 20);
    this.device = new VirtioVsock({ cid: options.cid, name: `vsock-${options.cid}` });
    this.transport = new VirtioMmio({ device: this.device, memory, irq: new RecordingIrq() });
    this.driver = new VirtioMmioTestDriver(this.transport, memory);
    this.driver.init(options.seqpacket === false ? { features: this.driver.deviceFeatures() & ~VSOCK_F_SEQPACKET } : {});
    this.#rx = this.driver.queue(0);
    this.#tx = this.driver.queue(1);
    this.#ev = this.driver.queue(2);
    for (let i = 0; i < Math.min(options.eventBuffers ?? 4, this.#ev.size); i++) {
      this.#evAddr.push(this.driver.alloc(4, 4));
      this.#postEvent(i);
    }
    this.#rxSize = options.rxBufferSize ?? 4096 + VSOCK_HEADER_SIZE;
    const n = Math.min(options.rxBuffers ?? 32, this.#rx.size);
    for (let i = 0; i < n; i++) {
      this.#rxAddr.push(this.driver.alloc(this.#rxSize, 8));
      this.#post(i);
    }
    // One transmit buffer is enough: the device consumes a chain within the kick that publishes it.
    this.#txBuf = this.driver.alloc(VSOCK_HEADER_SIZE + VSOCK_MAX_PAYLOAD + 64, 8);
    this.#rx.kick();
  }

  /** Sends a packet; unspecified fields default to this guest (src CID, stream, credit). */
  send(p: Partial<VsockPacket> & { readonly op: number }): void {
    const full: VsockPacket = {
      srcCid: this.cid, dstCid: 0, srcPort: 0, dstPort: 0, type: VSOCK_TYPE_STREAM, flags: 0,
      bufAlloc: this.bufAlloc, fwdCnt: this.fwdCnt, payload: new Uint8Array(0), ...p,
    };
    const hdr = encodeVsockHeader(full);
    const bytes = new Uint8Array(hdr.length + full.payload.length);
    bytes.set(hdr);
    bytes.set(full.payload, hdr.length);
    this.sendRaw(bytes);
  }

  /** Sends raw bytes as one device-readable buffer (for malformed headers). */
  sendRaw(bytes: Uint8Array): void {
    if (bytes.length > VSOCK_HEADER_SIZE + VSOCK_MAX_PAYLOAD + 64) throw new InvalidArgumentError('bytes', 'longer than the test transmit buffer');
    this.driver.memory.write(this.#txBuf, bytes);
    this.#tx.writeDesc(0, { addr: this.#txBuf, len: Math.max(bytes.length, 1), flags: 0, next: 0 });
    this.#tx.publish(0);
    this.#tx.kick();
    this.#tx.takeUsed();
  }

  /** Packets the device wrote since the last call (their buffers are posted again). */
  receive(): VsockPacket[] {
    const out: VsockPacket[] = [];
    const used = this.#rx.takeUsed();
    for (const u of used) {
      const addr = this.#rxAddr[u.id];
      if (addr === undefined) throw new StateError(`device returned unknown rx buffer ${u.id}`);
      const raw = this.driver.memory.read(addr, u.len);
      const d = decodeVsockHeader(raw);
      if (!d.ok) throw new StateError(`device wrote a bad header: ${d.reason}`);
      if (d.len !== u.len - VSOCK_HEADER_SIZE) throw new StateError(`device wrote len ${d.len} in a ${u.len}-byte buffer`);
      out.push({ ...d.header, payload: raw.slice(VSOCK_HEADER_SIZE) });
      this.#post(u.id);
    }
    if (used.length) this.#rx.kick();
    return out;
  }

  /** Event ids the device wrote since the last call (0 = TRANSPORT_RESET); their buffers are posted again. */
  events(): number[] {
    const out: number[] = [];
    const used = this.#ev.takeUsed();
    for (const u of used) {
      const addr = this.#evAddr[u.id];
      if (addr === undefined) throw new StateError(`device returned unknown event buffer ${u.id}`);
      if (u.len !== 4) throw new StateError(`device wrote ${u.len} bytes of event`);
      out.push(this.driver.memory.readUint(addr, 4));
      this.#postEvent(u.id);
    }
    if (used.length) this.#ev.kick();
    return out;
  }

  #postEvent(i: number): void {
    this.#ev.writeDesc(i, { addr: this.#evAddr[i] as bigint, len: 4, flags: DescFlag.Write, next: 0 });
    this.#ev.publish(i);
  }

  #post(i: number): void {
    this.#rx.writeDesc(i, { addr: this.#rxAddr[i] as bigint, len: this.#rxSize, flags: DescFlag.Write, next: 0 });
    this.#rx.publish(i);
  }
}

/**
 * Two test guests, CIDs 3 (`a`) and 4 (`b`), attached to `router` as `'a'` and `'b'`, with one
 * stream open from 3:1000 to 4:80 (request, response; both taken off the rx queues). `options`
 * applies to both guests. For tests and benches that need a connected pair to start from.
 */
export async function openVsockPair<C>(router: VsockRouter<C>, options: Omit<VsockTestGuestOptions, 'cid'> = {}): Promise<{ a: VsockTestGuest; b: VsockTestGuest }> {
  const a = new VsockTestGuest({ ...options, cid: 3 });
  const b = new VsockTestGuest({ ...options, cid: 4 });
  router.attach(a.device, 'a');
  router.attach(b.device, 'b');
  a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 1000, dstPort: 80 });
  await new Promise((r) => setImmediate(r)); // the router's connection decision may be async
  b.receive();
  b.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
  a.receive();
  return { a, b };
}
