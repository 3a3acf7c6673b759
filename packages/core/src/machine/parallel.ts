/**
 * The run loop of `vcpuThreads: 'parallel'`: every vCPU enters the guest on its own runner
 * thread (`BackendRunners`), so guest code of several vCPUs executes at the same time, while
 * every *exit* is still handled here, on the thread that called `run()`, one at a time, through
 * the same `handleExit` as the round-robin loop: mediate hooks before the device, then
 * observers. A vCPU whose exit is being handled waits; the others keep running. Hooks and
 * devices therefore keep a single-threaded programming model (they never run concurrently with
 * each other), but guest RAM may change under them while other vCPUs run, as on hardware.
 *
 * Time is cut as in the round-robin loop, twice over: each vCPU has its own slice (its runner's
 * timer), at whose end the slice hooks run and the vCPU is checked for a halt it cannot leave;
 * and this thread waits for exits in synchronous phases of at most one slice, yielding to the
 * event loop between them (timeouts, `AbortSignal`, other machines on this thread).
 *
 * A stop stops every vCPU: runs still in flight are interrupted and collected before `run()`
 * returns; an exit that raced the stop (a vCPU left the guest for a real reason before the
 * interrupt reached it) is mediated and delivered like any other, so no event escapes the
 * monitor, but its own stop request (if any) is dropped: the first stop wins.
 * @module
 */
import type { EventEmitter } from 'eventemitter3';
import type { BackendRunners } from '../backend.js';
import { StateError } from '../errors.js';
import type { VcpuExit } from '../exits.js';
import { handleExit, type ExitContext, type ExitOutcome } from '../handle-exit.js';
import type { MachineEvents } from '../machine.js';
import type { StopRequest } from '../stop.js';
import type { Vcpu } from '../vcpu.js';
import { exitContext, runSliceHooks } from './hook-table.js';
import { apply, backendError, drainCoalesced, raceDeadline, sliceBegins, sliceEnds, stuck, yieldWanted } from './run-loop.js';
import type { MachineState } from './state.js';

/** @internal How the parallel loop ended: the stop, the vCPU it names and the exit behind it. */
export interface ParallelEnd {
  readonly stop: StopRequest;
  readonly vcpu: Vcpu;
  readonly exit: VcpuExit | undefined;
}

/** What handling one exit decided. */
type Step = undefined | { stop: StopRequest } | { async: Promise<ExitOutcome> };

/** How long `run()` waits at a stop for the runners to leave the guest and for a raced exit's async hook. */
const COLLECT_MS = 5000;

/**
 * Longest runner slice. A vCPU whose slice ends and finds it neither halted for good nor
 * waiting for SIPI (it computes) gets a slice twice as long the next time, up to this: each
 * slice end costs that vCPU a hand-off to the calling thread and back (several ioctls and two
 * wake-ups, ~0.3 ms measured on PVM: 10 % of a compute-bound AP's time at 10 ms slices). The
 * calling thread still turns its event loop every `sliceMs` and interrupts runners itself for a
 * timeout, an abort or a stop, so none of those waits for a slice; what does is a halted
 * vCPU's detection (and slice hooks) on a vCPU that computed before.
 */
const MAX_RUNNER_SLICE_NS = 100e6;

/** @internal The parallel loop of `run()` (validation, flush and the final `Stop` are `run()`'s). */
export async function parallelLoop(
  s: MachineState, events: EventEmitter<MachineEvents>, runners: BackendRunners,
  sliceMs: number, deadline: number, signal: AbortSignal | undefined,
): Promise<ParallelEnd> {
  const vcpus = s.vcpus;
  const n = vcpus.length;
  const sliceNs = Math.max(50_000, sliceMs * 1e6);
  const c = s.counters;
  const ctxs: ExitContext[] = vcpus.map((v) => exitContext(s, v));
  /** When each vCPU's current run started (for `runNs`). */
  const started: number[] = new Array<number>(n).fill(0);
  /** Halted for good or waiting for INIT/SIPI at the end of its last slice. */
  const idle: boolean[] = new Array<boolean>(n).fill(false);
  /** Not started again because every vCPU looked idle: a halt is being confirmed. */
  const held: boolean[] = new Array<boolean>(n).fill(false);
  /** Each vCPU's next runner slice (grows while it computes, see MAX_RUNNER_SLICE_NS). */
  const slices: number[] = new Array<number>(n).fill(sliceNs);
  /** The hook table each vCPU's context was built from. */
  const versions: number[] = new Array<number>(n).fill(s.hooksVersion);

  const go = (i: number, fresh: boolean): void => {
    // A hook added or removed meanwhile takes effect at the vCPU's next run.
    if (fresh || versions[i] !== s.hooksVersion) { ctxs[i] = exitContext(s, vcpus[i] as Vcpu); versions[i] = s.hooksVersion; }
    started[i] = performance.now();
    runners.start(i, fresh ? slices[i] as number : 0);
  };
  /** Some vCPU is not idle (it may send the held ones an IPI): they run again. */
  const release = (): void => {
    for (let j = 0; j < n; j++) if (held[j]) { held[j] = false; idle[j] = false; go(j, true); }
  };

  /** Handles the exit of vCPU `i`'s run that just ended; starts it again unless it stopped. */
  const onExit = (i: number): Step => {
    const vcpu = vcpus[i] as Vcpu;
    const ctx = ctxs[i] as ExitContext;
    let exit: VcpuExit;
    s.exit = undefined;
    try {
      exit = runners.exit(i);
    } catch (e) {
      return { stop: backendError(e) };
    }
    const t1 = performance.now();
    const k = c.byKind[exit.kind];
    k.count++;
    k.runNs += (t1 - (started[i] as number)) * 1e6;
    c.total++;
    s.seq++;
    (ctx.info as { seq: number }).seq = s.seq;
    if (s.coalesced.length > 0) {
      const stop = drainCoalesced(vcpu, ctx);
      if (stop) return { stop };
    }
    s.exit = exit;
    if (exit.kind === 'intr') {
      // The end of this vCPU's slice (or an interrupt that raced one): it is out of the guest now.
      events.emit('slice');
      const failed = runSliceHooks(s);
      k.handleNs += (performance.now() - t1) * 1e6;
      if (failed) return { stop: failed };
      const b = vcpu.backend;
      idle[i] = b.waitingForSipi() || (s.irqchip && b.isHalted() && stuck(vcpu));
      slices[i] = idle[i] ? sliceNs : Math.min(MAX_RUNNER_SLICE_NS, Math.max(sliceNs, 2 * (slices[i] as number)));
      if (!idle[i]) { release(); go(i, true); return undefined; }
      if (!idle.every(Boolean)) { go(i, true); return undefined; }
      // Every vCPU looked idle at its last slice end: keep this one out of the guest and, once all
      // are, ask each afresh (an IPI may have woken one since).
      held[i] = true;
      if (!held.every(Boolean)) return undefined;
      if (vcpus.every((v) => v.backend.waitingForSipi() || (v.backend.isHalted() && stuck(v)))) return { stop: { reason: 'halt' } };
      release();
      return undefined;
    }
    idle[i] = false;
    if (held.some(Boolean)) release();
    if (exit.kind === 'io') c.countPort(exit.port);
    const out = handleExit(exit, ctx);
    k.handleNs += (performance.now() - t1) * 1e6;
    if (out.action === 'async') return { async: out.outcome };
    const stop = apply(s, vcpu, out);
    if (stop) return { stop };
    go(i, false);
    return undefined;
  };

  for (let i = 0; i < n; i++) go(i, true);
  let end: ParallelEnd | undefined;
  const stopAt = (stop: StopRequest, i: number): void => { end = { stop, vcpu: vcpus[i] as Vcpu, exit: s.exit }; };
  try {
    while (!end) {
      if (signal?.aborted) { stopAt({ reason: 'aborted' }, 0); break; }
      const now = performance.now();
      if (deadline - now <= 0) { stopAt({ reason: 'timeout' }, 0); break; }
      // One synchronous phase: exits of any vCPU, in the order they come, until the phase ends.
      const phaseEnd = Math.min(deadline, now + sliceMs);
      let pending: { i: number; outcome: Promise<ExitOutcome>; exit: VcpuExit } | undefined;
      sliceBegins();
      try {
        for (;;) {
          const left = phaseEnd - performance.now();
          if (left <= 0) break;
          const i = runners.wait(left);
          if (i < 0) break;
          const step = onExit(i);
          if (step && 'stop' in step) { stopAt(step.stop, i); break; }
          if (step) { pending = { i, outcome: step.async, exit: s.exit as VcpuExit }; break; }
          if (yieldWanted()) break; // a device handed work to another machine on this thread
        }
      } finally {
        sliceEnds();
      }
      if (end) break;
      if (pending) {
        // The other vCPUs keep running; their exits wait until this one is answered.
        const out = await raceDeadline(pending.outcome, deadline, signal);
        s.exit = pending.exit;
        if (out === 'timeout' || out === 'aborted') { stopAt({ reason: out }, pending.i); break; }
        const stop = apply(s, vcpus[pending.i] as Vcpu, out);
        if (stop) { stopAt(stop, pending.i); break; }
        go(pending.i, false);
        continue;
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  } finally {
    await collect(s, runners, ctxs, started, end?.stop);
  }
  const result = end as ParallelEnd;
  s.exit = result.exit;
  return result;
}

/**
 * Brings every vCPU out of the guest: interrupts the runs in flight and waits for them; an exit
 * that raced the stop is counted, mediated and delivered (an async hook waited for up to
 * {@link COLLECT_MS}), and its answer given, so it completes on the next `run()`.
 * Without a stop (`run()` threw), raced exits are left unanswered.
 */
async function collect(s: MachineState, runners: BackendRunners, ctxs: ExitContext[], started: number[], stop: StopRequest | undefined): Promise<void> {
  const vcpus = s.vcpus;
  const until = performance.now() + COLLECT_MS;
  for (;;) {
    let busy = false;
    for (let i = 0; i < vcpus.length; i++) if (runners.busy(i)) { busy = true; runners.interrupt(i); }
    if (!busy) return;
    if (performance.now() > until) throw new StateError(`a vCPU did not leave the guest within ${COLLECT_MS} ms of the stop`);
    const i = runners.wait(5);
    if (i < 0) continue;
    let exit: VcpuExit;
    try { exit = runners.exit(i); } catch { continue; }
    if (!stop) continue;
    const k = s.counters.byKind[exit.kind];
    k.count++;
    k.runNs += (performance.now() - (started[i] as number)) * 1e6;
    s.counters.total++;
    if (exit.kind === 'intr') continue;
    s.seq++;
    const ctx = ctxs[i] as ExitContext;
    (ctx.info as { seq: number }).seq = s.seq;
    s.exit = exit;
    if (exit.kind === 'io') s.counters.countPort(exit.port);
    let out = handleExit(exit, ctx);
    if (out.action === 'async') {
      const r = await raceDeadline(out.outcome, until, undefined);
      if (r === 'timeout' || r === 'aborted') continue;
      out = r;
    }
    apply(s, vcpus[i] as Vcpu, out);
  }
}
