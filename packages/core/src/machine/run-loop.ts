/**
 * The run loop, the hot path of every exit: `run` cuts time into slices (timer, timeout,
 * `AbortSignal`, slice hooks, a yield to the event loop between them); `slice` is one
 * synchronous loop of `KVM_RUN`s (counters, coalesced drain, `handleExit`); `apply` carries an
 * outcome back to the vCPU; `finish` turns the stop request into the `Stop` `run()` returns.
 * The loop allocates nothing of its own per exit (only the coalesced drain builds its late exits).
 * Machines sharing a thread take turns slice by slice: {@link yieldSlice} ends a slice early when
 * a device hands work to another machine, and a vCPU halted in the kernel gets short slices while
 * others run, so neither a message nor an idle neighbour waits a whole slice.
 * The vCPUs of one machine take turns the same way (round-robin, one slice each, on the calling
 * thread): one waiting for INIT/SIPI or halted for good is skipped until another vCPU wakes it,
 * one halted with interrupts enabled gets short slices, and every
 * exit of every vCPU goes through the same `handleExit`, so hooks and devices stay single-threaded.
 * @module
 */
import type { EventEmitter } from 'eventemitter3';
import type { NmiWakeState } from '../backend.js';
import { checkObject, show } from '../check.js';
import { bitnessOf, codeAt } from '../cpu/paging.js';
import { SYSCALL_REPORT, VECTORS_WITH_ERROR_CODE } from '../cpu/x86.js';
import { InvalidArgumentError, StateError, TsvmError } from '../errors.js';
import type { VcpuExit } from '../exits.js';
import { handleExit, type ExitContext, type ExitOutcome } from '../handle-exit.js';
import type { MachineEvents } from '../machine.js';
import { TIMING_SAMPLE, TIMING_SURE_NS, timingGap } from '../stats.js';
import type { Stop, StopRequest } from '../stop.js';
import type { Vcpu } from '../vcpu.js';
import { exitContext, runSliceHooks } from './hook-table.js';
import { parallelLoop } from './parallel.js';
import type { MachineState } from './state.js';

/** Options of {@link Machine.run}. */
export interface RunOptions {
  /** Stop with `timeout` after this many milliseconds. */
  readonly timeout?: number;
  /** Stop with `aborted` when this signal fires. */
  readonly signal?: AbortSignal;
  /** Slice length in milliseconds (default 10): the longest Node waits for the event loop. */
  readonly sliceMs?: number;
}

const DEFAULT_SLICE_MS = 10;

/**
 * Slices are synchronous, so at most one runs on a thread at a time: these two flags are the
 * thread's, not a machine's (each worker thread has its own copy of this module).
 */
let sliceRunning = false;
let yieldRequested = false;

/**
 * Ends the time slice running on this thread after the exit being handled, so the event loop
 * turns and the run loops of other machines on this thread get their turn now instead of when
 * the slice timer fires. A device that hands work to *another* machine calls it from inside the
 * exit that caused the hand-off (the vsock router and the virtual switch do, on delivery): two
 * machines in one thread run alternately, so the receiver is never inside `KVM_RUN` while the
 * sender's exit is handled, and without this a message to a halted or polling receiver waits up
 * to one slice of the sender (10 ms by default). Outside a slice (a timer, a host service) it
 * does nothing. Cheap: one flag, read once per exit.
 */
export function yieldSlice(): void {
  if (sliceRunning) yieldRequested = true;
}

/** @internal A synchronous slice (or phase of the parallel loop) starts on this thread. */
export function sliceBegins(): void {
  sliceRunning = true;
  yieldRequested = false;
}

/** @internal Whether {@link yieldSlice} was called since the slice began. */
export function yieldWanted(): boolean {
  return yieldRequested;
}

/** @internal The slice is over. */
export function sliceEnds(): void {
  sliceRunning = false;
}
/**
 * How a slice ended. `halted`: the vCPU sat in `hlt` (in-kernel irqchip); `idle`: halted with
 * IF=0 and no NMI to come, so only another vCPU (an INIT or NMI IPI) can wake it.
 */
type SliceResult = { kind: 'stop'; stop: StopRequest } | { kind: 'yield'; halted?: boolean; idle?: boolean } | { kind: 'async'; outcome: Promise<ExitOutcome>; exit: VcpuExit };

/**
 * Longest slice of a vCPU that was halted at the end of its last slice while other machines run
 * on this thread. With an in-kernel irqchip `hlt` does not exit: a halted vCPU sits in KVM_RUN
 * until its slice timer fires, and the thread with it, so an idle machine would take a full
 * slice from every busy machine sharing the thread. Its own interrupts still wake it at once
 * (routers end the sender's slice, and a pending interrupt is taken on entry); only in-kernel
 * timers wait up to this long plus the other machines' slices.
 */
const HALTED_SLICE_MS = 1;
/** Machines inside `run()` on this thread. */
let runningOnThread = 0;

/** @internal `Machine.run`. */
export async function run(s: MachineState, events: EventEmitter<MachineEvents>, options: RunOptions): Promise<Stop> {
  s.assertOpen();
  if (s.running) throw new StateError('the machine is already running');
  checkObject(options, 'options');
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw new InvalidArgumentError('signal', `must be an AbortSignal, got ${show(options.signal)}`);
  const timeout = options.timeout;
  if (timeout !== undefined && (typeof timeout !== 'number' || !(timeout >= 0))) throw new InvalidArgumentError('timeout', 'must be a non-negative number of milliseconds');
  const sliceMs = options.sliceMs ?? DEFAULT_SLICE_MS;
  if (typeof sliceMs !== 'number' || !(sliceMs > 0) || sliceMs > 1000) throw new InvalidArgumentError('sliceMs', 'must be in (0, 1000]');
  const signal = options.signal;
  s.running = true;
  // The thread's CPU clock, when the backend has one; with runner threads the guest's time is
  // theirs, so a figure of this thread alone would mislead.
  const clock = s.runners ? undefined : s.backend.threadCpuNs?.bind(s.backend);
  const cpu0 = clock?.();
  const t0 = performance.now();
  const deadline = timeout === undefined ? Infinity : t0 + timeout;
  const exits0 = s.counters.total;
  events.emit('started');
  const vcpus = s.vcpus;
  const n = vcpus.length;
  // Per vCPU: halted at the end of its last slice; `idle`: halted with nothing but another
  // vCPU to wake it (IF=0, no NMI), or waiting for INIT/SIPI (only tracked with several vCPUs).
  const halted: boolean[] = new Array<boolean>(n).fill(false);
  const idle: boolean[] = new Array<boolean>(n).fill(false);
  const parked: boolean[] = vcpus.map((v) => n > 1 && v.backend.waitingForSipi());
  let at = n - 1;
  let vcpu = vcpus[0] as Vcpu;
  let stop: StopRequest | undefined;
  runningOnThread++;
  try {
    if (s.runners) {
      // vcpuThreads: 'parallel' (machine/parallel.ts): every vCPU on its own runner thread.
      const end = await parallelLoop(s, events, s.runners, sliceMs, deadline, signal);
      stop = end.stop;
      vcpu = end.vcpu;
    }
    while (!stop) {
      if (signal?.aborted) { stop = { reason: 'aborted' }; break; }
      const left = deadline - performance.now();
      if (left <= 0) { stop = { reason: 'timeout' }; break; }
      // Round-robin: the next vCPU's turn (with one vCPU, always vCPU 0).
      if (n > 1) {
        at = at + 1 === n ? 0 : at + 1;
        // A vCPU waiting for SIPI, or halted with IF=0 and no NMI to come, would only sleep in
        // KVM_RUN: skip it until another vCPU's IPI wakes it (asked afresh each turn, a few
        // ioctls; KVM_GET_MP_STATE also makes KVM take a pending INIT or SIPI). The stop then
        // names the vCPU that ran last.
        if (parked[at] || idle[at]) {
          const next = vcpus[at] as Vcpu;
          parked[at] = next.backend.waitingForSipi();
          idle[at] = !parked[at] && next.backend.isHalted() && stuck(next);
          if (parked[at] || idle[at]) {
            if (allIdle(s, parked, idle)) { stop = { reason: 'halt' }; break; }
            continue;
          }
        }
        vcpu = vcpus[at] as Vcpu;
      }
      const i = at;
      // A halted vCPU gets short slices while other machines or other vCPUs run.
      const short = halted[i] === true && (runningOnThread > 1 || n > 1);
      const length = short ? Math.min(sliceMs, HALTED_SLICE_MS) : sliceMs;
      vcpu.backend.beginSlice(Math.max(50_000, Math.min(length, left) * 1e6));
      let r: SliceResult;
      sliceRunning = true;
      yieldRequested = false;
      try {
        r = slice(s, vcpu, n > 1);
      } finally {
        sliceRunning = false;
        vcpu.backend.endSlice();
      }
      events.emit('slice');
      const failed = runSliceHooks(s);
      if (failed) { stop = failed; break; }
      if (r.kind === 'stop') { stop = r.stop; break; }
      const h = r.kind === 'yield' && r.halted === true;
      halted[i] = h;
      if (n > 1) {
        idle[i] = r.kind === 'yield' && r.idle === true;
        // An INIT from another vCPU (or this one's own) parks it again.
        parked[i] = !h && r.kind === 'yield' && vcpu.backend.waitingForSipi();
        if ((idle[i] || parked[i]) && allIdle(s, parked, idle)) { stop = { reason: 'halt' }; break; }
      }
      if (r.kind === 'async') {
        const out = await raceDeadline(r.outcome, deadline, signal);
        if (out === 'timeout' || out === 'aborted') { stop = { reason: out }; break; }
        const next = apply(s, vcpu, out);
        if (next) { stop = next; break; }
        continue;
      }
      // Let timers, I/O and other machines run between slices.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    let req = stop as StopRequest;
    // Output produced before the stop is delivered before the stop is.
    for (const d of s.devices) {
      try {
        d.flush?.();
      } catch (error) {
        req = { reason: 'device-error', device: d.name, error };
        break;
      }
    }
    const final = finish(s, vcpu, req, t0, exits0, clock, cpu0);
    events.emit('stopped', final);
    return final;
  } finally {
    runningOnThread--;
    s.running = false;
  }
}

/**
 * One time slice of `vcpu`: a synchronous exit loop (no awaits, so the slice timer stays ours).
 * `smp`: the machine has other vCPUs, so a vCPU halted for good is reported `idle` and the run
 * loop decides (another vCPU may still wake it) instead of stopping here.
 */
function slice(s: MachineState, vcpu: Vcpu, smp: boolean): SliceResult {
  const b = vcpu.backend;
  const c = s.counters;
  const ctx = exitContext(s, vcpu);
  const info = ctx.info as { seq: number };
  // Exit timing is sampled (the estimator is documented on `ExitKindStats`): `w` is 1/π of the
  // exit about to run, 0 when it is not timed; `skip` counts the untimed exits before the next
  // sampled one. The slice's first exit is timed surely. A timed exit reads the clock before
  // `KVM_RUN` (or reuses the previous timed exit's last read), after it, and after handling;
  // an untimed one reads no clock at all.
  let w = 1;
  let skip = 0;
  let t0 = performance.now();
  let t1 = 0;
  for (;;) {
    if (w === 0 && skip-- === 0) { w = TIMING_SAMPLE; t0 = performance.now(); }
    let exit: VcpuExit;
    s.exit = undefined;
    try {
      exit = b.run();
    } catch (e) {
      return { kind: 'stop', stop: backendError(e) };
    }
    const k = c.byKind[exit.kind];
    if (w !== 0) {
      t1 = performance.now();
      k.runNs += (t1 - t0) * 1e6 * w;
    }
    k.count++;
    c.total++;
    s.seq++;
    info.seq = s.seq;
    if (s.coalesced.length > 0) {
      const stop = drainCoalesced(vcpu, ctx);
      if (stop) return { kind: 'stop', stop };
    }
    s.exit = exit;
    if (exit.kind === 'intr') {
      if (w !== 0) k.handleNs += (performance.now() - t1) * 1e6 * w;
      // With an in-kernel irqchip `hlt` never exits. Halted with IF=0, only an NMI can wake the
      // vCPU: report `halt` at once unless one is pending or some source is routed to deliver one.
      const halted = s.irqchip && b.isHalted();
      if (halted && stuck(vcpu)) return smp ? { kind: 'yield', halted, idle: true } : { kind: 'stop', stop: { reason: 'halt' } };
      return { kind: 'yield', halted };
    }
    if (exit.kind === 'io') c.countPort(exit.port);
    const out = handleExit(exit, ctx);
    if (w !== 0) {
      const t2 = performance.now();
      k.handleNs += (t2 - t1) * 1e6 * w;
      // A slow exit makes the next one timed surely; after a fast one, draw the next sample.
      if ((t2 - t0) * 1e6 >= TIMING_SURE_NS) w = 1;
      else { skip = timingGap() - 1; w = skip === 0 ? TIMING_SAMPLE : 0; }
      t0 = t2;
    }
    if (out.action === 'async') return { kind: 'async', outcome: out.outcome, exit };
    const stop = apply(s, vcpu, out);
    if (stop) return { kind: 'stop', stop };
    if (yieldRequested) return { kind: 'yield' };
  }
}

/** Carries an outcome back to the vCPU: complete a read or MSR, raise a fault, or stop. */
export function apply(s: MachineState, vcpu: Vcpu, out: ExitOutcome): StopRequest | undefined {
  if (out.action === 'stop') return out.stop;
  if (out.action === 'fault') {
    try {
      vcpu.backend.faultInstruction(out.vector, out.errorCode, s.instructionRip(vcpu));
    } catch (e) {
      return backendError(e);
    }
    return undefined;
  }
  if (out.action === 'resume') {
    if (out.read) vcpu.backend.completeRead(out.read);
    if (out.msr) vcpu.backend.completeMsr(out.msr.data, out.msr.error);
  }
  return undefined;
}

/** Delivers the writes waiting in the coalesced ring, marked `late`, to devices and observers. */
export function drainCoalesced(vcpu: Vcpu, ctx: ExitContext): StopRequest | undefined {
  for (const e of vcpu.backend.drainCoalesced()) {
    const exit: VcpuExit = e.pio
      ? { kind: 'io', direction: 'out', port: Number(e.address), size: e.length as 1 | 2 | 4, count: 1, data: e.data, late: true }
      : { kind: 'mmio', address: e.address, isWrite: true, size: e.length, data: e.data, late: true };
    // Coalesced writes already happened; only devices and observers see them.
    const out = handleExit(exit, { ...ctx, mediate: [] });
    if (out.action === 'stop') return out.stop;
  }
  return undefined;
}

/** The `Stop` for `stop`: where the vCPU is, what the exception or internal error was, counts. */
function finish(s: MachineState, vcpu: Vcpu, stop: StopRequest, t0: number, exits0: number, clock: (() => number) | undefined, cpu0: number | undefined): Stop {
  let rip = 0n;
  let req = stop;
  try {
    const regs = vcpu.backend.getRegs();
    // A stop an exit caused names the instruction behind it, the same on every flavour.
    rip = req.reason === 'timeout' || req.reason === 'aborted' ? regs.rip : s.instructionRip(vcpu);
    if (req.reason === 'timeout' || req.reason === 'aborted') {
      // With several vCPUs: every one halted or waiting for SIPI.
      req = { ...req, halted: s.irqchip && s.vcpus.every((v) => v.backend.isHalted() || (s.vcpus.length > 1 && v.backend.waitingForSipi())) };
    }
    if (req.reason === 'exception' && req.vector === SYSCALL_REPORT) {
      // The `syscall` stub (no handler of the host's): #UD, as without EFER.SCE; no frame was
      // pushed, RCX holds the RIP after the 2-byte instruction.
      req = { reason: 'exception', vector: 6, errorCode: undefined, faultRip: regs.rcx - 2n, cr2: vcpu.backend.getSregs().cr2 };
    } else if (req.reason === 'exception') {
      // The stub's `out` ran on the exception frame: [error code] RIP CS RFLAGS RSP SS.
      const w = s.mode === 'long' ? 8 : 4;
      const hasCode = VECTORS_WITH_ERROR_CODE.has(req.vector);
      const sp = regs.rsp;
      const errorCode = hasCode ? s.memory.readUint(sp, 4) : undefined;
      const ripAt = sp + BigInt(hasCode ? w : 0);
      const faultRip = w === 8 ? s.memory.readU64(ripAt) : BigInt(s.memory.readUint(ripAt, 4));
      req = { ...req, errorCode, faultRip, cr2: vcpu.backend.getSregs().cr2 };
    }
    if (req.reason === 'internal-error') {
      const sregs = vcpu.backend.getSregs();
      req = { ...req, code: codeAt(s.memory, sregs, rip), bitness: bitnessOf(sregs) };
    }
  } catch { /* registers unavailable (backend failed): report what we have */ }
  const elapsedMs = performance.now() - t0;
  const cpu = clock !== undefined && cpu0 !== undefined ? { cpuMs: (clock() - cpu0) / 1e6 } : {};
  return { ...req, rip, vcpu: vcpu.id, exits: s.counters.total - exits0, elapsedMs, ...cpu } as Stop;
}

/** Whether halted `vcpu` can only be woken by another vCPU: IF=0 and no NMI pending or routed. */
export function stuck(vcpu: Vcpu): boolean {
  const b = vcpu.backend;
  return (b.getRegs().rflags & 0x200n) === 0n && !nmiCanWake(b.nmiWakeState());
}

/**
 * Whether no vCPU of the machine can run again: every one waits for SIPI or is halted for good.
 * The flags are from each vCPU's last slice; when they all say so, each is asked again now
 * (another vCPU may have sent it an IPI since).
 */
function allIdle(s: MachineState, parked: boolean[], idle: boolean[]): boolean {
  for (let i = 0; i < parked.length; i++) if (!parked[i] && !idle[i]) return false;
  for (let i = 0; i < parked.length; i++) {
    const b = (s.vcpus[i] as Vcpu).backend;
    if (b.waitingForSipi()) continue;
    if (b.isHalted() && stuck(s.vcpus[i] as Vcpu)) continue;
    parked[i] = false;
    idle[i] = false;
    return false;
  }
  return true;
}

/** Whether an NMI can still wake a halted vCPU (a masked NMI waits for an `iret` that never comes). */
function nmiCanWake(w: NmiWakeState): boolean {
  return !w.masked && (w.pending || w.source !== undefined);
}

/** A `backend-error` stop for something the backend threw. */
export function backendError(e: unknown): StopRequest {
  return { reason: 'backend-error', error: e instanceof TsvmError ? e : new TsvmError('TSVM_BACKEND', String(e), { cause: e }) };
}

/** `p`, unless the deadline passes or the signal aborts first. */
export async function raceDeadline<T>(p: Promise<T>, deadline: number, signal: AbortSignal | undefined): Promise<T | 'timeout' | 'aborted'> {
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<'timeout'>((resolve) => { if (deadline !== Infinity) timer = setTimeout(() => resolve('timeout'), Math.max(0, deadline - performance.now())); }),
      new Promise<'aborted'>((resolve) => {
        if (!signal) return;
        if (signal.aborted) resolve('aborted');
        onAbort = () => resolve('aborted');
        signal.addEventListener('abort', onAbort, { once: true });
      }),
    ]);
  } finally {
    if (timer) clearTimeout(timer);
    if (onAbort) signal?.removeEventListener('abort', onAbort);
  }
}
