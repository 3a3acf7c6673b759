/**
 * The contract between the virtio-mmio transport and a virtio device model (console, block,
 * rng). The transport owns registers, feature negotiation, queue setup, interrupts and error
 * containment; a device model only answers config-space accesses and turns chains into work.
 * @module
 */
import type { AccessSize, DeviceMemory } from '@tsvm/core';
import type { DescriptorChain } from './virtqueue.js';

/**
 * Handles one chain and returns the number of bytes written into its device-writable part
 * (the used-ring `len`). Throwing a `TsvmError` marks the device DEVICE_NEEDS_RESET.
 */
export type ChainHandler = (chain: DescriptorChain) => number;

/** What the transport offers a device model. */
export interface VirtioContext {
  /**
   * Guest RAM as this device may use it: every access is checked, data is copied (no view of
   * guest RAM), and every write is DMA that passes the machine's DMA gate (write-watch).
   */
  readonly memory: DeviceMemory;
  /** Features the driver accepted (valid once the driver set FEATURES_OK). */
  readonly features: bigint;
  /** Whether the driver has set DRIVER_OK and the device is not broken or reset. */
  readonly active: boolean;
  /**
   * Pops chains from queue `index` while `hasWork()` (default: always) says so, hands each to
   * `handler`, returns them to the used ring, and interrupts the driver if it asked for it.
   * Guest faults are contained here. Does nothing if the queue is not ready or the device is
   * not active. Work is bounded by the transport's budget: what is left is continued later
   * (from `setImmediate`) with the latest `handler`/`hasWork`, so a handler must not assume it
   * runs inside the notify. Returns the number of chains handled now.
   */
  processQueue(index: number, handler: ChainHandler, hasWork?: () => boolean): number;
  /** Announces a change of config space (bumps ConfigGeneration, raises the config interrupt). */
  configChanged(): void;
}

/** A virtio device model plugged into a {@link VirtioContext}. */
export interface VirtioDevice {
  /** Name used for diagnostics and snapshots. */
  readonly name: string;
  /** Virtio device ID (2 block, 3 console, 4 entropy). */
  readonly deviceId: number;
  /** `QueueNumMax` of each queue; the length is the number of queues. */
  readonly queueMaxSizes: readonly number[];
  /** Device-specific feature bits (the transport adds VERSION_1 and the ring features). */
  readonly deviceFeatures: bigint;
  /** Called once by the transport's constructor. */
  attach(context: VirtioContext): void;
  /** Reads device config space (`offset` relative to 0x100). Out-of-range bytes read as 0. */
  readConfig(offset: number, size: AccessSize): number;
  /** Writes device config space. Writes to read-only fields are ignored. */
  writeConfig(offset: number, value: number, size: AccessSize): void;
  /** The driver kicked queue `index` (only delivered while active). */
  notify(index: number): void;
  /** The driver set DRIVER_OK: start work that does not wait for a kick (e.g. pending input). */
  activate?(): void;
  /** Device reset (status written 0): drop in-flight state. */
  reset(): void;
  /** Device-model state as JSON. */
  snapshot(): unknown;
  /** Restores {@link VirtioDevice.snapshot} output; throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void;
  /** Delivers output still buffered (called through the transport when `Machine.run()` stops). */
  flush?(): void;
  /** Releases host resources (files, streams). */
  close?(): void;
}

/** Reads `size` bytes at `offset` of a little-endian config image; bytes past its end read as 0. */
export function readConfigBytes(image: Uint8Array, offset: number, size: AccessSize): number {
  let v = 0;
  for (let i = size - 1; i >= 0; i--) v = v * 256 + (image[offset + i] ?? 0);
  return v;
}
