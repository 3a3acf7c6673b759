/**
 * The skeleton virtio-net and virtio-vsock share: a device whose queue 0 carries host → guest
 * items (frames, packets) out of a bounded backlog into the rx buffers the driver posts, and
 * whose queue 1 carries what the guest transmits to an uplink (a switch, a router). The
 * subclasses keep only what differs: how one tx chain is checked and decoded, how one item is
 * written into one rx chain, config space and snapshots.
 * @module
 */
import type { AccessSize } from '@tsvm/core';
import { InvalidArgumentError } from '@tsvm/core';
import { readConfigBytes, type VirtioContext } from './device.js';
import type { DescriptorChain } from './virtqueue.js';
import { BoundedFifo } from './fifo.js';

/** Queue 0: device → driver. */
export const RX_QUEUE = 0;
/** Queue 1: driver → device. */
export const TX_QUEUE = 1;

/**
 * Base of a device with an rx backlog and a tx uplink. `Item` is what waits for the guest,
 * `Uplink` where transmitted items go.
 */
export abstract class BacklogDevice<Item, Uplink> {
  /** The transport's context, once attached. */
  protected ctx: VirtioContext | undefined;
  /** Where transmitted items go. */
  protected uplink: Uplink | undefined;
  /** @internal Items waiting for rx buffers (bounded: beyond the bound `deliverItem` refuses). */
  protected readonly pending: BoundedFifo<Item>;
  /** Config space image (read-only to the guest). */
  protected abstract readonly config: Uint8Array;

  /** @param maxBacklog - most items waiting for rx buffers (a positive integer). */
  protected constructor(maxBacklog: number) {
    if (!Number.isInteger(maxBacklog) || maxBacklog < 1) throw new InvalidArgumentError('maxBacklog', 'must be a positive integer');
    this.pending = new BoundedFifo(maxBacklog);
  }

  /** Connects the device to its uplink (or disconnects it with `undefined`). */
  setUplink(uplink: Uplink | undefined): void {
    this.uplink = uplink;
  }

  /** Items waiting for rx buffers. */
  get backlog(): number {
    return this.pending.size;
  }

  /** Whether the driver has set DRIVER_OK and the device works. */
  get active(): boolean {
    return this.ctx?.active ?? false;
  }

  /** @internal Called by the transport. */
  attach(context: VirtioContext): void {
    this.ctx = context;
  }

  /** Config space. Read-only. */
  readConfig(offset: number, size: AccessSize): number {
    return readConfigBytes(this.config, offset, size);
  }

  /** Config space is read-only: the host sets it. */
  writeConfig(_offset: number, _value: number, _size: AccessSize): void {}

  /** Kick: tx → uplink; rx → deliver the backlog; other queues → `notifyOther`. */
  notify(index: number): void {
    if (index === TX_QUEUE) this.#transmit();
    else if (index === RX_QUEUE) this.fill();
    else this.notifyOther(index);
  }

  /** DRIVER_OK: deliver what waited. */
  activate(): void {
    this.fill();
  }

  /**
   * Queues `item` for the guest and writes what fits into posted rx buffers.
   * @returns false if the backlog was full and the item was dropped (`overflowed` counted it).
   */
  protected deliverItem(item: Item): boolean {
    if (!this.pending.push(item)) {
      this.overflowed();
      return false;
    }
    this.fill();
    return true;
  }

  /** Writes backlog items into posted rx buffers, one chain each, while both last. */
  protected fill(): void {
    const ctx = this.ctx;
    if (ctx === undefined || !ctx.active || this.pending.size === 0) return;
    ctx.processQueue(RX_QUEUE, (chain) => this.fillChain(ctx, chain), () => this.pending.size > 0);
  }

  #transmit(): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    ctx.processQueue(TX_QUEUE, (chain) => {
      this.transmitChain(ctx, chain);
      return 0;
    });
  }

  /** A queue other than rx and tx was kicked (vsock's event queue). Default: nothing. */
  protected notifyOther(_index: number): void {}

  /** Counts an item refused because the backlog was full. */
  protected abstract overflowed(): void;

  /** Checks and decodes one tx chain, handing what is well-formed to the uplink. */
  protected abstract transmitChain(ctx: VirtioContext, chain: DescriptorChain): void;

  /** Writes the head of the backlog (or part of it) into one rx chain; returns bytes written. */
  protected abstract fillChain(ctx: VirtioContext, chain: DescriptorChain): number;
}
