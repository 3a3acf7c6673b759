/**
 * libc through koffi: one lazy `koffi.load`, one typed function per symbol. Nothing here
 * interprets results; callers check return values and read `errno()`.
 *
 * koffi itself (a native addon) is required on the first call that needs it, not on import:
 * `import '@tsvm/core'` must not load a native library for code that only uses loaders or the
 * mock backend. `createRequire` gives a synchronous load, since `KvmSystem.open` is sync.
 *
 * `ioctl` is variadic in C. On x86-64 SysV a variadic call with integer/pointer arguments is
 * ABI-identical to a fixed one, so we bind it twice with fixed prototypes (a pointer third
 * argument and an integer one); koffi's variadic path would cost a type parse per call.
 * @module
 */
import { createRequire } from 'node:module';
import type * as Koffi from 'koffi';

let koffiModule: typeof Koffi | undefined;

/** koffi, required on first use. */
function koffi(): typeof Koffi {
  koffiModule ??= createRequire(import.meta.url)('koffi') as typeof Koffi;
  return koffiModule;
}

/** An opaque native pointer as returned by koffi. */
export type NativePointer = unknown;

/** The libc functions tsvm uses. */
export interface Libc {
  /** libc `open` (see its man page). */
  open(path: string, flags: number): number;
  /** libc `close` (see its man page). */
  close(fd: number): number;
  /** libc `close` on a libuv thread-pool thread; `done` gets koffi's error or the result. */
  closeAsync(fd: number, done: (err: unknown, result: number) => void): void;
  /** libc `ioctl` (pointer argument). */
  ioctlPtr(fd: number, request: number, arg: Uint8Array | null): number;
  /** libc `ioctl` (integer argument). */
  ioctlInt(fd: number, request: number, arg: number | bigint): number;
  /** libc `ioctl` (pointer argument) on a libuv thread-pool thread; `done` gets koffi's error or the result. */
  ioctlPtrAsync(fd: number, request: number, arg: Uint8Array | null, done: (err: unknown, result: number) => void): void;
  /** libc `ioctl` (integer argument) on a libuv thread-pool thread. */
  ioctlIntAsync(fd: number, request: number, arg: number | bigint, done: (err: unknown, result: number) => void): void;
  /** libc `mmap` (see its man page). */
  mmap(addr: null, length: number, prot: number, flags: number, fd: number, offset: number): NativePointer;
  /** libc `munmap` (see its man page). */
  munmap(addr: NativePointer, length: number): number;
  /** libc `munmap` of a range known only by its address (a thread that is gone mapped it). */
  munmapAt(addr: bigint, length: number): number;
  /** libc `memfd_create` (see its man page). */
  memfd_create(name: string, flags: number): number;
  /** libc `ftruncate` (see its man page). */
  ftruncate(fd: number, length: number): number;
  /** libc `lseek` (see its man page; `SEEK_DATA` / `SEEK_HOLE` find a file's data). */
  lseek(fd: number, offset: number, whence: number): number;
  /** libc `timer_create` (see its man page). */
  timer_create(clockid: number, sevp: Uint8Array, timerid: Uint8Array): number;
  /** libc `timer_settime` (see its man page). */
  timer_settime(timerid: NativePointer, flags: number, value: Uint8Array, old: null): number;
  /** libc `timer_delete` (see its man page). */
  timer_delete(timerid: NativePointer): number;
  /** libc `timer_delete` of a timer known only by its id's value (a thread that is gone made it). */
  timerDeleteId(timerid: bigint): number;
  /** libc `pthread_sigmask` (see its man page). */
  pthread_sigmask(how: number, set: Uint8Array | null, old: Uint8Array | null): number;
  /** libc `sigtimedwait` (see its man page). */
  sigtimedwait(set: Uint8Array, info: Uint8Array | null, timeout: Uint8Array): number;
  /** libc `gettid` (see its man page). */
  gettid(): number;
  /** libc `sched_setscheduler` with a 4-byte `struct sched_param` (see its man page); `pid` may be a thread id. */
  sched_setscheduler(pid: number, policy: number, param: Uint8Array): number;
  /** libc `clock_gettime` into a 16-byte `struct timespec` (see its man page). */
  clock_gettime(clockid: number, ts: Uint8Array): number;
  /** libc `sigemptyset` (see its man page). */
  sigemptyset(set: Uint8Array): number;
  /** libc `sigaddset` (see its man page). */
  sigaddset(set: Uint8Array, signo: number): number;
  /** libc `sigismember` (see its man page). */
  sigismember(set: Uint8Array, signo: number): number;
  /** libc `__libc_current_sigrtmin` (see its man page). */
  __libc_current_sigrtmin(): number;
  /** libc `eventfd` (see its man page). */
  eventfd(initval: number, flags: number): number;
  /** libc `read` (see its man page). */
  read(fd: number, buf: Uint8Array, count: number): number;
  /** libc `write` (see its man page). */
  write(fd: number, buf: Uint8Array, count: number): number;
}

let cached: Libc | undefined;
let lib: Koffi.IKoffiLib | undefined;

/** Loads libc on first use. Throws koffi's error when libc cannot be loaded (not Linux). */
export function libc(): Libc {
  if (cached) return cached;
  lib = koffi().load('libc.so.6');
  const l = lib;
  const closeFn = l.func('int close(int fd)');
  const ioctlPtrFn = l.func('ioctl', 'int', ['int', 'unsigned long', 'void *']);
  const ioctlIntFn = l.func('ioctl', 'int', ['int', 'unsigned long', 'uint64_t']);
  cached = {
    open: l.func('int open(const char *path, int flags)'),
    close: closeFn,
    closeAsync: (fd: number, done: (err: unknown, result: number) => void) => { closeFn.async(fd, done); },
    ioctlPtr: ioctlPtrFn,
    ioctlInt: ioctlIntFn,
    ioctlPtrAsync: (fd: number, request: number, arg: Uint8Array | null, done: (err: unknown, result: number) => void) => { ioctlPtrFn.async(fd, request, arg, done); },
    ioctlIntAsync: (fd: number, request: number, arg: number | bigint, done: (err: unknown, result: number) => void) => { ioctlIntFn.async(fd, request, arg, done); },
    mmap: l.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)'),
    munmap: l.func('int munmap(void *addr, size_t length)'),
    munmapAt: l.func('munmap', 'int', ['uint64_t', 'size_t']),
    memfd_create: l.func('int memfd_create(const char *name, unsigned int flags)'),
    ftruncate: l.func('int ftruncate(int fd, int64_t length)'),
    lseek: l.func('int64_t lseek(int fd, int64_t offset, int whence)'),
    timer_create: l.func('timer_create', 'int', ['int', 'void *', 'void *']),
    // timer_t is `void *` in glibc. Declared as such (not a named opaque type) so a handle
    // decoded by one evaluation of this module is accepted by another's functions: vitest
    // re-evaluates modules per test file in one process, and koffi's type tags are per type.
    timer_settime: l.func('timer_settime', 'int', ['void *', 'int', 'void *', 'void *']),
    timer_delete: l.func('timer_delete', 'int', ['void *']),
    timerDeleteId: l.func('timer_delete', 'int', ['uint64_t']),
    pthread_sigmask: l.func('int pthread_sigmask(int how, void *set, void *old)'),
    sigtimedwait: l.func('int sigtimedwait(void *set, void *info, void *timeout)'),
    gettid: l.func('int gettid()'),
    clock_gettime: l.func('int clock_gettime(int, _Out_ uint8_t *ts)'),
    sched_setscheduler: l.func('int sched_setscheduler(int pid, int policy, const uint8_t *param)'),
    sigemptyset: l.func('int sigemptyset(void *set)'),
    sigaddset: l.func('int sigaddset(void *set, int signo)'),
    sigismember: l.func('int sigismember(void *set, int signo)'),
    __libc_current_sigrtmin: l.func('int __libc_current_sigrtmin()'),
    eventfd: l.func('int eventfd(unsigned int initval, int flags)'),
    read: l.func('long read(int fd, void *buf, size_t count)'),
    write: l.func('long write(int fd, void *buf, size_t count)'),
  } as Libc;
  return cached;
}

/** The calling thread's `errno` after the last libc call. */
export function errno(): number {
  return koffi().errno();
}

/** Host virtual address of a native pointer. */
export function addressOf(ptr: NativePointer): bigint {
  return koffi().address(ptr) as bigint;
}

/**
 * An ArrayBuffer over native memory. SAFETY: the caller must drop every view before the
 * memory is unmapped; tsvm confines these views to objects whose `close()` unmaps.
 */
export function viewOf(ptr: NativePointer, length: number): ArrayBuffer {
  return koffi().view(ptr, length);
}

/** Reads a native pointer stored in the first 8 bytes of `buf` (used for `timer_t`). */
export function decodePointer(buf: Uint8Array): NativePointer {
  return koffi().decode(buf, 'void *');
}

/** libc constants used by the backend (x86-64 Linux values). */
export const C = {
  O_RDWR: 0o2,
  O_CLOEXEC: 0o2000000,
  PROT_READ: 1,
  PROT_WRITE: 2,
  MAP_SHARED: 1,
  MAP_PRIVATE: 2,
  MAP_NORESERVE: 0x4000,
  MFD_CLOEXEC: 1,
  CLOCK_MONOTONIC: 1,
  CLOCK_THREAD_CPUTIME_ID: 3,
  SCHED_IDLE: 5,
  SIGEV_THREAD_ID: 4,
  SIG_BLOCK: 0,
  SIG_UNBLOCK: 1,
  SIG_SETMASK: 2,
  EFD_CLOEXEC: 0o2000000,
  EFD_NONBLOCK: 0o4000,
  EINTR: 4,
  EAGAIN: 11,
  /** glibc's `sigset_t` is 1024 bits. */
  SIGSET_BYTES: 128,
  /** The kernel's sigset is 64 bits: what KVM_SET_SIGNAL_MASK expects. */
  KERNEL_SIGSET_BYTES: 8,
} as const;
