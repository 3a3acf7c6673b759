/**
 * Scheduling of the calling thread: `SCHED_IDLE` (Linux, no privilege needed) for a thread that
 * should run only on CPU time no normal thread wants — a machine worker whose guest spins must
 * never delay the event loop of the thread that started it.
 * @module
 */
import { createRequire } from 'node:module';
import { C, errno, libc } from './raw/libc.js';
import { KvmError } from './errors.js';

/** Puts the calling thread (not its process) in `SCHED_IDLE`. @throws KvmError when the kernel refuses. */
export function setThreadIdle(): void {
  const c = libc();
  // struct sched_param { int sched_priority; } = 0, as SCHED_IDLE requires.
  if (c.sched_setscheduler(c.gettid(), C.SCHED_IDLE, new Uint8Array(4)) !== 0) throw new KvmError('sched_setscheduler(SCHED_IDLE)', errno());
}

let schedYield: (() => number) | undefined;

/**
 * `sched_yield(2)` for the calling thread: the scheduler picks again at once instead of at its
 * next tick. Cheap (one syscall, ~1 µs) and always succeeds on Linux.
 */
export function yieldThread(): void {
  if (!schedYield) {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    schedYield = koffi.load('libc.so.6').func('int sched_yield()') as () => number;
  }
  schedYield();
}
