/**
 * Small helpers shared by the wrappers: one ioctl call site that turns `-1` into a
 * {@link KvmError} naming the ioctl, and fd closing.
 * @module
 */
import { createRequire } from 'node:module';
import { C, errno, libc } from './raw/libc.js';
import { KVM, type KvmIoctl } from './raw/ioctls.js';
import { KvmError } from './errors.js';
import { heldFd, releasingFd } from './ledger.js';

/** Issues `ioctl(fd, KVM_x, buf)`; returns the non-negative result or throws {@link KvmError}. */
export function ioctlPtr(fd: number, name: KvmIoctl, buf: Uint8Array | null): number {
  const r = libc().ioctlPtr(fd, KVM[name], buf);
  if (r < 0) throw new KvmError(name, errno());
  return r;
}

/** Issues `ioctl(fd, KVM_x, value)` with an integer argument. */
export function ioctlInt(fd: number, name: KvmIoctl, value: number | bigint = 0): number {
  const r = libc().ioctlInt(fd, KVM[name], value);
  if (r < 0) throw new KvmError(name, errno());
  return r;
}

/** Closes an fd, ignoring EINTR (Linux always releases the fd). */
export function closeFd(fd: number): void {
  if (fd < 0) return;
  releasingFd(fd);
  libc().close(fd);
}

let fcntlInt: ((fd: number, cmd: number, arg: number) => number) | undefined;
/** `F_DUPFD_CLOEXEC` (Linux x86-64). */
const F_DUPFD_CLOEXEC = 1030;

/**
 * A second fd for the same open file (`fcntl(F_DUPFD_CLOEXEC)`). The kernel object (a vCPU, a
 * VM) lives until its last fd closes, so closing the original through its wrapper leaves the
 * object to the new fd's owner only. Bound here on first use (like `tgkill` in `runner.ts`):
 * the raw table in `raw/libc.ts` stays the functions every path needs.
 * @throws KvmError naming `fcntl(F_DUPFD_CLOEXEC)` and errno.
 */
export function dupFd(fd: number): number {
  if (!fcntlInt) {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    fcntlInt = koffi.load('libc.so.6').func('fcntl', 'int', ['int', 'int', 'int']) as (fd: number, cmd: number, arg: number) => number;
  }
  const r = fcntlInt(fd, F_DUPFD_CLOEXEC, 0);
  if (r < 0) throw new KvmError('fcntl(F_DUPFD_CLOEXEC)', errno());
  heldFd(r);
  return r;
}

/**
 * Issues `ioctl(fd, KVM_x, arg)` on a libuv thread-pool thread (koffi's async call): the kernel's
 * work (creating a VM or vCPU: ~0.05–0.5 ms on PVM) runs off the caller's thread. Rejects with a
 * {@link KvmError} when it returns -1 (errno is the pool thread's and cannot be read here: EIO
 * stands for it). `arg` must stay untouched until the promise settles. Not in a worker thread
 * that may be terminated: a completion arriving while the worker is torn down aborts the process.
 */
export function ioctlAsync(fd: number, name: KvmIoctl, arg: number | bigint | Uint8Array | null = 0): Promise<number> {
  return new Promise((resolve, reject) => {
    const done = (err: unknown, r: number): void => {
      if (err) reject(new KvmError(name, 5, `async call failed: ${String(err)}`));
      else if (r < 0) reject(new KvmError(name, 5, 'returned -1 on a thread-pool thread (errno not available)'));
      else resolve(r);
    };
    if (arg === null || arg instanceof Uint8Array) libc().ioctlPtrAsync(fd, KVM[name], arg, done);
    else libc().ioctlIntAsync(fd, KVM[name], arg, done);
  });
}

/**
 * Closes an fd on a libuv thread-pool thread (koffi's async call): for a VM fd the kernel's
 * teardown (~0.1–1 ms on PVM: memslots, MMU, SRCU grace periods) then runs off the caller's
 * thread. Resolves when `close` returned. Not in a worker thread that may be terminated (see
 * {@link ioctlAsync}).
 */
export function closeFdInBackground(fd: number): Promise<void> {
  if (fd < 0) return Promise.resolve();
  releasingFd(fd);
  return new Promise((resolve) => { libc().closeAsync(fd, () => resolve()); });
}

export { C };
