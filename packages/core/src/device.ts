/**
 * The device contract. A device is a register file (the rust-vmm `vm-superio` habit):
 * `read(offset, size)` / `write(offset, value, size)`, with side effects going through
 * injected interfaces (an {@link IrqLine}, a sink, {@link GuestMemory}), so it can be tested
 * without a VM. Port I/O and MMIO devices share the signature.
 * @module
 */
import type { RangeSpec } from './bus.js';

/** Width of one device access in bytes. 8-byte MMIO accesses are split into two 4-byte ones. */
export type AccessSize = 1 | 2 | 4;

/** Why a device asks the run loop to stop (e.g. the debug-exit port, the i8042 reset line, ACPI sleep states). */
export type DeviceStopRequest =
  | { readonly reason: 'debug-exit'; readonly code: number }
  | { readonly reason: 'reset' }
  | { readonly reason: 'shutdown' }
  | { readonly reason: 'poweroff' }
  | { readonly reason: 'suspend'; readonly wakingVector: bigint }
  | { readonly reason: 'exception'; readonly vector: number }
  | { readonly reason: 'device-error'; readonly device: string; readonly message: string };

/** Context of one access, given to every device handler. */
export interface Access {
  /** Absolute port number or guest-physical address of the access. */
  readonly address: bigint;
  /** `'pio'` or `'mmio'`. */
  readonly space: 'pio' | 'mmio';
  /** Index of the vCPU that made the access. */
  readonly vcpu: number;
  /** Asks the run loop to stop after this access with the given reason. */
  requestStop(request: DeviceStopRequest): void;
}

/**
 * A register-file device mapped on a {@link Bus}.
 *
 * A device whose handler hands work to *another* machine (a message, a frame) calls
 * `yieldSlice()` from `@tsvm/core` there, so the receiver's run loop gets its turn now rather than
 * when the running machine's slice expires.
 */
export interface Device {
  /** Short name used in diagnostics and snapshots, e.g. `uart0`. */
  readonly name: string;
  /**
   * Guest reads `size` bytes at `offset` from the start of the device's range. Return the value
   * (truncated to `size`). A device without `read` leaves reads unhandled (deny by default).
   */
  read?(offset: number, size: AccessSize, access: Access): number;
  /** Guest writes `value` (`size` bytes) at `offset`. Without `write`, writes are unhandled. */
  write?(offset: number, value: number, size: AccessSize, access: Access): void;
  /** Returns the device to its power-on state. */
  reset?(): void;
  /** JSON-serialisable state for snapshots. */
  snapshot?(): unknown;
  /** Restores state produced by `snapshot()`; throws `SnapshotFormatError` on a bad shape. */
  restore?(state: unknown): void;
  /**
   * Delivers output the device still buffers (a UART batches bytes until a newline or the next
   * turn of the event loop). `Machine.run()` calls it before it returns, so everything the guest
   * printed before the stop has been delivered when the stop is.
   */
  flush?(): void;
  /** Releases host resources (streams, files). */
  close?(): void | Promise<void>;
}

/** An interrupt line wired to the machine's interrupt controller. */
export interface IrqLine {
  /** The GSI/IRQ number. */
  readonly irq: number;
  /** Drives the line level (level-triggered devices). */
  set(level: boolean): void;
  /** Raises then lowers the line (edge-triggered devices). */
  pulse(): void;
}

/**
 * Where a device wants to be mapped: devices list these from `mappings()`. The range has the
 * one shape every registration uses (`{ port, size }` for port I/O, `{ address, size }` for
 * MMIO), so a mapping is exactly what `Machine.attach` takes.
 */
export interface DeviceMapping {
  /** The range: `{ port, size }` (PIO) or `{ address, size }` (MMIO). */
  readonly range: RangeSpec;
  /** The register file dispatched to; offsets are relative to the range's start. */
  readonly device: Device;
}
