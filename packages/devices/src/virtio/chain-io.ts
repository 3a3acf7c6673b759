/**
 * Cursors over the segments of a validated {@link DescriptorChain}, so a device can consume a
 * request header, stream a data payload and place a status byte without gathering the whole
 * chain into one host buffer (a chain may describe gigabytes).
 *
 * Data moves through bounded host buffers (at most {@link CHAIN_IO_CHUNK} bytes each), never
 * through views of guest RAM: a callback can keep what it is given without aliasing the guest,
 * and every byte written reaches RAM through the device's `DeviceMemory`, i.e. the DMA gate.
 * @module
 */
import type { DeviceMemory } from '@tsvm/core';
import type { Segment } from './virtqueue.js';

/** Largest host buffer one step of {@link ChainReader.stream} / {@link ChainWriter.stream} uses. */
export const CHAIN_IO_CHUNK = 64 * 1024;

/** Calls `fn(address, n, done)` for each piece of up to `length` bytes of `segments` from byte `skip`. */
function visit(segments: readonly Segment[], skip: number, length: number, fn: (address: bigint, n: number, done: number) => void): number {
  let done = 0;
  let toSkip = skip;
  for (const s of segments) {
    if (done >= length) break;
    if (toSkip >= s.len) {
      toSkip -= s.len;
      continue;
    }
    let at = toSkip;
    const end = Math.min(s.len, toSkip + (length - done));
    while (at < end) {
      const n = Math.min(end - at, CHAIN_IO_CHUNK);
      fn(s.addr + BigInt(at), n, done);
      done += n;
      at += n;
    }
    toSkip = 0;
  }
  return done;
}

/** A cursor over one direction of a descriptor chain (shared by reader and writer). */
abstract class ChainCursor {
  protected readonly mem: DeviceMemory;
  protected readonly segments: readonly Segment[];
  protected readonly total: number;
  protected pos = 0;

  /**
   * @param memory - the device's view of guest RAM.
   * @param segments - the chain's segments in this direction.
   */
  constructor(memory: DeviceMemory, segments: readonly Segment[]) {
    this.mem = memory;
    this.segments = segments;
    this.total = segments.reduce((n, s) => n + s.len, 0);
  }

  /** Bytes not yet consumed (reader) or space left (writer). */
  get remaining(): number {
    return this.total - this.pos;
  }
}

/** Reads the device-readable part of a chain front to back. */
export class ChainReader extends ChainCursor {

  /** Copies the next `n` bytes (fewer if the chain is shorter) into a new buffer. */
  read(n: number): Uint8Array {
    const want = Math.max(0, Math.min(n, this.remaining));
    const out = new Uint8Array(want);
    this.pos += visit(this.segments, this.pos, want, (a, len, at) => out.set(this.mem.read(a, len), at));
    return out;
  }

  /** Streams the next `n` bytes to `fn` in fresh host buffers of at most {@link CHAIN_IO_CHUNK} bytes. */
  stream(n: number, fn: (bytes: Uint8Array, done: number) => void): number {
    const got = visit(this.segments, this.pos, Math.max(0, Math.min(n, this.remaining)), (a, len, at) => fn(this.mem.read(a, len), at));
    this.pos += got;
    return got;
  }
}

/** Fills the device-writable part of a chain front to back, counting bytes for the used ring. */
export class ChainWriter extends ChainCursor {

  /** Cursor position: after sequential writes, the `len` of the used-ring entry. */
  get written(): number {
    return this.pos;
  }

  /** Moves the cursor to byte `pos` of the writable part (e.g. to the trailing status byte). */
  seek(pos: number): void {
    this.pos = Math.max(0, Math.min(pos, this.total));
  }

  /** Writes as much of `data` as fits; returns how many bytes were written. */
  write(data: Uint8Array): number {
    const n = visit(this.segments, this.pos, Math.min(data.length, this.remaining), (a, len, at) => this.mem.write(a, data.subarray(at, at + len)));
    this.pos += n;
    return n;
  }

  /**
   * Lets `fn` fill the next `n` bytes piece by piece: each piece is a zeroed host buffer of at
   * most {@link CHAIN_IO_CHUNK} bytes that is written to the guest (through the DMA gate) when
   * `fn` returns. The cursor advances past each piece written, so a fault leaves it after the last
   * good one.
   */
  stream(n: number, fn: (bytes: Uint8Array, done: number) => void): number {
    const got = visit(this.segments, this.pos, Math.max(0, Math.min(n, this.remaining)), (a, len, at) => {
      const buf = new Uint8Array(len);
      fn(buf, at);
      this.mem.write(a, buf);
      this.pos += len;
    });
    return got;
  }
}
