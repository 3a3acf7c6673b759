/**
 * An i8042 keyboard controller with **no keyboard and no mouse attached**: a guest can probe it,
 * learn quickly and correctly that nothing is plugged in, and reset the machine the PC way
 * (command 0xFE, "pulse the reset line").
 *
 * What a real controller does, and this one too: controller commands answer through the
 * output buffer (config byte, self-test 0x55, interface tests 0x00, AUX loop-back); a byte
 * sent to a port with no device behind it comes back as 0xFE with the *timeout* status bit,
 * raising IRQ 1 (keyboard) or IRQ 12 (aux) when the config byte enables it. Linux therefore
 * gets a NAK at once instead of polling for seconds with interrupts off.
 *
 * Its two ports, 0x60 (data) and 0x64 (status/command), are not contiguous and the ports in
 * between belong to others (0x61 is the PC speaker / NMI status port). So the controller is one
 * {@link Device} with offset mapping — offset 0 is the data port, offset 4 the status/command
 * port — and {@link I8042.mappings} returns two one-port views that forward to it. Register the
 * views on the bus; snapshot and reset the controller itself.
 * @module
 */
import type { Access, AccessSize, Device, IrqLine } from '@tsvm/core';
import { InvalidArgumentError, SnapshotFormatError } from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';
import { SnapshotReader } from './snapshot-fields.js';

const STATUS_OUTPUT_FULL = 0x01;
const STATUS_SYSTEM_FLAG = 0x04; // POST passed
const STATUS_COMMAND = 0x08; // last write was to 0x64
const STATUS_UNLOCKED = 0x10; // keyboard not inhibited by the keylock (Linux warns when clear)
const STATUS_AUX_DATA = 0x20; // the output byte came from the aux port
const STATUS_TIMEOUT = 0x40; // the last byte sent to a device got no answer

const CONFIG_KBD_INT = 0x01;
const CONFIG_AUX_INT = 0x02;
const CONFIG_SYSTEM_FLAG = 0x04;
const CONFIG_KBD_DISABLED = 0x10;
const CONFIG_AUX_DISABLED = 0x20;
const CONFIG_XLATE = 0x40;
/** What firmware leaves in the config byte: both ports disabled, translation on, POST passed. */
const CONFIG_POWER_ON = CONFIG_XLATE | CONFIG_AUX_DISABLED | CONFIG_KBD_DISABLED | CONFIG_SYSTEM_FLAG;

const NO_DEVICE = 0xfe;
const QUEUE_LIMIT = 16;

/** What the next data-port write means: a byte for the keyboard, or the operand of a command. */
export type I8042Operand = 'none' | 'config' | 'kbd-out' | 'aux-out' | 'aux-write';
type Operand = I8042Operand;
const OPERANDS: readonly Operand[] = ['none', 'config', 'kbd-out', 'aux-out', 'aux-write'];

/** Options of an {@link I8042}. */
export interface I8042Options {
  /** Device name. Default `i8042`. */
  readonly name?: string;
  /** IRQ 1: raised while keyboard-port data waits and the config byte enables it. */
  readonly kbdIrq?: IrqLine;
  /** IRQ 12: the same for the aux (mouse) port. */
  readonly auxIrq?: IrqLine;
}

/** Guest-visible state of an {@link I8042}. */
export interface I8042State {
  /** Format version. */
  readonly version: 2;
  /** Controller configuration byte. */
  readonly config: number;
  /** Output buffer, oldest first: byte and whether it came from the aux port. */
  readonly output: ReadonlyArray<{ readonly byte: number; readonly aux: boolean }>;
  /** Status timeout bit. */
  readonly timeout: boolean;
  /** Whether the last write went to the command port. */
  readonly lastWasCommand: boolean;
  /** Meaning of the next data-port write. */
  readonly operand: I8042Operand;
}

/** The i8042 controller (see the module documentation). */
export class I8042 implements Device {
  /** Data port. */
  static readonly dataPort = 0x60;
  /** Status (read) / command (write) port. */
  static readonly commandPort = 0x64;
  /** Keyboard IRQ. */
  static readonly kbdIrq = 1;
  /** Aux (mouse) IRQ. */
  static readonly auxIrq = 12;

  /** Device name. */
  readonly name: string;
  readonly #kbdIrq: IrqLine | undefined;
  readonly #auxIrq: IrqLine | undefined;
  #config = CONFIG_POWER_ON;
  #output: Array<{ byte: number; aux: boolean }> = [];
  #timeout = false;
  #lastWasCommand = false;
  #operand: Operand = 'none';

  /** @param options - name and interrupt lines (a string is taken as the name, for compatibility). */
  constructor(options: I8042Options | string = {}) {
    const o = typeof options === 'string' ? { name: options } : options;
    if (!o || typeof o !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    this.name = o.name ?? 'i8042';
    this.#kbdIrq = o.kbdIrq;
    this.#auxIrq = o.auxIrq;
  }

  /** Two one-port views: 0x60 → offset 0 and 0x64 → offset 4 of this controller. */
  mappings(): DeviceMapping[] {
    return [
      { range: { port: I8042.dataPort, size: 1 }, device: this.#view('data', 0) },
      { range: { port: I8042.commandPort, size: 1 }, device: this.#view('command', 4) },
    ];
  }

  /** Offset 0: data (the oldest output byte, else 0). Offset 4: status. */
  read(offset: number, _size: AccessSize, _access?: Access): number {
    if (offset === 0) {
      const head = this.#output.shift();
      this.#updateIrqs();
      return head?.byte ?? 0;
    }
    if (offset === 4) {
      const head = this.#output[0];
      return (head ? STATUS_OUTPUT_FULL | (head.aux ? STATUS_AUX_DATA : 0) : 0)
        | (this.#config & CONFIG_SYSTEM_FLAG ? STATUS_SYSTEM_FLAG : 0) | STATUS_UNLOCKED
        | (this.#lastWasCommand ? STATUS_COMMAND : 0) | (this.#timeout ? STATUS_TIMEOUT : 0);
    }
    return 0xff;
  }

  /** Offset 4: controller commands. Offset 0: a command's operand, else a byte for the keyboard. */
  write(offset: number, value: number, _size: AccessSize, access: Access): void {
    const v = value & 0xff;
    if (offset === 0) {
      this.#lastWasCommand = false;
      const op = this.#operand;
      this.#operand = 'none';
      switch (op) {
        case 'config': this.#config = v; this.#updateIrqs(); return;
        case 'kbd-out': this.#push(v, false, false); return;
        case 'aux-out': this.#push(v, true, false); return;
        case 'aux-write': this.#push(NO_DEVICE, true, true); return; // no mouse
        default: this.#push(NO_DEVICE, false, true); return; // no keyboard
      }
    }
    if (offset !== 4) return;
    this.#lastWasCommand = true;
    this.#operand = 'none';
    switch (v) {
      case 0x20: this.#push(this.#config, false, false); break; // read config byte
      case 0x60: this.#operand = 'config'; break;
      case 0xa7: this.#config |= CONFIG_AUX_DISABLED; break;
      case 0xa8: this.#config &= ~CONFIG_AUX_DISABLED; break;
      case 0xa9: this.#push(0x00, false, false); break; // aux interface test: lines OK
      case 0xaa: this.#config |= CONFIG_SYSTEM_FLAG; this.#push(0x55, false, false); break; // self-test passed
      case 0xab: this.#push(0x00, false, false); break; // keyboard interface test: lines OK
      case 0xad: this.#config |= CONFIG_KBD_DISABLED; break;
      case 0xae: this.#config &= ~CONFIG_KBD_DISABLED; break;
      case 0xd2: this.#operand = 'kbd-out'; break;
      case 0xd3: this.#operand = 'aux-out'; break;
      case 0xd4: this.#operand = 'aux-write'; break;
      default:
        // 0xF0–0xFF pulse output lines for ~6 µs; bit 0 clear pulses the CPU reset line.
        if (v >= 0xf0 && (v & 1) === 0) access.requestStop({ reason: 'reset' });
        break;
    }
  }

  /** Power-on state. */
  reset(): void {
    this.#config = CONFIG_POWER_ON;
    this.#output = [];
    this.#timeout = false;
    this.#lastWasCommand = false;
    this.#operand = 'none';
    this.#updateIrqs();
  }

  /** State as JSON. */
  snapshot(): I8042State {
    return { version: 2, config: this.#config, output: this.#output.map((o) => ({ ...o })), timeout: this.#timeout, lastWasCommand: this.#lastWasCommand, operand: this.#operand };
  }

  /** Restores {@link I8042.snapshot} output; throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 2);
    const config = r.int('config', 0, 0xff);
    const raw = r.raw('output');
    if (!Array.isArray(raw) || raw.length > QUEUE_LIMIT) throw new SnapshotFormatError(`${this.name}: field 'output' must be an array of at most ${QUEUE_LIMIT} entries`);
    const output = raw.map((e: unknown, i) => {
      const x = new SnapshotReader(`${this.name}.output[${i}]`, e);
      return { byte: x.int('byte', 0, 0xff), aux: x.bool('aux') };
    });
    const operand = r.raw('operand');
    if (!OPERANDS.includes(operand as Operand)) throw new SnapshotFormatError(`${this.name}: field 'operand' must be one of ${OPERANDS.join(', ')}`);
    const next = { timeout: r.bool('timeout'), last: r.bool('lastWasCommand') };
    this.#config = config;
    this.#output = output;
    this.#timeout = next.timeout;
    this.#lastWasCommand = next.last;
    this.#operand = operand as Operand;
    this.#updateIrqs();
  }

  #push(byte: number, aux: boolean, timeout: boolean): void {
    this.#timeout = timeout;
    if (this.#output.length < QUEUE_LIMIT) this.#output.push({ byte, aux });
    this.#updateIrqs();
  }

  /** Level-driven lines: high while the head of the output buffer is theirs and enabled. */
  #updateIrqs(): void {
    const head = this.#output[0];
    this.#kbdIrq?.set(head !== undefined && !head.aux && (this.#config & CONFIG_KBD_INT) !== 0);
    this.#auxIrq?.set(head !== undefined && head.aux && (this.#config & CONFIG_AUX_INT) !== 0);
  }

  #view(port: string, base: number): Device {
    return {
      name: `${this.name}.${port}`,
      read: (offset, size, access) => this.read(base + offset, size, access),
      write: (offset, value, size, access) => this.write(base + offset, value, size, access),
    };
  }
}
