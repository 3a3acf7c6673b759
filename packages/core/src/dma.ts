/**
 * Device DMA: writes into guest RAM that the host makes on a device's behalf (a virtio device
 * filling a receive buffer, updating a used ring). They are guest-visible stores the vCPU never
 * executed, so no exit and no dirty log sees them; to keep mediation complete they pass through
 * one hook point, the {@link DmaGate} of the machine's {@link GuestMemory}, before touching RAM.
 *
 * Devices never receive `GuestMemory` itself but a {@link DeviceMemory}: a device-scoped
 * accessor that copies in and out (no view of guest RAM escapes) and routes every write through
 * the gate. A monitor registers a {@link DmaHook} on the gate; a deny leaves RAM untouched and
 * throws {@link DmaDeniedError} at the device, which turns it into a guest-visible error.
 *
 * Hooks are synchronous: DMA happens inside a device call, which cannot wait.
 * @module
 */
import { TsvmError } from '@tsvm/kvm-backend';
import { InvalidArgumentError } from './errors.js';
import type { GuestMemory } from './memory.js';

/** One host write into guest RAM on a device's behalf, as hooks see it. */
export interface DmaWrite {
  /** Name of the device that writes. */
  readonly device: string;
  /** First guest-physical address written. */
  readonly address: bigint;
  /** Number of bytes written (never 0). */
  readonly length: number;
  /** The bytes about to be written: a host buffer, not guest RAM. Hooks must not modify it. */
  readonly data: Uint8Array;
}

/** What a mediating {@link DmaHook} decides. `undefined` means allow. */
export type DmaDecision =
  | { readonly verdict: 'allow' }
  /** The write does not happen; the device gets a {@link DmaDeniedError}. */
  | { readonly verdict: 'deny'; readonly reason?: string }
  /** The write happens with these bytes instead (same length as the original). */
  | { readonly verdict: 'replace'; readonly data: Uint8Array };

/** A party that mediates and/or observes device DMA writes (e.g. a monitor's write-watch). */
export interface DmaHook {
  /** Name used in deny errors. */
  readonly name: string;
  /** Decides before the write; the first non-allow decision of all hooks wins. */
  mediate?(write: DmaWrite): DmaDecision | undefined;
  /** Told after the write reached RAM, with the bytes actually written. */
  observe?(write: DmaWrite): void;
}

/** A DMA write was denied by a hook. RAM is untouched. Devices treat it as a guest-visible I/O error. */
export class DmaDeniedError extends TsvmError {
  /** Device that attempted the write. */
  readonly device: string;
  /** First guest-physical address of the write. */
  readonly address: bigint;
  /** Its length in bytes. */
  readonly length: number;
  /** The hook that denied it. */
  readonly hook: string;

  /**
   * @param write - the denied write.
   * @param hook - name of the denying hook.
   * @param reason - the hook's reason, if any.
   */
  constructor(write: Pick<DmaWrite, 'device' | 'address' | 'length'>, hook: string, reason?: string) {
    super('TSVM_DMA_DENIED', `${write.device}: DMA write [0x${write.address.toString(16)}, +${write.length}) denied by '${hook}'${reason ? `: ${reason}` : ''}`);
    this.device = write.device;
    this.address = write.address;
    this.length = write.length;
    this.hook = hook;
  }
}

const gates = new WeakMap<GuestMemory, DmaGate>();

/**
 * The DMA hook point of one guest memory (one per machine). Obtain it with {@link DmaGate.of};
 * it exists as long as the memory does, so devices and the monitor find the same one without
 * knowing about each other.
 */
export class DmaGate {
  readonly #hooks: DmaHook[] = [];

  private constructor() {}

  /** The gate of `memory`, created on first use. */
  static of(memory: GuestMemory): DmaGate {
    let g = gates.get(memory);
    if (g === undefined) {
      g = new DmaGate();
      gates.set(memory, g);
    }
    return g;
  }

  /** Registers a hook (after those already there); returns a function that removes it. */
  add(hook: DmaHook): () => void {
    if (!hook || typeof hook.name !== 'string' || (hook.mediate === undefined && hook.observe === undefined)) {
      throw new InvalidArgumentError('hook', 'must have a name and a mediate and/or observe function');
    }
    this.#hooks.push(hook);
    return () => {
      const i = this.#hooks.indexOf(hook);
      if (i >= 0) this.#hooks.splice(i, 1);
    };
  }

  /** Whether any hook is registered (writes skip the gate's bookkeeping otherwise). */
  get active(): boolean {
    return this.#hooks.length > 0;
  }

  /**
   * Mediates, performs and reports one write. The range is checked against guest RAM first, so
   * hooks only ever see writes that can happen. Throws {@link DmaDeniedError} on a deny and
   * `GuestMemoryError` for a range outside RAM; a hook that throws is a host bug and propagates.
   */
  write(memory: GuestMemory, device: string, address: bigint, data: Uint8Array): void {
    if (data.length === 0) return;
    if (!this.active) {
      memory.write(address, data);
      return;
    }
    memory.regionAt(address, data.length); // throws GuestMemoryError before any hook runs
    const hooks = this.#hooks.slice();
    let bytes = data;
    for (const h of hooks) {
      const d = h.mediate?.({ device, address, length: bytes.length, data: bytes });
      if (d === undefined || d.verdict === 'allow') continue;
      if (d.verdict === 'deny') throw new DmaDeniedError({ device, address, length: data.length }, h.name, d.reason);
      if (!(d.data instanceof Uint8Array) || d.data.length !== data.length) {
        throw new InvalidArgumentError('decision.data', `DMA hook '${h.name}' replaced a ${data.length}-byte write with ${d.data instanceof Uint8Array ? d.data.length : 'no'} bytes`);
      }
      bytes = d.data;
      break;
    }
    memory.write(address, bytes);
    const done: DmaWrite = { device, address, length: bytes.length, data: bytes };
    for (const h of hooks) h.observe?.(done);
  }
}

/**
 * Guest RAM as one device may use it: bounds-checked copies in and out, every write mediated by
 * the memory's {@link DmaGate}, and counters of the bytes moved (what a device's work budget is
 * measured in). It never hands out a view of guest RAM.
 */
export class DeviceMemory {
  /** The device on whose behalf accesses are made (named in hooks, audit lines and errors). */
  readonly device: string;
  readonly #mem: GuestMemory;
  readonly #gate: DmaGate;
  #read = 0;
  #written = 0;

  /**
   * @param memory - the machine's guest RAM.
   * @param device - the device's name.
   */
  constructor(memory: GuestMemory, device: string) {
    if (typeof device !== 'string' || device === '') throw new InvalidArgumentError('device', 'must be a non-empty name');
    this.#mem = memory;
    this.device = device;
    this.#gate = DmaGate.of(memory);
  }

  /** Bytes read from and written to guest RAM so far (rings included). */
  get bytesMoved(): number {
    return this.#read + this.#written;
  }

  /** Whether `[address, address+length)` lies inside one RAM region. Never throws. */
  contains(address: bigint, length: number): boolean {
    return this.#mem.contains(address, length);
  }

  /** Reads exactly `length` bytes into a new buffer (a copy). */
  read(address: bigint, length: number): Uint8Array {
    const out = this.#mem.read(address, length);
    this.#read += length;
    return out;
  }

  /** Reads a little-endian unsigned integer of 1, 2 or 4 bytes. */
  readUint(address: bigint, width: 1 | 2 | 4): number {
    const v = this.#mem.readUint(address, width);
    this.#read += width;
    return v;
  }

  /** Reads a little-endian 64-bit unsigned integer. */
  readU64(address: bigint): bigint {
    const v = this.#mem.readU64(address);
    this.#read += 8;
    return v;
  }

  /** Writes all of `data` through the DMA gate (may throw {@link DmaDeniedError}). */
  write(address: bigint, data: Uint8Array): void {
    this.#gate.write(this.#mem, this.device, address, data);
    this.#written += data.length;
  }

  /** Writes a little-endian unsigned integer of 1, 2 or 4 bytes through the DMA gate. */
  writeUint(address: bigint, width: 1 | 2 | 4, value: number): void {
    if (!this.#gate.active) {
      this.#mem.writeUint(address, width, value);
    } else {
      const b = new Uint8Array(width);
      for (let i = 0, v = value >>> 0; i < width; i++, v >>>= 8) b[i] = v & 0xff;
      this.#gate.write(this.#mem, this.device, address, b);
    }
    this.#written += width;
  }
}
