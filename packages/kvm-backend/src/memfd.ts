/**
 * Guest RAM backing: an anonymous `memfd` mapped `MAP_SHARED`. The file *is* the memory image
 * (snapshots write it out, forks map it `MAP_PRIVATE` for copy-on-write, workers can map it too).
 * @module
 */
import { C, addressOf, errno, libc, viewOf, type NativePointer } from './raw/libc.js';
import { KvmError } from './errors.js';
import { closeFd } from './fd.js';

/** `MAP_FIXED` (Linux x86-64): replace whatever is mapped at the given address. */
const MAP_FIXED = 0x10;

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

  private constructor(fd: number, ptr: NativePointer, size: number, ownsFd = true) {
    this.fd = fd;
    this.#ownsFd = ownsFd;
    this.#ptr = ptr;
    this.size = size;
    this.hostAddress = addressOf(ptr);
    this.bytes = new Uint8Array(viewOf(ptr, size));
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
    const c = libc();
    const ptr = c.mmap(null, size, C.PROT_READ | C.PROT_WRITE, (shared ? C.MAP_SHARED : C.MAP_PRIVATE) | C.MAP_NORESERVE, fd, 0);
    if (addressOf(ptr) === 0xffffffffffffffffn || ptr === null) throw new KvmError('mmap', errno());
    return new MemfdMapping(fd, ptr, size);
  }

  /**
   * Maps `size` bytes of `fd` from `offset` `MAP_PRIVATE` (copy-on-write): writes land in
   * private anonymous pages and never reach the file, so many mappings of one frozen image
   * (a snapshot) share its untouched pages. Does *not* take ownership of `fd` (the image
   * outlives its forks); the result's `fd` is -1, since its contents are not the file's.
   * @param offset - page-aligned offset into the file.
   */
  static mapPrivate(fd: number, offset: number, size: number): MemfdMapping {
    const ptr = libc().mmap(null, size, C.PROT_READ | C.PROT_WRITE, C.MAP_PRIVATE | C.MAP_NORESERVE, fd, offset);
    if (ptr === null || addressOf(ptr) === 0xffffffffffffffffn) throw new KvmError('mmap(MAP_PRIVATE)', errno());
    return new MemfdMapping(-1, ptr, size, false);
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
      // The binding types `addr` as null (every other caller lets the kernel choose); koffi
      // passes a pointer object as the same `void *`.
      const mmapAt = c.mmap as unknown as (addr: NativePointer, length: number, prot: number, flags: number, fd: number, offset: number) => NativePointer;
      const ptr = mmapAt(this.#ptr, this.size, C.PROT_READ | C.PROT_WRITE, C.MAP_SHARED | C.MAP_NORESERVE | MAP_FIXED, fd, 0);
      if (ptr === null || addressOf(ptr) !== this.hostAddress) throw new KvmError('mmap(MAP_FIXED)', errno());
      this.#closed = true;
      this.bytes = new Uint8Array(0);
      closeFd(this.fd);
      this.fd = -1;
      return new MemfdMapping(fd, ptr, this.size);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /** Unmaps and closes the memfd. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.bytes = new Uint8Array(0);
    libc().munmap(this.#ptr, this.size);
    if (this.#ownsFd) closeFd(this.fd);
    this.fd = -1;
  }
}
