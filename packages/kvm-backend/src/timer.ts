/**
 * Preempting a spinning guest without a signal handler. The slice signal (a real-time
 * signal) stays blocked in the vCPU thread at all times except inside `KVM_RUN`, where
 * `KVM_SET_SIGNAL_MASK` unblocks it; a POSIX timer aimed at this thread (`SIGEV_THREAD_ID`)
 * makes `KVM_RUN` return `EINTR`, and the still-pending signal is consumed with a zero-timeout
 * `sigtimedwait`. No handler ever runs, so Node's own signal handling is untouched.
 *
 * One timer per thread (module state is per isolate, so each worker gets its own): machines
 * sharing a thread re-arm the same timer at each slice start, so a timer armed for one
 * machine can never leave another without preemption.
 * @module
 */
import { C, decodePointer, errno, libc, type NativePointer } from './raw/libc.js';
import { KvmError } from './errors.js';
import { heldTimer } from './ledger.js';

/** Offset of the real-time signal above SIGRTMIN used for slice preemption. */
const SIGNAL_OFFSET = 7;

let state: { tid: number; signo: number; timer: NativePointer; set: Uint8Array } | undefined;

/** The signal number used for slice preemption in this process. */
export function sliceSignal(): number {
  return libc().__libc_current_sigrtmin() + SIGNAL_OFFSET;
}

function ensure(): NonNullable<typeof state> {
  const c = libc();
  const tid = c.gettid();
  if (state && state.tid === tid) return state;
  const signo = sliceSignal();
  const set = new Uint8Array(C.SIGSET_BYTES);
  c.sigemptyset(set);
  c.sigaddset(set, signo);
  if (c.pthread_sigmask(C.SIG_BLOCK, set, null) !== 0) throw new KvmError('pthread_sigmask', errno());
  // struct sigevent: sigev_value(8) sigev_signo(4) sigev_notify(4) _tid(4) ...; 64 bytes in glibc.
  const sev = new Uint8Array(64);
  const v = new DataView(sev.buffer);
  v.setInt32(8, signo, true);
  v.setInt32(12, C.SIGEV_THREAD_ID, true);
  v.setInt32(16, tid, true);
  const idBuf = new Uint8Array(8);
  if (c.timer_create(C.CLOCK_MONOTONIC, sev, idBuf) !== 0) throw new KvmError('timer_create', errno());
  heldTimer(new DataView(idBuf.buffer).getBigUint64(0, true));
  state = { tid, signo, timer: decodePointer(idBuf), set };
  return state;
}

/**
 * The kernel sigset (8 bytes) to pass to `KVM_SET_SIGNAL_MASK`: the thread's current mask with
 * the slice signal removed, so only that signal interrupts `KVM_RUN`.
 */
export function runSignalMask(): Uint8Array {
  const s = ensure();
  const cur = new Uint8Array(C.SIGSET_BYTES);
  libc().pthread_sigmask(C.SIG_BLOCK, null, cur);
  const bit = s.signo - 1;
  const mask = cur.slice(0, C.KERNEL_SIGSET_BYTES);
  mask[bit >> 3] = (mask[bit >> 3] as number) & ~(1 << (bit & 7));
  return mask;
}

const spec = new Uint8Array(32);
const specView = new DataView(spec.buffer);
const zero = new Uint8Array(16);

/** Arms this thread's slice timer to fire once after `ns` nanoseconds (0 disarms). */
export function armSlice(ns: number): void {
  const s = ensure();
  consumeSliceSignal();
  specView.setBigInt64(16, BigInt(Math.floor(ns / 1e9)), true);
  specView.setBigInt64(24, BigInt(Math.floor(ns % 1e9)), true);
  if (libc().timer_settime(s.timer, 0, spec, null) !== 0) throw new KvmError('timer_settime', errno());
}

/** Disarms this thread's slice timer and drops a pending slice signal. */
export function disarmSlice(): void {
  armSlice(0);
}

/** Consumes a pending slice signal, if any. Returns whether one was pending. */
export function consumeSliceSignal(): boolean {
  const s = ensure();
  let any = false;
  while (libc().sigtimedwait(s.set, null, zero) === s.signo) any = true;
  return any;
}
