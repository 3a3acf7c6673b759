/**
 * Always-on exit counters: per exit kind, the number of exits (exact), nanoseconds spent in
 * `KVM_RUN` before them and nanoseconds spent handling them (estimates from sampled exits: see
 * {@link ExitKindStats}). Cheap: a clock read costs ~50 ns here, as much as a quarter of the
 * TypeScript part of a fast exit, so a run of fast exits reads the clock on about one exit in
 * 16; exits far apart are all timed.
 * @module
 */
import { EXIT_KINDS, type ExitKind } from './exits.js';

/**
 * Counters for one exit kind. `count` is exact. `runNs` and `handleNs` are Horvitz–Thompson
 * estimates: the single-thread run loop times an exit (two clock reads around `KVM_RUN`, one
 * after handling) with a probability π known before the exit happens, and adds its times
 * scaled by 1/π, so each exit's expected contribution is its true time (the estimator is
 * unbiased; for a fast exit loop its relative error over n exits is about √(15/n)).
 * π is 1 (timed surely) for the first exit of every time slice and for the exit after one that
 * took at least 20 µs (a halted vCPU's long `KVM_RUN`, a guest computing
 * between exits: the clock is cheap against them, and they are measured exactly); otherwise it
 * is 1/16, drawn independently per exit (geometric gaps),
 * so no guest pattern can alias with the sampling. Runner threads (`vcpuThreads: 'parallel'`)
 * time every exit. The price of sampling is variance where slow exits are rare and come right
 * after fast ones (a burst of port writes, then a long computation ended by the next burst's
 * first exit): such an exit is timed with probability 1/16 and then counted 16 times, so the
 * sums are right on average but rough over few such exits. `Stop.elapsedMs` and `Stop.cpuMs`
 * are exact wall and CPU time.
 */
export interface ExitKindStats {
  /** Number of exits. */
  count: number;
  /** Nanoseconds in the guest/KVM before these exits (includes the exit round trip); an unbiased estimate. */
  runNs: number;
  /** Nanoseconds spent in the VMM handling them (hooks + devices); an unbiased estimate. */
  handleNs: number;
}

/** @internal In a run of fast exits, about one exit in this many is timed (π = 1/16), its times scaled by 16. */
export const TIMING_SAMPLE = 16;

/** @internal An exit whose run + handling took at least this long makes the next exit timed surely. */
export const TIMING_SURE_NS = 20_000;

const LOG_Q = Math.log(1 - 1 / TIMING_SAMPLE);

/**
 * @internal How many exits from now the next sampled one is (1 = the next exit): a geometric
 * draw, P(g) = (1 − p)^(g−1)·p with p = 1/`TIMING_SAMPLE`, which is the same as deciding
 * every exit independently with probability p while calling `Math.random` once per sample.
 */
export function timingGap(): number {
  // 1 − random() is in (0, 1]: the log is finite and ≤ 0.
  return 1 + Math.floor(Math.log(1 - Math.random()) / LOG_Q);
}

/** A snapshot of a machine's counters. */
export interface ExitStats {
  /** Total exits. */
  readonly total: number;
  /** Per kind. */
  readonly byKind: Readonly<Record<ExitKind, Readonly<ExitKindStats>>>;
  /** Per I/O port (exits only). */
  readonly byPort: ReadonlyMap<number, number>;
}

function portMap(counts: Uint32Array | undefined): Map<number, number> {
  const m = new Map<number, number>();
  if (counts === undefined) return m;
  for (let p = 0; p < counts.length; p++) if (counts[p] !== 0) m.set(p, counts[p] as number);
  return m;
}

/** Mutable counters owned by a machine. */
export class ExitCounters {
  total = 0;
  readonly byKind: Record<ExitKind, ExitKindStats>;
  /**
   * Exits per port, indexed by port: a typed array, so counting costs no Map operation per
   * exit; allocated at the first port exit (256 KiB a machine that never does port I/O need not pay).
   */
  #byPort: Uint32Array | undefined;

  /** Counts one exit on `port`. */
  countPort(port: number): void {
    const a = (this.#byPort ??= new Uint32Array(0x10000));
    a[port] = (a[port] as number) + 1;
  }

  constructor() {
    this.byKind = Object.fromEntries(EXIT_KINDS.map((k) => [k, { count: 0, runNs: 0, handleNs: 0 }])) as Record<ExitKind, ExitKindStats>;
  }

  /** Resets all counters to zero. */
  reset(): void {
    this.total = 0;
    for (const k of EXIT_KINDS) this.byKind[k] = { count: 0, runNs: 0, handleNs: 0 };
    this.#byPort?.fill(0);
  }

  /** A copy safe to hand to users. */
  snapshot(): ExitStats {
    return {
      total: this.total,
      byKind: Object.fromEntries(EXIT_KINDS.map((k) => [k, { ...this.byKind[k] }])) as Record<ExitKind, ExitKindStats>,
      byPort: portMap(this.#byPort),
    };
  }
}
