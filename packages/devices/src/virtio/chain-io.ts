/**
 * Cursors over the segments of a validated {@link DescriptorChain}, so a device can consume a
 * request header, stream a data payload and place a status byte without gathering the whole
 * chain into one host buffer (a chain may describe gigabytes).
 * @module
 */
import type { GuestMemory } from '@tsvm/core';
import type { Segment } from './virtqueue.js';

/**
 * Visits up to `length` bytes of `segments` starting at byte `skip`, calling `fn` with a view
 * of guest memory for each piece. SAFETY: `view` aliases guest RAM only for the synchronous
 * duration of `fn`; callers must not retain it.
 */
function visit(
  memory: GuestMemory,
  segments: readonly Segment[],
  skip: number,
  length: number,
  fn: (view: Uint8Array, done: number) => void,
): number {
  let done = 0;
  let toSkip = skip;
  for (const s of segments) {
    if (done >= length) break;
    if (toSkip >= s.len) {
      toSkip -= s.len;
      continue;
    }
    const n = Math.min(s.len - toSkip, length - done);
    const { bytes, offset } = memory.translate(s.addr + BigInt(toSkip), n);
    fn(bytes.subarray(offset, offset + n), done);
    done += n;
    toSkip = 0;
  }
  return done;
}

/** A cursor over one direction of a descriptor chain (shared by reader and writer). */
abstract class ChainCursor {
  protected readonly mem: GuestMemory;
  protected readonly segments: readonly Segment[];
  protected readonly total: number;
  protected pos = 0;

  /**
   * @param memory - guest RAM.
   * @param segments - the chain's segments in this direction.
   */
  constructor(memory: GuestMemory, segments: readonly Segment[]) {
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
    this.pos += visit(this.mem, this.segments, this.pos, want, (v, at) => out.set(v, at));
    return out;
  }

  /** Streams the next `n` bytes to `fn` piece by piece (see the SAFETY note on views). */
  stream(n: number, fn: (view: Uint8Array, done: number) => void): number {
    const got = visit(this.mem, this.segments, this.pos, Math.min(n, this.remaining), fn);
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
    const n = visit(this.mem, this.segments, this.pos, Math.min(data.length, this.remaining), (v, at) => v.set(data.subarray(at, at + v.length)));
    this.pos += n;
    return n;
  }

  /** Lets `fn` fill the next `n` bytes in place, piece by piece (see the SAFETY note on views). */
  stream(n: number, fn: (view: Uint8Array, done: number) => void): number {
    const got = visit(this.mem, this.segments, this.pos, Math.min(n, this.remaining), fn);
    this.pos += got;
    return got;
  }
}
