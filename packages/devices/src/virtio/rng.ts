/**
 * virtio-rng / entropy device (device ID 4): one request queue whose device-writable buffers
 * the device fills with random bytes. The source is injectable for deterministic runs.
 * @module
 */
import { randomFillSync } from 'node:crypto';
import type { AccessSize } from '@tsvm/core';
import { SnapshotReader } from '../snapshot-fields.js';
import { ChainWriter } from './chain-io.js';
import { DeviceId } from './constants.js';
import type { VirtioContext, VirtioDevice } from './device.js';

/** Fills `into` with random bytes. `into` is a host buffer (at most 64 KiB) copied into the guest afterwards. */
export type EntropySource = (into: Uint8Array) => void;

/** The host's CSPRNG (`crypto.randomFillSync`). */
export const hostEntropy: EntropySource = (into) => {
  randomFillSync(into);
};

/** Most bytes handed out per request: a guest asking for more gets less, which the spec allows. */
export const MAX_ENTROPY_PER_REQUEST = 64 * 1024;

/** Options of a {@link VirtioRng}. */
export interface VirtioRngOptions {
  /** Device name. Default `virtio-rng`. */
  readonly name?: string;
  /** Entropy source. Default {@link hostEntropy}. */
  readonly source?: EntropySource;
  /** Queue size. Default 256. */
  readonly queueSize?: number;
}

/**
 * A virtio entropy device. Put it behind a {@link VirtioMmio} transport.
 *
 * @example The host's CSPRNG, or a deterministic source for reproducible tests
 * ```ts
 * import { VirtioMmio, VirtioRng } from '@tsvm/devices';
 *
 * const rng = new VirtioMmio({ device: new VirtioRng(), memory: vm.memory, irq: vm.irqLine(6) });
 * vm.attachDevice(rng.mappings(0xd000_0200n));         // the window after a device at 0xd0000000
 * const fixed = new VirtioRng({ source: (into) => { into.fill(0x42); } });
 * ```
 */
export class VirtioRng implements VirtioDevice {
  /** Device name. */
  readonly name: string;
  /** Virtio device ID. */
  readonly deviceId = DeviceId.Entropy;
  /** One request queue. */
  readonly queueMaxSizes: readonly number[];
  /** No device-specific features. */
  readonly deviceFeatures = 0n;
  readonly #source: EntropySource;
  #ctx: VirtioContext | undefined;

  /** @param options - name, entropy source, queue size. */
  constructor(options: VirtioRngOptions = {}) {
    this.name = options.name ?? 'virtio-rng';
    this.#source = options.source ?? hostEntropy;
    this.queueMaxSizes = [options.queueSize ?? 256];
  }

  /** @internal Called by the transport. */
  attach(context: VirtioContext): void {
    this.#ctx = context;
  }

  /** No config space. */
  readConfig(_offset: number, _size: AccessSize): number {
    return 0;
  }

  /** No config space. */
  writeConfig(): void {}

  /** Fills every available buffer. */
  notify(index: number): void {
    const ctx = this.#ctx;
    if (index !== 0 || ctx === undefined) return;
    ctx.processQueue(0, (chain) => {
      const w = new ChainWriter(ctx.memory, chain.writable);
      return w.stream(Math.min(chain.writableLength, MAX_ENTROPY_PER_REQUEST), (view) => this.#source(view));
    });
  }

  /** Stateless. */
  reset(): void {}

  /** Stateless. */
  snapshot(): unknown {
    return { version: 1 };
  }

  /** Checks the version. */
  restore(state: unknown): void {
    new SnapshotReader(this.name, state, 1);
  }
}
