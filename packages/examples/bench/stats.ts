/**
 * Summary statistics shared by the benchmarks: every figure is reported with its spread, so a
 * reader can tell an effect from the noise of a shared host.
 * @module
 */

/** Min, quartiles, median and max of a sample. */
export interface Spread {
  /** Number of samples. */
  readonly n: number;
  /** Smallest sample. */
  readonly min: number;
  /** First quartile. */
  readonly p25: number;
  /** Median. */
  readonly median: number;
  /** Third quartile. */
  readonly p75: number;
  /** Largest sample. */
  readonly max: number;
}

/** Linear-interpolated quantile of sorted `s` (q in [0, 1]). */
function quantile(s: readonly number[], q: number): number {
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos), hi = Math.ceil(pos);
  return (s[lo] as number) + ((s[hi] as number) - (s[lo] as number)) * (pos - lo);
}

/** The spread of `xs` (at least one sample). */
export function spread(xs: readonly number[]): Spread {
  if (xs.length === 0) throw new RangeError('spread of an empty sample');
  const s = [...xs].sort((a, b) => a - b);
  return { n: s.length, min: s[0] as number, p25: quantile(s, 0.25), median: quantile(s, 0.5), p75: quantile(s, 0.75), max: s[s.length - 1] as number };
}

/** Median of `xs`. */
export function median(xs: readonly number[]): number {
  return spread(xs).median;
}

/** `median [min–max]` with `digits` decimals, for tables. */
export function fmtSpread(s: Spread, digits = 2, unit = ''): string {
  return `${s.median.toFixed(digits)}${unit} [${s.min.toFixed(digits)}–${s.max.toFixed(digits)}]`;
}

/** Relative half-IQR (IQR / 2 / median): how large the noise is against the figure. */
export function relIqr(s: Spread): number {
  return (s.p75 - s.p25) / 2 / Math.abs(s.median);
}

/**
 * Runs each of `variants` `reps` times, interleaved (round-robin, starting one later each
 * round so no variant always runs first after a pause), after one discarded warm-up round.
 * @returns the samples per variant, in round order.
 */
export async function interleave<K extends string>(reps: number, variants: Readonly<Record<K, () => Promise<number>>>, warmup = true): Promise<Record<K, number[]>> {
  const keys = Object.keys(variants) as K[];
  const out = Object.fromEntries(keys.map((k) => [k, [] as number[]])) as Record<K, number[]>;
  if (warmup) for (const k of keys) await variants[k]();
  for (let r = 0; r < reps; r++) {
    for (let j = 0; j < keys.length; j++) {
      const k = keys[(r + j) % keys.length] as K;
      out[k].push(await variants[k]());
    }
  }
  return out;
}

/** Per-round ratios a[i] / b[i] (samples taken next to each other in time). */
export function ratios(a: readonly number[], b: readonly number[]): number[] {
  return a.map((x, i) => x / (b[i] as number));
}
