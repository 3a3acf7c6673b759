/**
 * The calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`): time this thread spent on a CPU,
 * which a busy neighbour's preemptions do not inflate as they inflate wall time. Time inside
 * `KVM_RUN` is counted as the kernel accounts it: on VMX/SVM guest time is the thread's; on PVM
 * part of a guest's native (CPL3) time is not (a spinning vCPU shows about half).
 * @module
 */
import { C, libc } from './raw/libc.js';

const ts = new Uint8Array(16);
const view = new DataView(ts.buffer);

/** CPU time of the calling thread, in nanoseconds (one `clock_gettime`, ~0.1–0.2 µs through koffi). */
export function threadCpuNs(): number {
  libc().clock_gettime(C.CLOCK_THREAD_CPUTIME_ID, ts);
  return Number(view.getBigInt64(0, true)) * 1e9 + Number(view.getBigInt64(8, true));
}
