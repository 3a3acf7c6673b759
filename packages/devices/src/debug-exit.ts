/**
 * QEMU's `isa-debug-exit`: a write of `v` to the port ends the run with exit code
 * `(v << 1) | 1`, so a guest test can report success or failure without a shutdown path.
 * The code is always odd, which is how a caller tells a debug-exit from a normal 0 exit.
 * @module
 */
import { type Access, type AccessSize, type Device, InvalidArgumentError } from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';

/** Options of a {@link DebugExit}. */
export interface DebugExitOptions {
  /** Device name. Default `debug-exit`. */
  readonly name?: string;
  /** Port width in bytes, as QEMU's `iosize` property. Default 1. */
  readonly size?: AccessSize;
}

/**
 * The debug-exit port. Reads return all ones (no register behind them), as in QEMU.
 *
 * @example A guest ends its run with a status
 * Writing `v` stops the run with `code: (v << 1) | 1`, as QEMU's `isa-debug-exit`.
 * ```ts
 * import { DebugExit } from '@tsvm/devices';
 *
 * vm.attachDevice(new DebugExit());                    // port 0xf4 (DebugExit.defaultPort), 1 byte wide
 * vm.loadFlat(await asm('mov dx, 0xf4; mov al, 7; out dx, al'), { at: 0x1000, mode: 'long', ring: 3 });
 * const stop = await vm.run({ timeout: 1000 });        // { reason: 'debug-exit', code: 15, ... }
 * ```
 */
export class DebugExit implements Device {
  /** QEMU's default `iobase`. */
  static readonly defaultPort = 0xf4;

  /** Device name. */
  readonly name: string;
  /** Port width in bytes. */
  readonly size: AccessSize;

  /** @param options - name and port width. */
  constructor(options: DebugExitOptions = {}) {
    this.name = options.name ?? 'debug-exit';
    const size = options.size ?? 1;
    if (size !== 1 && size !== 2 && size !== 4) {
      throw new InvalidArgumentError('size', `must be 1, 2 or 4, got ${String(size)}`);
    }
    this.size = size;
  }

  /** The mapping at `base` (default 0xf4), `size` ports wide. */
  mappings(base: number = DebugExit.defaultPort): DeviceMapping[] {
    return [{ range: { port: base, size: this.size }, device: this }];
  }

  /** Reads return all ones. */
  read(_offset: number, size: AccessSize): number {
    return size === 4 ? 0xffffffff : (1 << (size * 8)) - 1;
  }

  /**
   * Requests a `debug-exit` stop with code `(v << 1) | 1`. The value is the bytes written,
   * truncated to the port width; the code is computed in 32-bit unsigned arithmetic (for a
   * 4-byte port, bit 31 of `v` is lost, as with QEMU's `int` exit status).
   */
  write(_offset: number, value: number, size: AccessSize, access: Access): void {
    const width = Math.min(size, this.size);
    const v = width === 4 ? value >>> 0 : value & ((1 << (width * 8)) - 1);
    access.requestStop({ reason: 'debug-exit', code: ((v << 1) | 1) >>> 0 });
  }
}
