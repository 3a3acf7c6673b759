/**
 * Small helpers shared by the wrappers: one ioctl call site that turns `-1` into a
 * {@link KvmError} naming the ioctl, and fd closing.
 * @module
 */
import { C, errno, libc } from './raw/libc.js';
import { KVM, type KvmIoctl } from './raw/ioctls.js';
import { KvmError } from './errors.js';

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
  if (fd >= 0) libc().close(fd);
}



/**
 * Closes an fd on a libuv thread-pool thread (koffi's async call): for a VM fd the kernel's
 * teardown (~0.1–1 ms on PVM: memslots, MMU, SRCU grace periods) then runs off the caller's
 * thread. Resolves when `close` returned.
 */
export function closeFdInBackground(fd: number): Promise<void> {
  if (fd < 0) return Promise.resolve();
  return new Promise((resolve) => { libc().closeAsync(fd, () => resolve()); });
}

export { C };
