/**
 * Small stand-ins for the machine side of the device contract, shared by the unit tests and
 * usable by anyone testing a device without a VM.
 * @module
 */
import { type Access, type DeviceStopRequest, gpa, GuestMemory, type IrqLine } from '@tsvm/core';

/** An {@link Access} that records stop requests. */
export interface RecordingAccess extends Access {
  /** Every `requestStop` call, in order. */
  readonly stops: DeviceStopRequest[];
}

/** Makes a {@link RecordingAccess}. */
export function recordingAccess(space: 'pio' | 'mmio' = 'pio', address = 0n): RecordingAccess {
  const stops: DeviceStopRequest[] = [];
  return { address, space, vcpu: 0, stops, requestStop: (r) => void stops.push(r) };
}

/** An {@link IrqLine} that remembers its level and every edge. */
export class RecordingIrq implements IrqLine {
  /** IRQ number. */
  readonly irq: number;
  /** Current level. */
  level = false;
  /** Levels passed to `set`, in order. */
  readonly history: boolean[] = [];
  /** Number of `pulse` calls. */
  pulses = 0;

  /** @param irq - line number. */
  constructor(irq = 5) {
    this.irq = irq;
  }

  /** Records the level. */
  set(level: boolean): void {
    this.level = level;
    this.history.push(level);
  }

  /** Counts the pulse. */
  pulse(): void {
    this.pulses++;
  }
}

/** A `GuestMemory` with one RAM region of `size` bytes at guest-physical 0, backed by an `ArrayBuffer`. */
export function testGuestMemory(size = 1 << 20): GuestMemory {
  const m = new GuestMemory();
  m.addRegion({ slot: 0, start: gpa(0), size, readonly: false, name: 'ram' }, { bytes: new Uint8Array(size), hostAddress: 0n, fd: -1, close() {} });
  return m;
}
