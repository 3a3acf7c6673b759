/**
 * A 16550A UART (the PC's COM ports). Transmission is instantaneous (THRE and TEMT are always
 * set), so the only interrupt sources are "THR empty" (after a write or when the guest enables
 * it) and "received data available"; the receiver line status interrupt fires on overrun.
 * Simplifications a guest can see: the RX interrupt fires at one byte regardless of the FCR
 * trigger level (there is no character-timeout timer to rescue a partial FIFO), no modem-status
 * interrupts, and MCR.OUT2 does not gate the IRQ (as in QEMU and vm-superio).
 * @module
 */
import type { Access, AccessSize, Device, IrqLine } from '@tsvm/core';
import type { DeviceMapping } from './mapping.js';
import { encodeBytes, SnapshotReader } from './snapshot-fields.js';
import { attachReadable, ByteQueue, type ByteReadable, type ByteWritable, OutputBuffer, type OutputBufferOptions, type OutputSink } from './stream-io.js';

const IER_RDA = 0x01; // received data available
const IER_THRE = 0x02;
const IER_RLS = 0x04; // receiver line status
const IIR_NONE = 0x01;
const IIR_RLS = 0x06;
const IIR_RDA = 0x04;
const IIR_THRE = 0x02;
const IIR_FIFO = 0xc0;
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const LCR_DLAB = 0x80;
const MCR_LOOP = 0x10;
const LSR_DR = 0x01;
const LSR_OE = 0x02;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const MSR_CONNECTED = 0xb0; // DCD | DSR | CTS: a null-modem cable with the other end present
const FIFO_SIZE = 16;

/** Options of a {@link Uart16550}. */
export interface Uart16550Options {
  /** Device name. Default `uart0`. */
  readonly name?: string;
  /** Interrupt line (level-triggered, asserted while IIR reports a pending interrupt). */
  readonly irq?: IrqLine;
  /** Initial output sink (more can be added with {@link Uart16550.onOutput} / {@link Uart16550.pipe}). */
  readonly sink?: OutputSink;
  /** Output batching. */
  readonly output?: OutputBufferOptions;
  /**
   * Host-side input backlog in bytes, kept beyond the 16-byte FIFO so that pasted or piped
   * input is not lost while the guest reads slowly. Beyond it bytes are dropped and LSR.OE is
   * set. Default 65536.
   */
  readonly backlogLimit?: number;
}

/** Guest-visible state of a {@link Uart16550}, as JSON. */
export interface Uart16550State {
  /** Format version. */
  readonly version: 1;
  /** Register values. */
  readonly ier: number; readonly lcr: number; readonly mcr: number; readonly scr: number;
  readonly fcr: number; readonly dll: number; readonly dlm: number; readonly lsrOverrun: boolean;
  /** Whether a THR-empty interrupt is pending. */
  readonly threPending: boolean;
  /** RX FIFO then host backlog contents (base64). */
  readonly rx: string;
  readonly backlog: string;
}

/**
 * A 16550A UART register file (8 ports). Register it with {@link Uart16550.mappings}.
 *
 * @example COM1 with its interrupt line, output to the terminal and to a string, input from stdin
 * ```ts
 * import { Machine } from '@tsvm/core';
 * import { Uart16550 } from '@tsvm/devices';
 *
 * await using vm = await Machine.create({ memory: 2 * 1024 * 1024, irqchip: true });
 * const uart = new Uart16550({ irq: vm.irqLine(Uart16550.defaultIrq) });   // IRQ 4
 * uart.pipe(process.stdout);                          // batched: per line, 4 KiB or event-loop turn
 * let text = '';
 * uart.onOutput((bytes) => { text += Buffer.from(bytes).toString('latin1'); });
 * uart.attachInput(process.stdin);                     // with backpressure
 * vm.attachDevice(uart);                               // ports 0x3f8-0x3ff (Uart16550.defaultPort)
 * ```
 */
export class Uart16550 implements Device {
  /** COM1's I/O base. */
  static readonly defaultPort = 0x3f8;
  /** COM1's ISA IRQ. */
  static readonly defaultIrq = 4;
  /** Number of ports the UART occupies. */
  static readonly size = 8;

  /** Device name. */
  readonly name: string;
  readonly #irq: IrqLine | undefined;
  readonly #out: OutputBuffer;
  readonly #backlogLimit: number;
  #ier = 0;
  #lcr = 0;
  #mcr = 0;
  #scr = 0;
  #fcr = 0;
  #dll = 0x0c; // 9600 baud, what firmware leaves behind
  #dlm = 0;
  #overrun = false;
  #threPending = false;
  #rx: number[] = [];
  #backlog = new ByteQueue();
  #irqLevel = false;
  #inputs = new Set<{ detach(): void; drained(): void }>();

  /** @param options - name, IRQ line, sink, batching. */
  constructor(options: Uart16550Options = {}) {
    this.name = options.name ?? 'uart0';
    this.#irq = options.irq;
    this.#out = new OutputBuffer(options.output);
    const limit = options.backlogLimit ?? 65536;
    this.#backlogLimit = Number.isSafeInteger(limit) && limit >= 0 ? limit : 65536;
    if (options.sink !== undefined) this.#out.addSink(options.sink);
  }

  /** The default COM1 mapping at `base` (8 ports of port I/O). */
  mappings(base: number = Uart16550.defaultPort): DeviceMapping[] {
    return [{ range: { port: base, size: Uart16550.size }, device: this }];
  }

  /** Adds an output sink; returns a function that removes it. */
  onOutput(sink: OutputSink): () => void {
    return this.#out.addSink(sink);
  }

  /** Sends guest output to `writable` (e.g. `process.stdout`); returns a function that stops it. */
  pipe(writable: ByteWritable): () => void {
    return this.#out.addSink((bytes) => {
      writable.write(bytes);
    });
  }

  /** Hands buffered output to the sinks now. Safe to call at any time. */
  flush(): void {
    this.#out.flush();
  }

  /**
   * Delivers bytes as if they arrived on the wire. What does not fit the FIFO waits in the host
   * backlog; beyond `backlogLimit` bytes are dropped and LSR.OE is set.
   * @returns the number of bytes accepted (FIFO + backlog).
   */
  receive(bytes: Uint8Array | string): number {
    const data = typeof bytes === 'string' ? new TextEncoder().encode(bytes) : bytes;
    let accepted = 0;
    for (const b of data) {
      if (this.#rx.length < this.#fifoCapacity() && this.#backlog.length === 0) this.#rx.push(b);
      else if (this.#backlog.length < this.#backlogLimit) this.#backlog.push(b);
      else {
        this.#overrun = true;
        continue;
      }
      accepted++;
    }
    this.#updateIrq();
    return accepted;
  }

  /** Feeds a readable stream (e.g. `process.stdin`) into the receiver; returns a detach function. */
  attachInput(readable: ByteReadable): () => void {
    const ctl = attachReadable(readable, (b) => this.receive(b), () => this.#backlog.length >= this.#backlogLimit);
    this.#inputs.add(ctl);
    return () => {
      ctl.detach();
      this.#inputs.delete(ctl);
    };
  }

  /** Guest register read. */
  read(offset: number, _size: AccessSize, _access?: Access): number {
    switch (offset) {
      case 0:
        if (this.#lcr & LCR_DLAB) return this.#dll;
        return this.#readRbr();
      case 1:
        return this.#lcr & LCR_DLAB ? this.#dlm : this.#ier;
      case 2:
        return this.#readIir();
      case 3:
        return this.#lcr;
      case 4:
        return this.#mcr;
      case 5:
        return this.#readLsr();
      case 6:
        return this.#readMsr();
      case 7:
        return this.#scr;
      default:
        return 0xff;
    }
  }

  /** Guest register write. */
  write(offset: number, value: number, _size: AccessSize, _access?: Access): void {
    const v = value & 0xff;
    switch (offset) {
      case 0:
        if (this.#lcr & LCR_DLAB) this.#dll = v;
        else this.#writeThr(v);
        break;
      case 1:
        if (this.#lcr & LCR_DLAB) this.#dlm = v;
        else {
          const enabling = (v & IER_THRE) !== 0 && (this.#ier & IER_THRE) === 0;
          this.#ier = v & 0x0f;
          // The transmitter is always empty, so enabling ETBEI raises the interrupt at once;
          // Linux's serial driver relies on this to kick off transmission.
          if (enabling) this.#threPending = true;
        }
        break;
      case 2:
        this.#writeFcr(v);
        break;
      case 3:
        this.#lcr = v;
        break;
      case 4:
        this.#mcr = v & 0x1f;
        break;
      case 7:
        this.#scr = v;
        break;
      default:
        break; // LSR and MSR are read-only
    }
    this.#updateIrq();
  }

  /** Power-on state. Sinks, attached inputs and buffered output stay. */
  reset(): void {
    this.#ier = 0;
    this.#lcr = 0;
    this.#mcr = 0;
    this.#scr = 0;
    this.#fcr = 0;
    this.#dll = 0x0c;
    this.#dlm = 0;
    this.#overrun = false;
    this.#threPending = false;
    this.#rx = [];
    this.#backlog = new ByteQueue();
    this.#updateIrq();
  }

  /** State as JSON (output is flushed first so none is lost). */
  snapshot(): Uart16550State {
    this.flush();
    return {
      version: 1,
      ier: this.#ier, lcr: this.#lcr, mcr: this.#mcr, scr: this.#scr, fcr: this.#fcr,
      dll: this.#dll, dlm: this.#dlm, lsrOverrun: this.#overrun, threPending: this.#threPending,
      rx: encodeBytes(Uint8Array.from(this.#rx)),
      backlog: encodeBytes(Uint8Array.from(this.#backlog.toArray())),
    };
  }

  /** Restores {@link Uart16550.snapshot} output; throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    const next = {
      ier: r.int('ier', 0, 0x0f), lcr: r.int('lcr', 0, 0xff), mcr: r.int('mcr', 0, 0x1f),
      scr: r.int('scr', 0, 0xff), fcr: r.int('fcr', 0, 0xff), dll: r.int('dll', 0, 0xff),
      dlm: r.int('dlm', 0, 0xff), overrun: r.bool('lsrOverrun'), thre: r.bool('threPending'),
      rx: r.bytes('rx', FIFO_SIZE), backlog: r.bytes('backlog', this.#backlogLimit),
    };
    this.#ier = next.ier; this.#lcr = next.lcr; this.#mcr = next.mcr; this.#scr = next.scr;
    this.#fcr = next.fcr; this.#dll = next.dll; this.#dlm = next.dlm;
    this.#overrun = next.overrun; this.#threPending = next.thre;
    this.#rx = [...next.rx];
    this.#backlog = new ByteQueue();
    for (const b of next.backlog) this.#backlog.push(b);
    this.#updateIrq();
  }

  /** Flushes output and detaches inputs. Idempotent. */
  close(): void {
    for (const ctl of this.#inputs) ctl.detach();
    this.#inputs.clear();
    this.#out.close();
  }

  #fifoCapacity(): number {
    return this.#fcr & FCR_ENABLE ? FIFO_SIZE : 1;
  }

  #readRbr(): number {
    const b = this.#rx.shift() ?? 0;
    this.#refill();
    this.#updateIrq();
    return b;
  }

  #refill(): void {
    const cap = this.#fifoCapacity();
    while (this.#rx.length < cap && this.#backlog.length > 0) this.#rx.push(this.#backlog.shift() as number);
    if (this.#backlog.length < this.#backlogLimit) for (const ctl of this.#inputs) ctl.drained();
  }

  #writeThr(v: number): void {
    if (this.#mcr & MCR_LOOP) {
      if (this.#rx.length < this.#fifoCapacity()) this.#rx.push(v);
      else this.#overrun = true;
    } else {
      this.#out.push(v);
    }
    this.#threPending = true; // the byte left at once; THR is empty again
  }

  #writeFcr(v: number): void {
    const enableChanged = ((v ^ this.#fcr) & FCR_ENABLE) !== 0;
    // Toggling the FIFO enable bit clears both FIFOs on a real 16550.
    if (enableChanged || v & FCR_CLEAR_RX) {
      this.#rx = [];
      this.#refill();
    }
    this.#fcr = v & 0xc1; // keep enable and trigger level; clear bits self-reset
  }

  #readIir(): number {
    const id = this.#pendingId();
    // Reading IIR acknowledges a THR-empty interrupt when it is the one reported.
    if (id === IIR_THRE) this.#threPending = false;
    const fifo = this.#fcr & FCR_ENABLE ? IIR_FIFO : 0;
    this.#updateIrq();
    return id | fifo;
  }

  #readLsr(): number {
    let lsr = LSR_THRE | LSR_TEMT;
    if (this.#rx.length > 0) lsr |= LSR_DR;
    if (this.#overrun) lsr |= LSR_OE;
    this.#overrun = false; // OE clears on read
    this.#updateIrq();
    return lsr;
  }

  #readMsr(): number {
    if (!(this.#mcr & MCR_LOOP)) return MSR_CONNECTED;
    // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
    const m = this.#mcr;
    return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4);
  }

  #pendingId(): number {
    if (this.#ier & IER_RLS && this.#overrun) return IIR_RLS;
    if (this.#ier & IER_RDA && this.#rx.length > 0) return IIR_RDA;
    if (this.#ier & IER_THRE && this.#threPending) return IIR_THRE;
    return IIR_NONE;
  }

  #updateIrq(): void {
    const level = this.#pendingId() !== IIR_NONE;
    if (level !== this.#irqLevel) {
      this.#irqLevel = level;
      this.#irq?.set(level);
    }
  }
}
