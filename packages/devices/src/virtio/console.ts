/**
 * virtio-console (device ID 3), single port: queue 0 is receiveq (host → guest), queue 1 is
 * transmitq (guest → host). Offers VIRTIO_CONSOLE_F_EMERG_WRITE so a guest can print through
 * config space before its queues are up. Output is batched like the UART's.
 * @module
 */
import type { AccessSize } from '@tsvm/core';
import { encodeBytes, SnapshotReader } from '../snapshot-fields.js';
import { attachReadable, type ByteReadable, type ByteWritable, OutputBuffer, type OutputBufferOptions, type OutputSink } from '../stream-io.js';
import { ChainReader, ChainWriter } from './chain-io.js';
import { positiveInt } from './budget.js';
import { DeviceId } from './constants.js';
import type { VirtioContext, VirtioDevice } from './device.js';

/** VIRTIO_CONSOLE_F_EMERG_WRITE. */
export const VIRTIO_CONSOLE_F_EMERG_WRITE = 1n << 2n;
const RX = 0;
const TX = 1;
const EMERG_WR_OFFSET = 8;

/** Options of a {@link VirtioConsole}. */
export interface VirtioConsoleOptions {
  /** Device name. Default `virtio-console`. */
  readonly name?: string;
  /** Initial output sink. */
  readonly sink?: OutputSink;
  /** Output batching. */
  readonly output?: OutputBufferOptions;
  /** Queue size offered for each queue. Default 256. */
  readonly queueSize?: number;
  /** Input bytes held until the guest posts receive buffers; beyond it input is dropped. Default 1 MiB. */
  readonly backlogLimit?: number;
  /**
   * Most bytes taken from one transmit chain; the rest of a longer chain is dropped and counted in
   * {@link VirtioConsole.droppedOutput}. Bounds the work of one request (a chain may describe 4 GiB
   * by naming the same guest pages many times). Default 64 KiB (Linux sends at most a page or so).
   */
  readonly maxTransmitBytes?: number;
}

/** A single-port virtio console. Put it behind a {@link VirtioMmio} transport. */
export class VirtioConsole implements VirtioDevice {
  /** Device name. */
  readonly name: string;
  /** Virtio device ID. */
  readonly deviceId = DeviceId.Console;
  /** receiveq and transmitq sizes. */
  readonly queueMaxSizes: readonly number[];
  /** Device features. */
  readonly deviceFeatures = VIRTIO_CONSOLE_F_EMERG_WRITE;
  readonly #out: OutputBuffer;
  readonly #backlogLimit: number;
  readonly #maxTransmit: number;
  #dropped = 0;
  #ctx: VirtioContext | undefined;
  #pending: Uint8Array = new Uint8Array(0);
  #inputs = new Set<{ detach(): void; drained(): void }>();

  /** @param options - name, sink, batching, queue size, backlog. */
  constructor(options: VirtioConsoleOptions = {}) {
    this.name = options.name ?? 'virtio-console';
    const q = options.queueSize ?? 256;
    this.queueMaxSizes = [q, q];
    this.#out = new OutputBuffer(options.output);
    this.#backlogLimit = options.backlogLimit ?? 1 << 20;
    this.#maxTransmit = positiveInt(options.maxTransmitBytes, 64 * 1024, 'maxTransmitBytes');
    if (options.sink !== undefined) this.#out.addSink(options.sink);
  }

  /** Adds an output sink; returns a function that removes it. */
  onOutput(sink: OutputSink): () => void {
    return this.#out.addSink(sink);
  }

  /** Sends guest output to `writable`; returns a function that stops it. */
  pipe(writable: ByteWritable): () => void {
    return this.#out.addSink((b) => {
      writable.write(b);
    });
  }

  /** Hands buffered output to the sinks now. Safe to call at any time. */
  flush(): void {
    this.#out.flush();
  }

  /** Guest output bytes dropped because a transmit chain exceeded `maxTransmitBytes`. */
  get droppedOutput(): number {
    return this.#dropped;
  }

  /** Bytes of input waiting for guest receive buffers. */
  get pendingInput(): number {
    return this.#pending.length;
  }

  /**
   * Queues input for the guest and delivers what fits into posted receive buffers.
   * @returns the number of bytes accepted (the rest exceeded `backlogLimit`).
   */
  receive(bytes: Uint8Array | string): number {
    const data = typeof bytes === 'string' ? new TextEncoder().encode(bytes) : bytes;
    const take = Math.max(0, Math.min(data.length, this.#backlogLimit - this.#pending.length));
    const next = new Uint8Array(this.#pending.length + take);
    next.set(this.#pending);
    next.set(data.subarray(0, take), this.#pending.length);
    this.#pending = next;
    this.#deliver();
    return take;
  }

  /** Feeds a readable stream into the console; returns a detach function. */
  attachInput(readable: ByteReadable): () => void {
    const ctl = attachReadable(readable, (b) => this.receive(b), () => this.#pending.length >= this.#backlogLimit);
    this.#inputs.add(ctl);
    return () => {
      ctl.detach();
      this.#inputs.delete(ctl);
    };
  }

  /** @internal Called by the transport. */
  attach(context: VirtioContext): void {
    this.#ctx = context;
  }

  /** Config space: cols, rows, max_nr_ports read 0 (features not offered); emerg_wr prints a byte. */
  readConfig(_offset: number, _size: AccessSize): number {
    return 0;
  }

  /** A write to `emerg_wr` (offset 8) outputs its low byte. */
  writeConfig(offset: number, value: number, _size: AccessSize): void {
    if (offset === EMERG_WR_OFFSET) this.#out.push(value & 0xff);
  }

  /** Kick: transmitq → output; receiveq → deliver pending input. */
  notify(index: number): void {
    if (index === TX) this.#transmit();
    else if (index === RX) this.#deliver();
  }

  /** DRIVER_OK: deliver input that arrived earlier. */
  activate(): void {
    this.#deliver();
  }

  /** Device reset. Pending host input is kept for the next driver. */
  reset(): void {
    // Nothing in flight: every chain is completed within the kick that made it available.
  }

  /** State as JSON: undelivered input. Output is flushed first. */
  snapshot(): unknown {
    this.flush();
    return { version: 1, pending: encodeBytes(this.#pending) };
  }

  /** Restores {@link VirtioConsole.snapshot} output. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    this.#pending = r.bytes('pending', this.#backlogLimit);
  }

  /** Flushes output and detaches inputs. Idempotent. */
  close(): void {
    for (const ctl of this.#inputs) ctl.detach();
    this.#inputs.clear();
    this.#out.close();
  }

  #transmit(): void {
    const ctx = this.#ctx;
    if (ctx === undefined) return;
    ctx.processQueue(TX, (chain) => {
      // A transmit buffer is device-readable; writable parts are ignored (0 bytes written).
      const n = new ChainReader(ctx.memory, chain.readable).stream(this.#maxTransmit, (bytes) => this.#out.pushBytes(bytes));
      this.#dropped += chain.readableLength - n;
      return 0;
    });
  }

  #deliver(): void {
    const ctx = this.#ctx;
    if (ctx === undefined || this.#pending.length === 0 || !ctx.active) return;
    ctx.processQueue(
      RX,
      (chain) => {
        // subarray, not slice: copying the backlog per chain would let 256 one-byte receive
        // buffers cost 256 copies of a 1 MiB backlog in one kick.
        const n = new ChainWriter(ctx.memory, chain.writable).write(this.#pending);
        this.#pending = this.#pending.subarray(n);
        return n;
      },
      () => this.#pending.length > 0,
    );
    for (const ctl of this.#inputs) ctl.drained();
  }
}
