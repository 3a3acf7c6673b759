/**
 * Explicitly unpopulated port ranges: what a real PC's ISA bus does where no card answers
 * (reads float to all ones, writes go nowhere). tsvm denies unregistered ports by default, so
 * a guest that *probes* for hardware — Linux looks for COM2–4, a parallel port, VGA, PCI
 * configuration mechanism #1 — would stop at its first probe. Attaching an
 * {@link Unpopulated} range says, deliberately and per range, "nothing here": the guest sees
 * absent hardware, the monitor still sees (and may mediate) every access, and every access is
 * counted so a user can tell what the guest looked for.
 * @module
 */
import { type AccessSize, type Device, InvalidArgumentError } from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';

/** A named port range with nothing behind it. */
export interface UnpopulatedRange {
  /** First port. */
  readonly port: number;
  /** Number of ports. */
  readonly size: number;
  /** What would live here on a PC, for diagnostics (e.g. `COM2`). */
  readonly name: string;
}

/**
 * The ranges a Linux kernel probes on a PC that tsvm's PC devices do not cover: serial ports
 * 2–4, the parallel ports, the VGA/MDA registers, the floppy and second IDE channel, PCI
 * configuration mechanism #1 (all ones = no host bridge), the POST diagnostic port 0x80
 * (Linux's `io_delay`), and the 8237 DMA controllers. The in-kernel irqchip/PIT own 0x20,
 * 0x40–0x43, 0x61 and 0xa0 under KVM, so they are not listed.
 */
export const PC_PROBED_RANGES: readonly UnpopulatedRange[] = [
  { port: 0x00, size: 0x10, name: 'DMA1' },
  { port: 0x80, size: 0x10, name: 'POST/DMA page registers' },
  { port: 0xc0, size: 0x20, name: 'DMA2' },
  { port: 0x1f0, size: 0x8, name: 'IDE0' },
  { port: 0x170, size: 0x8, name: 'IDE1' },
  { port: 0x3f6, size: 0x1, name: 'IDE0 control' },
  { port: 0x376, size: 0x1, name: 'IDE1 control' },
  { port: 0x2f8, size: 0x8, name: 'COM2' },
  { port: 0x3e8, size: 0x8, name: 'COM3' },
  { port: 0x2e8, size: 0x8, name: 'COM4' },
  { port: 0x378, size: 0x8, name: 'LPT1' },
  { port: 0x278, size: 0x8, name: 'LPT2' },
  { port: 0x3bc, size: 0x4, name: 'LPT (MDA)' },
  { port: 0x3b0, size: 0xc, name: 'MDA' },
  { port: 0x3c0, size: 0x20, name: 'VGA' },
  { port: 0x3f0, size: 0x6, name: 'floppy' },
  { port: 0x3f7, size: 0x1, name: 'floppy DIR' },
  { port: 0xcf8, size: 0x8, name: 'PCI config (mechanism #1)' },
];

/** An unpopulated range: reads return all ones, writes are dropped, both are counted. */
export class Unpopulated implements Device {
  /** Device name: `unpopulated:<range name>`. */
  readonly name: string;
  /** The range. */
  readonly range: UnpopulatedRange;
  /** Guest reads so far. */
  reads = 0;
  /** Guest writes so far. */
  writes = 0;

  /** @param range - the ports, and what would be there on a PC. */
  constructor(range: UnpopulatedRange) {
    if (!range || typeof range !== 'object') throw new InvalidArgumentError('range', 'must be an object');
    if (!Number.isInteger(range.port) || range.port < 0 || range.port > 0xffff) throw new InvalidArgumentError('range.port', `must be 0..0xffff, got ${String(range.port)}`);
    if (!Number.isInteger(range.size) || range.size <= 0 || range.port + range.size > 0x10000) throw new InvalidArgumentError('range.size', `must be positive and end by 0x10000, got ${String(range.size)}`);
    if (typeof range.name !== 'string' || range.name === '') throw new InvalidArgumentError('range.name', 'must be a non-empty string');
    this.range = { ...range };
    this.name = `unpopulated:${range.name}`;
  }

  /** One unpopulated device per range (e.g. {@link PC_PROBED_RANGES}), ready for `attachDevice`. */
  static ranges(ranges: readonly UnpopulatedRange[] = PC_PROBED_RANGES): Unpopulated[] {
    return ranges.map((r) => new Unpopulated(r));
  }

  /** The mapping of this range. */
  mappings(): DeviceMapping[] {
    return [{ range: { port: this.range.port, size: this.range.size }, device: this }];
  }

  /** All ones: the floating bus. */
  read(_offset: number, size: AccessSize): number {
    this.reads++;
    return size === 4 ? 0xffffffff : (1 << (size * 8)) - 1;
  }

  /** Dropped. */
  write(): void {
    this.writes++;
  }

  /** Zeroes the counters. */
  reset(): void {
    this.reads = 0;
    this.writes = 0;
  }
}
