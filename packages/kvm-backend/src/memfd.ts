/**
 * Guest RAM backing: an anonymous `memfd` mapped `MAP_SHARED`. The file *is* the memory image
 * (snapshots write it out, forks map it `MAP_PRIVATE` for copy-on-write, workers can map it too).
 * @module
 */
import { C, addressOf, errno, libc, viewOf, type NativePointer } from './raw/libc.js';
import { KvmError } from './errors.js';
import { closeFd } from './fd.js';
import { heldFd, heldMapping, releasingMapping } from './ledger.js';

/** `MAP_FIXED` (Linux x86-64): replace whatever is mapped at the given address. */
const MAP_FIXED = 0x10;
/** `MAP_ANONYMOUS` (Linux x86-64). */
const MAP_ANONYMOUS = 0x20;
/** `PROT_NONE`. */
const PROT_NONE = 0;
/** `lseek` whences (Linux) and the errno `SEEK_DATA` gives past the last data. */
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

/** `mmap` at a given address (the binding types `addr` as null; koffi passes a pointer object as the same `void *`). */
function mmapAt(addr: NativePointer, length: number, prot: number, flags: number, fd: number, offset: number): NativePointer {
  return (libc().mmap as unknown as (a: NativePointer, l: number, p: number, f: number, d: number, o: number) => NativePointer)(addr, length, prot, flags, fd, offset);
}

/**
 * Address ranges of closed mappings, each with its view, kept for the next mapping of the same
 * size. Why: every `koffi.view` is a new external `ArrayBuffer`, and V8 answers each new one of
 * guest-RAM size with an "external memory pressure" scavenge (~0.4 ms here): a loop that forks
 * per request spent ~2 ms of GC per 0.2 ms fork. A kept range is an inaccessible anonymous
 * mapping (`PROT_NONE`, `MAP_NORESERVE`: no memory, no commit charge; a stale access faults as
 * after `munmap`), and a new mapping goes over it with `MAP_FIXED`, so the view stays valid.
 * Bounded in count and bytes; per thread (each isolate has its own copy of this module).
 * SAFETY: as for any view here, no holder may keep a view past its mapping's `close()`: a kept
 * view that did would see the next owner's memory. `GuestMemory` reads `bytes` from its host
 * object at every access, and a closed mapping's `bytes` is empty.
 */
const spareRanges: { ptr: NativePointer; size: number; view: Uint8Array }[] = [];
/** At most this many ranges are kept… */
const MAX_SPARE_RANGES = 8;
/** …and at most this many bytes of address space. */
const MAX_SPARE_BYTES = 512 * 1024 * 1024;

/** Maps `fd` (or anonymous memory for `fd` -1) into a kept range of `size` when one is free, else where the kernel chooses. */
function mapRange(size: number, prot: number, flags: number, fd: number, offset: number, what: string): { ptr: NativePointer; view: Uint8Array } {
  const i = spareRanges.findIndex((r) => r.size === size);
  if (i >= 0) {
    const r = spareRanges.splice(i, 1)[0] as (typeof spareRanges)[number];
    const ptr = mmapAt(r.ptr, size, prot, flags | MAP_FIXED, fd, offset);
    if (ptr !== null && addressOf(ptr) === addressOf(r.ptr)) return { ptr: r.ptr, view: r.view };
    releasingMapping(r.ptr);
    libc().munmap(r.ptr, size); // (a failed MAP_FIXED may have unmapped part of it) and the kernel chooses below
  }
  const ptr = libc().mmap(null, size, prot, flags, fd, offset);
  if (ptr === null || addressOf(ptr) === 0xffffffffffffffffn) throw new KvmError(what, errno());
  heldMapping(ptr, size);
  return { ptr, view: new Uint8Array(viewOf(ptr, size)) };
}

/** Gives a closed mapping's range back: kept (its pages dropped) while the bounds allow, else unmapped. */
function releaseRange(ptr: NativePointer, size: number, view: Uint8Array): void {
  const kept = spareRanges.reduce((n, r) => n + r.size, 0);
  if (view.byteLength === size && spareRanges.length < MAX_SPARE_RANGES && kept + size <= MAX_SPARE_BYTES) {
    const p = mmapAt(ptr, size, PROT_NONE, C.MAP_PRIVATE | MAP_ANONYMOUS | C.MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (p !== null && addressOf(p) === addressOf(ptr)) { spareRanges.push({ ptr, size, view }); return; }
  }
  releasingMapping(ptr);
  libc().munmap(ptr, size);
}

/** @internal For tests: how many closed ranges are kept for reuse. */
export function spareRangeCount(): number {
  return spareRanges.length;
}

/** A host mapping of a memfd. */
export class MemfdMapping {
  /** The memfd, or -1 after close. */
  fd: number;
  /** Host virtual address of the mapping. */
  readonly hostAddress: bigint;
  /** Mapping length in bytes. */
  readonly size: number;
  /**
   * SAFETY: a view over the mmap'd region. It is valid until {@link close}; the only holder is
   * the guest-memory object that owns this mapping and drops it on close.
   */
  bytes: Uint8Array;
  #ptr: NativePointer;
  #closed = false;
  readonly #ownsFd: boolean;

  private constructor(fd: number, ptr: NativePointer, size: number, view: Uint8Array, ownsFd = true) {
    this.fd = fd;
    this.#ownsFd = ownsFd;
    if (ownsFd) heldFd(fd);
    this.#ptr = ptr;
    this.size = size;
    this.hostAddress = addressOf(ptr);
    this.bytes = view;
  }

  /**
   * Creates a new zero-filled memfd of `size` bytes and maps it shared.
   * @param size - bytes, a multiple of the page size.
   * @param name - name shown in `/proc/self/fd`.
   */
  static create(size: number, name = 'tsvm-ram'): MemfdMapping {
    const c = libc();
    const fd = c.memfd_create(name, C.MFD_CLOEXEC);
    if (fd < 0) throw new KvmError('memfd_create', errno());
    try {
      if (c.ftruncate(fd, size) < 0) throw new KvmError('ftruncate', errno());
      return MemfdMapping.map(fd, size, true);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /**
   * Maps an existing memfd. `shared=false` gives a private copy-on-write view (fork).
   * Takes ownership of `fd`.
   */
  static map(fd: number, size: number, shared: boolean): MemfdMapping {
    const { ptr, view } = mapRange(size, C.PROT_READ | C.PROT_WRITE, (shared ? C.MAP_SHARED : C.MAP_PRIVATE) | C.MAP_NORESERVE, fd, 0, 'mmap');
    return new MemfdMapping(fd, ptr, size, view);
  }

  /**
   * Maps `size` bytes of `fd` from `offset` `MAP_PRIVATE` (copy-on-write): writes land in
   * private anonymous pages and never reach the file, so many mappings of one frozen image
   * (a snapshot) share its untouched pages. Does *not* take ownership of `fd` (the image
   * outlives its forks); the result's `fd` is -1, since its contents are not the file's.
   * @param offset - page-aligned offset into the file.
   */
  static mapPrivate(fd: number, offset: number, size: number): MemfdMapping {
    const { ptr, view } = mapRange(size, C.PROT_READ | C.PROT_WRITE, C.MAP_PRIVATE | C.MAP_NORESERVE, fd, offset, 'mmap(MAP_PRIVATE)');
    return new MemfdMapping(-1, ptr, size, view, false);
  }

  /**
   * Puts a new zero-filled memfd of the same size under this mapping's address range
   * (`mmap(MAP_FIXED)` over it: the old pages leave atomically, and the kernel's MMU notifiers
   * drop every secondary mapping of them, KVM's included) and returns it as a new mapping; this
   * object is closed without unmapping (its view emptied, its memfd closed). A memslot that
   * names this host address keeps working and from now on reads zeros: how a kept VM gets fresh
   * RAM without a memslot delete and create (~0.1–0.3 ms on PVM). Only for a mapping that owns
   * its memfd (`create`); the old file is untouched for anyone else who holds it.
   * @throws KvmError when a call fails; this mapping is then still open but its range may have
   * lost its pages (a failed `MAP_FIXED` may unmap first): close it, do not use it again.
   */
  renew(name = 'tsvm-ram'): MemfdMapping {
    if (this.#closed || !this.#ownsFd) throw new KvmError('mmap(MAP_FIXED)', 9, 'not an open memfd mapping of its own file');
    const c = libc();
    const fd = c.memfd_create(name, C.MFD_CLOEXEC);
    if (fd < 0) throw new KvmError('memfd_create', errno());
    try {
      if (c.ftruncate(fd, this.size) < 0) throw new KvmError('ftruncate', errno());
      return this.#replaceWith(fd, 0, true);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /**
   * Puts a fresh private (copy-on-write) mapping of `size` bytes of `fd` from `offset` under this
   * mapping's address range (`mmap(MAP_FIXED)`: its pages, the private copies included, leave
   * atomically, and the kernel's MMU notifiers drop every secondary mapping of them, KVM's
   * included) and returns it as a new mapping with the same view; this object is closed without
   * unmapping (its view emptied; a memfd it owned is closed). A memslot that names this host
   * address keeps working and from now on reads the file: how a closed fork's VM gets its
   * snapshot's RAM back for the next fork without a memslot delete and create. Does not take
   * ownership of `fd`.
   * @throws KvmError when the call fails; this mapping is then still open but its range may have
   * lost its pages: close it, do not use it again.
   */
  remapPrivate(fd: number, offset: number): MemfdMapping {
    if (this.#closed) throw new KvmError('mmap(MAP_FIXED)', 9, 'the mapping is closed');
    return this.#replaceWith(fd, offset, false);
  }

  /**
   * `fd` from `offset` mapped over this range (`MAP_FIXED`; `shared`: the new mapping owns `fd`,
   * else it is a private one of no memfd), then this object closed without unmapping: its view
   * goes on with the new mapping (the same range, no new external ArrayBuffer), a memfd it
   * owned is closed. What {@link renew} and {@link remapPrivate} share.
   */
  #replaceWith(fd: number, offset: number, shared: boolean): MemfdMapping {
    const ptr = mmapAt(this.#ptr, this.size, C.PROT_READ | C.PROT_WRITE, (shared ? C.MAP_SHARED : C.MAP_PRIVATE) | C.MAP_NORESERVE | MAP_FIXED, fd, offset);
    if (ptr === null || addressOf(ptr) !== this.hostAddress) throw new KvmError('mmap(MAP_FIXED)', errno());
    this.#closed = true;
    const view = this.bytes;
    this.bytes = new Uint8Array(0);
    if (this.#ownsFd) closeFd(this.fd);
    this.fd = -1;
    return shared ? new MemfdMapping(fd, ptr, this.size, view) : new MemfdMapping(-1, ptr, this.size, view, false);
  }

  /**
   * Where the memfd holds data, as `[start, end)` byte ranges (page-aligned, in order): the
   * kernel's `SEEK_DATA` / `SEEK_HOLE`. Pages outside were never written and read as zeros;
   * reading them through the mapping would allocate them. Undefined for a mapping of no memfd
   * of its own (a private one: its pages are not the file's) or where the kernel cannot tell.
   */
  dataExtents(): Array<[number, number]> | undefined {
    if (this.#closed || this.fd < 0 || !this.#ownsFd) return undefined;
    const c = libc();
    const out: Array<[number, number]> = [];
    let at = 0;
    while (at < this.size) {
      const data = Number(c.lseek(this.fd, at, SEEK_DATA));
      if (data < 0) {
        if (errno() === ENXIO) break; // no data past `at`
        return undefined;
      }
      if (data >= this.size) break;
      let hole = Number(c.lseek(this.fd, data, SEEK_HOLE));
      if (hole < 0) return undefined;
      hole = Math.min(hole, this.size);
      out.push([data, hole]);
      at = hole;
    }
    return out;
  }

  /** Unmaps (the range may be kept for the next mapping of its size) and closes the memfd. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const view = this.bytes;
    this.bytes = new Uint8Array(0);
    releaseRange(this.#ptr, this.size, view);
    if (this.#ownsFd) closeFd(this.fd);
    this.fd = -1;
  }
}
