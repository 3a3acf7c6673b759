/**
 * `ExitTimer`: the time each exit spends in core's hook pipeline (mediate hooks → device →
 * observe hooks), one sample per exit. Prices of exit-free hooks (a hook on a port that exits
 * anyway adds only dispatch) are differences of a few µs on top of ~30 µs exits; the whole
 * run's time carries the noise of every exit, and sums of VMM-side time carry every preemption
 * of the thread on a shared host. The *median* per-exit time is robust to both.
 * @module
 */
import type { ExitHook, Machine } from '@tsvm/core';

/** Records, per exit, the time from the first mediate hook to the last observe hook. */
export class ExitTimer {
  readonly #samples: Float64Array;
  #n = 0;
  #t0 = 0;

  /**
   * Installs the timer's two hooks on `machine`: call before anything else registers hooks
   * (the start stamp must be the first mediate hook) and call {@link ExitTimer.finish} after
   * the last registration (the end stamp follows the device and the observe hooks registered
   * before it; a Monitor's `seal()` re-adds its own cheap observe filters after it).
   * @param capacity - samples kept (later exits are not recorded).
   */
  constructor(machine: Machine, capacity = 100_000) {
    this.#samples = new Float64Array(capacity);
    const start: ExitHook = { name: 'exit-timer:start', mode: 'mediate', matches: () => { this.#t0 = performance.now(); return false; }, handle: () => undefined };
    machine.addHook(start);
    this.#end = {
      name: 'exit-timer:end', mode: 'observe',
      matches: () => { if (this.#n < this.#samples.length) this.#samples[this.#n++] = (performance.now() - this.#t0) * 1e6; return false; },
      handle: () => undefined,
    };
    this.#machine = machine;
  }

  readonly #end: ExitHook;
  readonly #machine: Machine;

  /** Adds the end stamp: after the last hook registration, before `seal()`. @returns this timer. */
  finish(): this {
    this.#machine.addHook(this.#end);
    return this;
  }

  /** Number of exits recorded. */
  get count(): number {
    return this.#n;
  }

  /** Median ns per exit in the pipeline (NaN before any exit). */
  median(): number {
    if (this.#n === 0) return NaN;
    const s = this.#samples.slice(0, this.#n).sort();
    const m = this.#n >> 1;
    return this.#n % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
  }
}
