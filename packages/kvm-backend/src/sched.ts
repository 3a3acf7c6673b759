/**
 * Scheduling of the calling thread: `SCHED_IDLE` (Linux, no privilege needed) for a thread that
 * should run only on CPU time no normal thread wants — a machine worker whose guest spins must
 * never delay the event loop of the thread that started it.
 * @module
 */
import { C, errno, libc } from './raw/libc.js';
import { KvmError } from './errors.js';

/** Puts the calling thread (not its process) in `SCHED_IDLE`. @throws KvmError when the kernel refuses. */
export function setThreadIdle(): void {
  const c = libc();
  // struct sched_param { int sched_priority; } = 0, as SCHED_IDLE requires.
  if (c.sched_setscheduler(c.gettid(), C.SCHED_IDLE, new Uint8Array(4)) !== 0) throw new KvmError('sched_setscheduler(SCHED_IDLE)', errno());
}
