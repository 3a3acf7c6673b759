/**
 * Always-on exit counters: per exit kind, the number of exits, nanoseconds spent in `KVM_RUN`
 * before them, and nanoseconds spent handling them. Cheap: two `performance.now()` reads per exit.
 * @module
 */
import { EXIT_KINDS, type ExitKind } from './exits.js';

/** Counters for one exit kind. */
export interface ExitKindStats {
  /** Number of exits. */
  count: number;
  /** Nanoseconds in the guest/KVM before these exits (includes the exit round trip). */
  runNs: number;
  /** Nanoseconds spent in the VMM handling them (hooks + devices). */
  handleNs: number;
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
