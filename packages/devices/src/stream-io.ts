/**
 * Host-side byte plumbing shared by the character devices (16550 UART, virtio console):
 * an output buffer that batches guest bytes before handing them to sinks, and a helper that
 * feeds a Node readable stream into a device with backpressure.
 * @module
 */

/** Receives guest output. The array is fresh for each call and may be retained. */
export type OutputSink = (bytes: Uint8Array) => void;

/** Anything with a `write(chunk)` method, e.g. `process.stdout` or a `Writable`. */
export interface ByteWritable {
  /** Writes one chunk. The return value (backpressure) is ignored: guest output is not throttled. */
  write(chunk: Uint8Array): unknown;
}

/** A Node readable stream, reduced to what `attachReadable` uses. */
export interface ByteReadable {
  /** Subscribes to data chunks. */
  on(event: 'data', listener: (chunk: Uint8Array | string) => void): unknown;
  /** Unsubscribes. */
  off(event: 'data', listener: (chunk: Uint8Array | string) => void): unknown;
  /** Stops the flow of `data` events (optional: without it there is no backpressure). */
  pause?(): unknown;
  /** Restarts the flow. */
  resume?(): unknown;
}

/** Options of an {@link OutputBuffer}. */
export interface OutputBufferOptions {
  /** Flush once this many bytes are buffered. Default 4096. */
  readonly threshold?: number;
  /**
   * Also flush on the next turn of the event loop (`setImmediate`) after the first buffered byte,
   * so a prompt without a newline still appears while the guest runs. Default `true`.
   */
  readonly autoFlush?: boolean;
}

/**
 * Batches guest output: a sink is called once per line, per `threshold` bytes, per explicit
 * {@link OutputBuffer.flush}, or once per event-loop turn — never once per byte, because a sink
 * like `process.stdout.write` costs a syscall per call.
 */
export class OutputBuffer {
  readonly #sinks = new Set<OutputSink>();
  readonly #threshold: number;
  readonly #autoFlush: boolean;
  #buf: Uint8Array;
  #len = 0;
  #pending: ReturnType<typeof setImmediate> | undefined;

  /** @param options - batching options. */
  constructor(options: OutputBufferOptions = {}) {
    const threshold = options.threshold ?? 4096;
    this.#threshold = Number.isSafeInteger(threshold) && threshold > 0 ? threshold : 4096;
    this.#autoFlush = options.autoFlush ?? true;
    this.#buf = new Uint8Array(this.#threshold);
  }

  /** Adds a sink; returns a function that removes it. Adding the same sink twice is a no-op. */
  addSink(sink: OutputSink): () => void {
    this.#sinks.add(sink);
    return () => {
      this.#sinks.delete(sink);
    };
  }

  /** Number of bytes waiting for a flush. */
  get buffered(): number {
    return this.#len;
  }

  /** Appends one byte (a newline triggers a flush). */
  push(byte: number): void {
    this.#buf[this.#len++] = byte & 0xff;
    if (byte === 0x0a || this.#len >= this.#threshold) this.flush();
    else this.#schedule();
  }

  /** Appends many bytes; flushes at the last newline and at every full buffer. */
  pushBytes(bytes: Uint8Array): void {
    for (const b of bytes) {
      this.#buf[this.#len++] = b;
      if (this.#len >= this.#threshold) this.flush();
    }
    if (this.#len > 0 && bytes.includes(0x0a)) this.flush();
    else if (this.#len > 0) this.#schedule();
  }

  /**
   * Hands buffered bytes to every sink. Safe to call at any time and repeatedly; a sink that
   * throws does not lose the bytes for the other sinks, and the first error is rethrown after
   * all sinks ran (a host bug, not a guest one).
   */
  flush(): void {
    if (this.#pending !== undefined) {
      clearImmediate(this.#pending);
      this.#pending = undefined;
    }
    if (this.#len === 0) return;
    const out = this.#buf.slice(0, this.#len);
    this.#len = 0;
    let first: unknown;
    let failed = false;
    for (const sink of [...this.#sinks]) {
      try {
        sink(this.#sinks.size > 1 ? out.slice() : out);
      } catch (e) {
        if (!failed) first = e;
        failed = true;
      }
    }
    if (failed) throw first;
  }

  /** Flushes and stops the auto-flush timer. Idempotent. */
  close(): void {
    this.flush();
  }

  #schedule(): void {
    if (!this.#autoFlush || this.#pending !== undefined) return;
    this.#pending = setImmediate(() => {
      this.#pending = undefined;
      this.flush();
    });
  }
}

/**
 * Feeds `readable` into `deliver` (which returns how many bytes the device accepted) with
 * backpressure: the stream is paused while the device's backlog is full and resumed by the
 * returned controller's `drained()` when the guest has consumed input.
 */
export function attachReadable(
  readable: ByteReadable,
  deliver: (bytes: Uint8Array) => void,
  isFull: () => boolean,
): { detach(): void; drained(): void } {
  let paused = false;
  const listener = (chunk: Uint8Array | string): void => {
    deliver(typeof chunk === 'string' ? new TextEncoder().encode(chunk) : new Uint8Array(chunk));
    if (isFull() && readable.pause !== undefined) {
      readable.pause();
      paused = true;
    }
  };
  readable.on('data', listener);
  let attached = true;
  return {
    detach(): void {
      if (!attached) return;
      attached = false;
      readable.off('data', listener);
    },
    drained(): void {
      if (attached && paused && !isFull()) {
        paused = false;
        readable.resume?.();
      }
    },
  };
}

/**
 * A FIFO of bytes with O(1) `shift`. `Array#shift` moves the whole array, so draining a 64 KiB
 * backlog one byte per guest register read costs the host O(backlog) per read.
 */
export class ByteQueue {
  #buf: number[] = [];
  #head = 0;

  /** Bytes queued. */
  get length(): number {
    return this.#buf.length - this.#head;
  }

  /** Appends one byte. */
  push(byte: number): void {
    this.#buf.push(byte);
  }

  /** Removes and returns the oldest byte, or `undefined` when empty. */
  shift(): number | undefined {
    if (this.#head >= this.#buf.length) return undefined;
    const b = this.#buf[this.#head++];
    // Compact once the consumed prefix dominates: amortised O(1) per byte.
    if (this.#head >= 4096 && this.#head * 2 >= this.#buf.length) {
      this.#buf = this.#buf.slice(this.#head);
      this.#head = 0;
    }
    return b;
  }

  /** The queued bytes, oldest first (a copy). */
  toArray(): number[] {
    return this.#buf.slice(this.#head);
  }
}
