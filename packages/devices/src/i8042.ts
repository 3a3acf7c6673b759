/**
 * A minimal i8042 keyboard controller: enough for a guest to probe it and to reset the machine
 * the PC way (command 0xFE, "pulse the reset line"). No keyboard or mouse is attached.
 *
 * Its two ports, 0x60 (data) and 0x64 (status/command), are not contiguous and the ports in
 * between belong to others (0x61 is the PC speaker / NMI status port). So the controller is one
 * {@link Device} with offset mapping — offset 0 is the data port, offset 4 the status/command
 * port — and {@link I8042.mappings} returns two one-port views that forward to it. Register the
 * views on the bus; snapshot and reset the controller itself.
 * @module
 */
import type { Access, AccessSize, Device } from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';
import { SnapshotReader } from './snapshot-fields.js';

const STATUS_SYSTEM_FLAG = 0x04; // POST passed
const STATUS_COMMAND = 0x08; // last write was to 0x64
const STATUS_UNLOCKED = 0x10; // keyboard not inhibited by the keylock (Linux warns when clear)
const STATUS_OUTPUT_FULL = 0x01;
const CMD_READ_CONFIG = 0x20;
const CMD_WRITE_CONFIG = 0x60;
const CMD_SELF_TEST = 0xaa;
const CMD_PULSE_RESET = 0xfe;

/** Guest-visible state of an {@link I8042}. */
export interface I8042State {
  /** Format version. */
  readonly version: 1;
  /** Controller configuration byte. */
  readonly config: number;
  /** Byte waiting in the output buffer, or -1. */
  readonly output: number;
  /** Whether the last write went to the command port. */
  readonly lastWasCommand: boolean;
  /** Whether the next data-port write is the operand of "write config". */
  readonly expectConfig: boolean;
}

/** Minimal i8042: status reads, config byte, self-test, and reset via 0xFE. */
export class I8042 implements Device {
  /** Data port. */
  static readonly dataPort = 0x60;
  /** Status (read) / command (write) port. */
  static readonly commandPort = 0x64;

  /** Device name. */
  readonly name: string;
  #config = 0x00;
  #output = -1;
  #lastWasCommand = false;
  #expectConfig = false;

  /** @param name - device name, default `i8042`. */
  constructor(name = 'i8042') {
    this.name = name;
  }

  /** Two one-port views: 0x60 → offset 0 and 0x64 → offset 4 of this controller. */
  mappings(): DeviceMapping[] {
    return [
      { space: 'pio', base: BigInt(I8042.dataPort), size: 1, device: this.#view('data', 0) },
      { space: 'pio', base: BigInt(I8042.commandPort), size: 1, device: this.#view('command', 4) },
    ];
  }

  /** Offset 0: data (the pending output byte, else 0). Offset 4: status. Others: 0xff. */
  read(offset: number, _size: AccessSize, _access?: Access): number {
    if (offset === 0) {
      const v = this.#output < 0 ? 0 : this.#output;
      this.#output = -1;
      return v;
    }
    if (offset === 4) {
      return STATUS_SYSTEM_FLAG | STATUS_UNLOCKED | (this.#lastWasCommand ? STATUS_COMMAND : 0) | (this.#output >= 0 ? STATUS_OUTPUT_FULL : 0);
    }
    return 0xff;
  }

  /** Offset 4: commands (0xFE requests a reset stop). Offset 0: operand of 0x60, else ignored. */
  write(offset: number, value: number, _size: AccessSize, access: Access): void {
    const v = value & 0xff;
    if (offset === 0) {
      this.#lastWasCommand = false;
      if (this.#expectConfig) this.#config = v;
      this.#expectConfig = false;
      return;
    }
    if (offset !== 4) return;
    this.#lastWasCommand = true;
    this.#expectConfig = false;
    switch (v) {
      case CMD_READ_CONFIG:
        this.#output = this.#config;
        break;
      case CMD_WRITE_CONFIG:
        this.#expectConfig = true;
        break;
      case CMD_SELF_TEST:
        this.#output = 0x55;
        break;
      case CMD_PULSE_RESET:
        access.requestStop({ reason: 'reset' });
        break;
      default:
        break; // keyboard/mouse port commands: there is nothing behind the ports
    }
  }

  /** Power-on state. */
  reset(): void {
    this.#config = 0;
    this.#output = -1;
    this.#lastWasCommand = false;
    this.#expectConfig = false;
  }

  /** State as JSON. */
  snapshot(): I8042State {
    return { version: 1, config: this.#config, output: this.#output, lastWasCommand: this.#lastWasCommand, expectConfig: this.#expectConfig };
  }

  /** Restores {@link I8042.snapshot} output; throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    const next = { config: r.int('config', 0, 0xff), output: r.int('output', -1, 0xff), last: r.bool('lastWasCommand'), expect: r.bool('expectConfig') };
    this.#config = next.config;
    this.#output = next.output;
    this.#lastWasCommand = next.last;
    this.#expectConfig = next.expect;
  }

  #view(port: string, base: number): Device {
    return {
      name: `${this.name}.${port}`,
      read: (offset, size, access) => this.read(base + offset, size, access),
      write: (offset, value, size, access) => this.write(base + offset, value, size, access),
    };
  }
}
