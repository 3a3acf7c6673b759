/**
 * Storage behind a virtio-blk device: an in-memory buffer or a host file accessed with
 * synchronous positional I/O on one fd (the run loop is synchronous per exit, and `pread` on a
 * regular file is what QEMU's threadless path does too).
 * @module
 */
import * as fs from 'node:fs';
import { InvalidArgumentError, StateError } from '@tsvm/core';

/** Byte-addressed storage. Offsets and lengths are checked by the caller against `size`. */
export interface BlockBacking {
  /** Size in bytes. */
  readonly size: number;
  /** Fills `into` from byte `position`. */
  readAt(into: Uint8Array, position: number): void;
  /** Writes `data` at byte `position`. */
  writeAt(data: Uint8Array, position: number): void;
  /** Makes earlier writes durable. */
  flush(): void;
  /** Releases the storage. Idempotent. */
  close(): void;
}

/** A backing held in host memory (tests, scratch disks). Writes modify `bytes` in place. */
export class MemoryBacking implements BlockBacking {
  /** The disk image. */
  readonly bytes: Uint8Array;

  /** @param bytes - disk image, used directly (not copied). */
  constructor(bytes: Uint8Array) {
    this.bytes = bytes;
  }

  /** Size in bytes. */
  get size(): number {
    return this.bytes.length;
  }

  /** Copies from the image. */
  readAt(into: Uint8Array, position: number): void {
    into.set(this.bytes.subarray(position, position + into.length));
  }

  /** Copies into the image. */
  writeAt(data: Uint8Array, position: number): void {
    this.bytes.set(data, position);
  }

  /** Nothing to do. */
  flush(): void {}

  /** Nothing to release. */
  close(): void {}
}

/** A backing file opened once; its size is taken at open time. */
export class FileBacking implements BlockBacking {
  /** Size in bytes when opened. */
  readonly size: number;
  /** The file's path. */
  readonly path: string;
  #fd: number;

  /**
   * @param path - file to open.
   * @param readonly - open `O_RDONLY` instead of `O_RDWR`.
   */
  constructor(path: string, readonly: boolean) {
    if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError('path', 'must be a non-empty string');
    this.path = path;
    this.#fd = fs.openSync(path, readonly ? 'r' : 'r+');
    try {
      const st = fs.fstatSync(this.#fd);
      if (!st.isFile()) throw new InvalidArgumentError('path', `${path} is not a regular file`);
      this.size = st.size;
    } catch (e) {
      fs.closeSync(this.#fd);
      throw e;
    }
  }

  /** `pread` until `into` is full; a short file reads as zeros past its end. */
  readAt(into: Uint8Array, position: number): void {
    let done = 0;
    while (done < into.length) {
      const n = fs.readSync(this.#checkedFd(), into, done, into.length - done, position + done);
      if (n === 0) {
        into.fill(0, done);
        return;
      }
      done += n;
    }
  }

  /** `pwrite` until all of `data` is written. */
  writeAt(data: Uint8Array, position: number): void {
    let done = 0;
    while (done < data.length) done += fs.writeSync(this.#checkedFd(), data, done, data.length - done, position + done);
  }

  /** `fsync`. */
  flush(): void {
    fs.fsyncSync(this.#checkedFd());
  }

  /** Closes the fd. Idempotent. */
  close(): void {
    if (this.#fd >= 0) fs.closeSync(this.#fd);
    this.#fd = -1;
  }

  #checkedFd(): number {
    if (this.#fd < 0) throw new StateError(`block backing ${this.path} is closed`);
    return this.#fd;
  }
}
