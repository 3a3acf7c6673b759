/**
 * vCPU runners: one small worker thread per vCPU whose only job is to issue `KVM_RUN` on that
 * vCPU's fd, so several vCPUs of one VM execute guest code at the same time. Everything else —
 * decoding the exit from `kvm_run`, answering it, every other ioctl — stays on the thread that
 * owns the {@link KvmVcpu} (fds and the `kvm_run` mapping are process-wide, so that thread reads
 * the exit from its own view of the same shared page).
 *
 * The protocol is a `SharedArrayBuffer` of `Int32`s, no messages per exit:
 * - per runner a state word: `IDLE` → `GO` (owner: "run once") → `DONE` (runner: the ioctl
 *   returned; its result, or `-errno`, is in the result word) → `IDLE` (owner: taken);
 * - one doorbell word every runner increments and notifies when it stores `DONE`, so the owner
 *   waits for *any* vCPU with one `Atomics.wait`.
 *
 * Preemption: each runner arms its own slice timer (`timer_create` + `SIGEV_THREAD_ID`, the same
 * real-time signal as {@link armSlice}, blocked in the runner except inside `KVM_RUN` through
 * the vCPU's `KVM_SET_SIGNAL_MASK`) when the owner starts a new slice. The owner interrupts a run
 * with {@link VcpuRunners.interrupt}: `kvm_run.immediate_exit` plus that signal sent to the
 * runner's thread (`tgkill`), so `KVM_RUN` returns at once wherever the runner is.
 *
 * Runners use synchronous koffi calls only and never have a call in flight when they end: a
 * worker terminated inside an async koffi call aborts the process. {@link VcpuRunners.close}
 * interrupts and collects every run before the threads quit, so no fd is closed while a runner
 * is inside `KVM_RUN`.
 * @module
 */
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { KVM } from './raw/ioctls.js';
import { sliceSignal } from './timer.js';
import { TsvmError } from './errors.js';
import { heldTimer, releasingTimer } from './ledger.js';
import type { KvmVcpu } from './vcpu.js';

const IDLE = 0;
const GO = 1;
const DONE = 2;
const QUIT = 3;
/** Int32 words per runner: state, result, thread id, slice length in µs (0: keep the slice). */
const STRIDE = 4;
/** Words before the first runner's: the doorbell. */
const HEAD = 4;
/**
 * Hand-off spins before a futex sleep: the runner's loads of its state word (~20–40 µs of one
 * core) and the owner's checks of the runners for up to {@link OWNER_SPIN_MS} (an exit from
 * CPL3 takes ~30 µs on PVM). A futex wake-up costs tens of µs on a virtualized host; a guest
 * that computes between exits never reaches these (its runner sleeps in KVM_RUN, the owner
 * in its wait with nothing to take).
 */
const RUNNER_SPIN = 20_000;
const OWNER_SPIN_MS = 0.06;

/**
 * The runner thread (CommonJS, `eval`: no module resolution, no TypeScript loader, nothing but
 * koffi). `w` is the shared Int32Array, `at` this runner's first word.
 */
const RUNNER = `
'use strict';
const { workerData, parentPort } = require('node:worker_threads');
const koffi = require(workerData.koffi);
const lib = koffi.load('libc.so.6');
const ioctl = lib.func('ioctl', 'int', ['int', 'unsigned long', 'uint64_t']);
const gettid = lib.func('int gettid()');
const sigemptyset = lib.func('int sigemptyset(void *set)');
const sigaddset = lib.func('int sigaddset(void *set, int signo)');
const pthread_sigmask = lib.func('int pthread_sigmask(int how, void *set, void *old)');
const sigtimedwait = lib.func('int sigtimedwait(void *set, void *info, void *timeout)');
const timer_create = lib.func('timer_create', 'int', ['int', 'void *', 'void *']);
const timer_settime = lib.func('timer_settime', 'int', ['void *', 'int', 'void *', 'void *']);
const timer_delete = lib.func('timer_delete', 'int', ['void *']);
const { fd, request, signo, at, sab } = workerData;
const w = new Int32Array(sab);
const set = new Uint8Array(128);
sigemptyset(set);
sigaddset(set, signo);
if (pthread_sigmask(0, set, null) !== 0) throw new Error('pthread_sigmask failed');
const tid = gettid();
const sev = new Uint8Array(64);
const sv = new DataView(sev.buffer);
sv.setInt32(8, signo, true);
sv.setInt32(12, 4, true); // SIGEV_THREAD_ID
sv.setInt32(16, tid, true);
const idBuf = new Uint8Array(8);
if (timer_create(1, sev, idBuf) !== 0) throw new Error('timer_create failed: errno ' + koffi.errno());
const timer = koffi.decode(idBuf, 'void *');
const spec = new Uint8Array(32);
const specView = new DataView(spec.buffer);
const zero = new Uint8Array(16);
const drain = () => { while (sigtimedwait(set, null, zero) === signo) { /* consumed */ } };
Atomics.store(w, at + 2, tid);
parentPort.postMessage(new DataView(idBuf.buffer).getBigUint64(0, true));
const SPIN = workerData.spin;
for (;;) {
  let s;
  // The owner usually answers an exit within microseconds: look for GO a short while before
  // sleeping on the futex (a wake-up costs tens of microseconds on a virtualized host).
  for (let k = 0; k < SPIN && ((s = Atomics.load(w, at)) === 0 || s === 2); k++);
  while ((s = Atomics.load(w, at)) === 0 || s === 2) Atomics.wait(w, at, s);
  if (s === 3) break;
  const us = w[at + 3];
  if (us > 0) {
    // A new slice: signals left from the last one (a timer that fired while idle) must not end it.
    drain();
    specView.setBigInt64(16, BigInt(Math.floor(us / 1e6)), true);
    specView.setBigInt64(24, BigInt((us % 1e6) * 1000), true);
    timer_settime(timer, 0, spec, null);
  }
  const r = ioctl(fd, request, 0);
  const res = r < 0 ? -koffi.errno() : r;
  drain();
  w[at + 1] = res;
  // GO → DONE, unless close() stored QUIT meanwhile (it gave up waiting for this run): then
  // leave at once, never issuing another ioctl on a fd that may be closed (and its number reused).
  if (Atomics.compareExchange(w, at, 1, 2) === 3) break;
  Atomics.add(w, 0, 1);
  Atomics.notify(w, 0);
}
specView.setBigInt64(16, 0n, true);
specView.setBigInt64(24, 0n, true);
timer_settime(timer, 0, spec, null);
timer_delete(timer);
drain();
`;

let tgkill: ((tgid: number, tid: number, sig: number) => number) | undefined;

/** `tgkill(2)` through koffi (loaded on first use). */
function kill(tid: number, sig: number): void {
  if (!tgkill) {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    tgkill = koffi.load('libc.so.6').func('int tgkill(int tgid, int tid, int sig)') as (tgid: number, tid: number, sig: number) => number;
  }
  tgkill(process.pid, tid, sig);
}

/**
 * One runner thread per vCPU of a VM (see the module doc). Made once per VM with
 * {@link VcpuRunners.start}; driven from the thread that owns the vCPUs; ended with
 * {@link VcpuRunners.close} before the vCPUs are closed.
 */
export class VcpuRunners {
  /** Number of runners (vCPUs). */
  readonly size: number;
  readonly #w: Int32Array;
  readonly #exited: Promise<void>;
  readonly #vcpus: readonly KvmVcpu[];
  readonly #signo: number;
  /** Runs interrupted since they were started (their `immediate_exit` is set). */
  readonly #kicked: boolean[];
  /** Where {@link next} starts looking, so no vCPU's exits starve another's. */
  #scan = 0;
  #closed = false;

  /** The runners' slice timers (ids), named in this thread's ledger while the runners live. */
  readonly #timers: readonly bigint[];

  private constructor(w: Int32Array, exited: Promise<void>, vcpus: readonly KvmVcpu[], signo: number, timers: readonly bigint[]) {
    this.#timers = timers;
    this.#w = w;
    this.#exited = exited;
    this.#vcpus = vcpus;
    this.size = vcpus.length;
    this.#signo = signo;
    this.#kicked = vcpus.map(() => false);
  }

  /**
   * Starts one runner thread per vCPU and resolves when all are ready (tens of ms: a worker
   * isolate each). The threads are `unref`'d: they never keep the process alive.
   * The vCPUs' `KVM_SET_SIGNAL_MASK` must leave the slice signal ({@link sliceSignal}) unblocked,
   * as core's backend sets it.
   */
  static async start(vcpus: readonly KvmVcpu[]): Promise<VcpuRunners> {
    if (vcpus.length === 0) throw new TsvmError('TSVM_INVALID_ARGUMENT', 'no vCPUs to run');
    const sab = new SharedArrayBuffer((HEAD + STRIDE * vcpus.length) * 4);
    const w = new Int32Array(sab);
    const signo = sliceSignal();
    const koffi = createRequire(import.meta.url).resolve('koffi');
    const workers: Worker[] = [];
    const ready: Array<Promise<void>> = [];
    const exited: Array<Promise<void>> = [];
    const timers: bigint[] = [];
    for (let i = 0; i < vcpus.length; i++) {
      const vcpu = vcpus[i] as KvmVcpu;
      const worker = new Worker(RUNNER, {
        eval: true,
        execArgv: [],
        stdout: false,
        stderr: false,
        resourceLimits: { maxOldGenerationSizeMb: 16, maxYoungGenerationSizeMb: 4 },
        workerData: { koffi, fd: vcpu.fd, request: KVM.KVM_RUN, signo, at: HEAD + i * STRIDE, sab, spin: RUNNER_SPIN },
      });
      worker.unref();
      workers.push(worker);
      exited.push(new Promise<void>((resolve) => { worker.once('exit', () => resolve()); }));
      ready.push(new Promise<void>((resolve, reject) => {
        // The runner's first message is its slice timer's id: this thread's ledger names it
        // until the runner is told to quit (it deletes the timer itself then).
        worker.once('message', (id: bigint) => { heldTimer(id); timers.push(id); resolve(); });
        worker.once('error', (e) => reject(new TsvmError('TSVM_RUNNER', `vCPU ${vcpu.id}'s runner thread failed to start: ${String(e)}`, { cause: e })));
        worker.once('exit', (code) => reject(new TsvmError('TSVM_RUNNER', `vCPU ${vcpu.id}'s runner thread exited (${code}) before it was ready`)));
      }));
    }
    try {
      await Promise.all(ready);
    } catch (e) {
      for (const id of timers) releasingTimer(id);
      for (let i = 0; i < workers.length; i++) Atomics.store(w, HEAD + i * STRIDE, QUIT);
      for (let i = 0; i < workers.length; i++) Atomics.notify(w, HEAD + i * STRIDE);
      await Promise.all(workers.map((x) => x.terminate()));
      throw e;
    }
    return new VcpuRunners(w, Promise.all(exited).then(() => undefined), vcpus, signo, timers);
  }

  /**
   * Lets runner `i` issue one `KVM_RUN`. With `sliceNs > 0` a new slice starts: the runner
   * arms its timer so the run (or a later one without a new slice) returns `EINTR` at most
   * that long after. Nothing else may touch vCPU `i` until {@link next} has returned `i`.
   */
  go(i: number, sliceNs: number): void {
    const w = this.#w;
    const at = HEAD + i * STRIDE;
    if (Atomics.load(w, at) !== IDLE) throw new TsvmError('TSVM_RUNNER', `vCPU ${i}'s runner is not idle`);
    w[at + 3] = sliceNs > 0 ? Math.max(1, Math.min(2 ** 31 - 1, Math.round(sliceNs / 1000))) : 0;
    Atomics.store(w, at, GO);
    Atomics.notify(w, at);
  }

  /**
   * Waits up to `timeoutMs` (blocking this thread, sleeping) for a started run to end; takes it
   * and returns its runner's index, or -1 when none ended in time. Read the result with
   * {@link result} (or decode it with `KvmVcpu.decodeRun`).
   */
  next(timeoutMs: number): number {
    const w = this.#w;
    const n = this.size;
    const t0 = performance.now();
    const end = t0 + timeoutMs;
    const spinUntil = t0 + Math.min(OWNER_SPIN_MS, timeoutMs);
    for (;;) {
      const bell = Atomics.load(w, 0);
      for (let k = 0; k < n; k++) {
        const i = (this.#scan + k) % n;
        const at = HEAD + i * STRIDE;
        if (Atomics.load(w, at) === DONE) {
          Atomics.store(w, at, IDLE);
          this.#scan = (i + 1) % n;
          if (this.#kicked[i]) { this.#kicked[i] = false; (this.#vcpus[i] as KvmVcpu).setImmediateExit(false); }
          return i;
        }
      }
      const left = end - performance.now();
      if (left <= 0) return -1;
      // A run that exits often comes back within microseconds: a short look before the futex.
      if (performance.now() < spinUntil) continue;
      Atomics.wait(w, 0, bell, left);
    }
  }

  /** Whether runner `i` was let go and its run not yet taken by {@link next}. */
  busy(i: number): boolean {
    const s = Atomics.load(this.#w, HEAD + i * STRIDE);
    return s === GO || s === DONE;
  }

  /** What runner `i`'s last `KVM_RUN` returned: its result, or `-errno`. */
  result(i: number): number {
    return Atomics.load(this.#w, HEAD + i * STRIDE + 1);
  }

  /**
   * Makes runner `i`'s current (or next) `KVM_RUN` return soon with `EINTR`: sets
   * `immediate_exit` (cleared again when {@link next} takes the run) and signals its thread.
   * A run that already ended for another reason is unaffected. Does nothing for an idle runner.
   */
  interrupt(i: number): void {
    if (Atomics.load(this.#w, HEAD + i * STRIDE) !== GO) return;
    if (!this.#kicked[i]) { this.#kicked[i] = true; (this.#vcpus[i] as KvmVcpu).setImmediateExit(true); }
    kill(Atomics.load(this.#w, HEAD + i * STRIDE + 2), this.#signo);
  }

  /**
   * Interrupts every started run and waits (blocking, at most `timeoutMs`) until each has
   * ended; returns the indices of the runs that ended, in order, for the caller to take
   * (their exits may be real ones that raced the interrupt). An empty list: none was busy.
   */
  collect(timeoutMs = 5000): number[] {
    const out: number[] = [];
    const end = performance.now() + timeoutMs;
    for (;;) {
      let busy = false;
      for (let i = 0; i < this.size; i++) if (Atomics.load(this.#w, HEAD + i * STRIDE) === GO) { busy = true; this.interrupt(i); }
      if (!busy && !this.#anyDone()) return out;
      const left = end - performance.now();
      if (left <= 0) throw new TsvmError('TSVM_RUNNER', `a vCPU runner did not leave KVM_RUN within ${timeoutMs} ms`);
      const i = this.next(Math.min(left, 5));
      if (i >= 0) out.push(i);
    }
  }

  #anyDone(): boolean {
    for (let i = 0; i < this.size; i++) if (Atomics.load(this.#w, HEAD + i * STRIDE) === DONE) return true;
    return false;
  }

  /**
   * Ends the runner threads (idempotent). A run still in flight is interrupted and waited for
   * first (its exit is dropped), so the vCPU fds may be closed as soon as this returns: no runner
   * will issue another ioctl. A runner that does not leave `KVM_RUN` in time finds `QUIT` when
   * it does and exits without another ioctl (closing a fd another thread is in an ioctl on is
   * safe: the kernel holds the file until the call returns). The threads then exit on their own.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try { this.collect(); } catch { /* a runner stuck in the kernel: quit anyway */ }
    for (const id of this.#timers) releasingTimer(id);
    for (let i = 0; i < this.size; i++) {
      Atomics.store(this.#w, HEAD + i * STRIDE, QUIT);
      Atomics.notify(this.#w, HEAD + i * STRIDE);
    }
    for (let i = 0; i < this.size; i++) if (this.#kicked[i]) (this.#vcpus[i] as KvmVcpu).setImmediateExit(false);
  }

  /** Resolves when every runner thread has exited (after {@link close}). */
  closed(): Promise<void> {
    return this.#exited;
  }
}
