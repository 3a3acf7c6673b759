/**
 * The calibration table: per mechanism and per CPL, whether it works on this host (and how it
 * fails when it does not) and what one event costs. `calibrate()` measures it; when nothing has
 * been measured the monitor uses an *assumed* table for the host's flavour (PVM figures from
 * `HOST-FACTS.md`), marked as such in every plan and report.
 * @module
 */
import type { VirtFlavour } from '@tsvm/core';

/** Every mechanism the monitor can use (and the cost model prices). */
export type MechanismId =
  | 'pio-exit' | 'mmio-exit' | 'coalesced-pio' | 'coalesced-mmio' | 'ro-slot-write' | 'dirty-log-harvest' | 'dirty-log-page' | 'dirty-ring-harvest'
  | 'msr-exit' | 'single-step' | 'sw-breakpoint' | 'hw-breakpoint' | 'probe-breakpoint' | 'probe-in-place' | 'hook-dispatch' | 'mmio-dispatch' | 'observe-dispatch' | 'runner-exit' | 'cpuid-table' | 'exit';

/** All mechanism ids, in report order. */
export const MECHANISMS: readonly MechanismId[] = [
  'pio-exit', 'mmio-exit', 'coalesced-pio', 'coalesced-mmio', 'ro-slot-write', 'dirty-log-harvest', 'dirty-log-page', 'dirty-ring-harvest',
  'msr-exit', 'single-step', 'sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint', 'probe-in-place', 'hook-dispatch', 'mmio-dispatch', 'observe-dispatch', 'runner-exit', 'cpuid-table', 'exit',
];

/** Guest privilege levels the monitor distinguishes. */
export type Cpl = 0 | 3;

/** One measurement. */
export type MechanismResult =
  | { readonly works: true; readonly ns: number; readonly samples?: number; readonly note?: string }
  | { readonly works: false; readonly failure: string };

/** Identity of the host a table belongs to: a table from another kernel, CPU or flavour is not reused. */
export interface HostIdentity {
  /** `os.release()`. */
  readonly kernel: string;
  /** `model name` from `/proc/cpuinfo`. */
  readonly cpu: string;
  /** KVM flavour (`vmx`, `svm`, `pvm`, ...). */
  readonly flavour: VirtFlavour;
}

/** A full table (JSON-serialisable). */
export interface CalibrationTable {
  /** Format version. */
  readonly version: 1;
  /** The host it describes. */
  readonly host: HostIdentity;
  /** `measured` by `calibrate()`, or `assumed` from documented figures. */
  readonly source: 'measured' | 'assumed';
  /** ISO time of creation. */
  readonly createdAt: string;
  /** Whether `calibrate({ quick: true })` produced it (fewer samples). */
  readonly quick: boolean;
  /** Per mechanism, per CPL. */
  readonly results: Readonly<Record<MechanismId, { readonly cpl0: MechanismResult; readonly cpl3: MechanismResult }>>;
}

/** The result for `id` at `cpl`. */
export function resultOf(table: CalibrationTable, id: MechanismId, cpl: Cpl): MechanismResult {
  const r = table.results[id] as (typeof table.results)[MechanismId] | undefined;
  // A table saved before `id` existed (e.g. 'observe-dispatch') does not know it.
  if (r === undefined) return { works: false, failure: `not in this calibration table (made before '${id}' was measured)` };
  return cpl === 0 ? r.cpl0 : r.cpl3;
}

/**
 * Price of one probe hit at `cpl` (ns): `probe-breakpoint` when the hooked instruction runs out of
 * line (one exit); `probe-in-place` when it must run in place (two exits: the original bytes
 * put back, a successor trap that re-arms) — measured where the table has it, else twice the
 * one-exit price; for an instruction shorter than the trap, 3/2 of that (a third exit: the
 * re-arm hops one more instruction; priced by exit count — measured on PVM: +23 % at CPL0,
 * +54 % at CPL3 over the two-exit hit).
 */
export function probePriceOf(table: CalibrationTable, cpl: Cpl, exitsPerHit: 1 | 2 | 3): number | undefined {
  const one = priceOf(table, 'probe-breakpoint', cpl);
  if (exitsPerHit === 1 || one === undefined) return one;
  const two = priceOf(table, 'probe-in-place', cpl) ?? 2 * one;
  return exitsPerHit === 2 ? two : 1.5 * two;
}

/** Price of `id` at `cpl` in ns, or undefined when it does not work there. */
export function priceOf(table: CalibrationTable, id: MechanismId, cpl: Cpl): number | undefined {
  const r = resultOf(table, id, cpl);
  return r.works ? r.ns : undefined;
}

const ok = (ns: number, note?: string): MechanismResult => (note ? { works: true, ns, note } : { works: true, ns });
const broken = (failure: string): MechanismResult => ({ works: false, failure });
const both = (a: MechanismResult, b: MechanismResult = a) => ({ cpl0: a, cpl3: b });

/** PVM figures from `HOST-FACTS.md` (median of 3, ±30%). */
function pvmResults(): CalibrationTable['results'] {
  return {
    'pio-exit': both(ok(11_000), ok(31_000, 'needs a TSS I/O bitmap allowing the port')),
    'mmio-exit': both(ok(10_000), ok(29_000)),
    'coalesced-pio': both(ok(2_300), ok(3_300)),
    'coalesced-mmio': both(ok(2_300, 'assumed equal to coalesced PIO'), ok(3_300, 'assumed equal to coalesced PIO')),
    'ro-slot-write': both(ok(12_000), ok(32_000)),
    'dirty-log-harvest': both(ok(1_100), ok(1_100)),
    'dirty-log-page': both(ok(14), ok(37)),
    // Core's measureDirtyTracking on this kind of host (bench:snapshot, loaded): the bitmap 2.8-4.1 µs, the ring 3.4-5.1 µs.
    'dirty-ring-harvest': both(ok(4_500, 'dirtyLog of 16 MiB with 4 pages written, through the ring')),
    'msr-exit': both(ok(10_000), broken('rdmsr/wrmsr raise #GP at CPL3 before any exit')),
    'single-step': both(ok(9_600), broken('first step exits, then #DB is delivered to the guest')),
    'sw-breakpoint': both(broken('KVM_EXIT_INTERNAL_ERROR (int3 emulation fails)'), broken('#BP is delivered to the guest')),
    'hw-breakpoint': both(ok(52_000, 'RF ignored: step over by disable, single-step, re-enable'), broken('debug registers never fire')),
    'probe-breakpoint': both(ok(12_000, 'one PIO exit per hit (out of line; in place: two)'), ok(32_000, 'one PIO exit per hit (out of line; in place: two)')),
    'probe-in-place': both(ok(24_000, 'assumed: two probe exits per hit'), ok(64_000, 'assumed: two probe exits per hit')),
    'hook-dispatch': both(ok(300)),
    'mmio-dispatch': both(ok(450)),
    'observe-dispatch': both(ok(200)),
    'runner-exit': both(ok(8_000, 'assumed: the hand-off to and from a runner thread per exit')),
    'cpuid-table': both(ok(0), broken("CPUID at CPL3 returns the outer hypervisor's values, not the table")),
    'exit': both(ok(0, 'the exit happens without the hook')),
  };
}

/** Rough VMX/SVM figures (no measurement behind them; run `calibrate()`): everything works. */
function hardwareResults(): CalibrationTable['results'] {
  return {
    'pio-exit': both(ok(2_500)), 'mmio-exit': both(ok(3_000)), 'coalesced-pio': both(ok(150)), 'coalesced-mmio': both(ok(150)),
    'ro-slot-write': both(ok(3_500)), 'dirty-log-harvest': both(ok(1_000)), 'dirty-log-page': both(ok(20)), 'dirty-ring-harvest': both(ok(1_000)),
    'msr-exit': both(ok(2_500), broken('rdmsr/wrmsr raise #GP at CPL3')), 'single-step': both(ok(2_500)),
    'sw-breakpoint': both(ok(3_000)), 'hw-breakpoint': both(ok(6_000)), 'probe-breakpoint': both(ok(5_500)), 'probe-in-place': both(ok(11_000)),
    'hook-dispatch': both(ok(300)), 'mmio-dispatch': both(ok(450)), 'observe-dispatch': both(ok(200)), 'runner-exit': both(ok(5_000)), 'cpuid-table': both(ok(0)), 'exit': both(ok(0)),
  };
}

/** Conservative table for an unknown flavour: only exit-based mechanisms and probes are trusted. */
function unknownResults(): CalibrationTable['results'] {
  const r = pvmResults();
  const unknown = broken('not calibrated on this host flavour: run calibrate()');
  return { ...r, 'single-step': both(unknown), 'sw-breakpoint': both(unknown), 'hw-breakpoint': both(unknown) };
}

/**
 * The table to use before (or instead of) measuring: PVM figures for `pvm`, rough hardware
 * figures for `vmx`/`svm` and the mock (where every mechanism works), conservative otherwise.
 */
export function assumedTable(host: HostIdentity): CalibrationTable {
  const results = host.flavour === 'pvm' ? pvmResults() : host.flavour === 'unknown' ? unknownResults() : hardwareResults();
  return { version: 1, host, source: 'assumed', createdAt: new Date(0).toISOString(), quick: false, results };
}
