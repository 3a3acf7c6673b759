/**
 * `pnpm bench:scan`: the scan example's loop (`src/scan.ts`) in samples/s, fork per sample
 * (with and without a warm VM pool) against reset per sample, on one snapshotted sandbox. Two
 * workloads: all samples (the spinners each run to the 50 ms deadline, so they dominate), and
 * only the samples that end by themselves (what a scanner's throughput is made of). Rounds are
 * interleaved after a discarded warm-up round; each figure is the median with min–max of
 * `TSVM_BENCH_ROUNDS` rounds (default 7). Every round's verdicts are checked against the
 * expected ones, so a fast wrong answer cannot win. Prints a table and writes
 * bench-results/scan.json. Figures on a shared host are noisy (±30 % or worse).
 * @module
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { kvmBackend } from '@tsvm/core';
import { Sandbox, type ScanOptions, type ScanReport } from '../src/scan.js';
import type { AssembledSample } from '../src/scan-samples.js';
import { fmtSpread, interleave, spread, type Spread } from './stats.js';

const ROUNDS = Number(process.env.TSVM_BENCH_ROUNDS ?? 7);
const TIMEOUT_MS = 50;

const VARIANTS = {
  'fork, warm pool (prewarm 2)': { mode: 'fork', prewarm: 2 },
  'fork, no pool': { mode: 'fork', prewarm: 0 },
  reset: { mode: 'reset' },
} as const satisfies Record<string, ScanOptions>;
type Variant = keyof typeof VARIANTS;

interface Row { workload: string; variant: Variant; samples: number; samplesPerSecond: Spread; msPerSample: Spread }

function check(r: ScanReport): void {
  const wrong = r.samples.filter((s) => s.verdict !== s.expected || !s.verification.ok);
  if (wrong.length > 0) throw new Error(`${r.mode}: wrong verdicts: ${wrong.map((s) => `${s.name}=${s.verdict} (expected ${s.expected})`).join(', ')}`);
}

async function measure(box: Sandbox, workload: string, samples: readonly AssembledSample[]): Promise<Row[]> {
  const perSample: Record<Variant, number[]> = { 'fork, warm pool (prewarm 2)': [], 'fork, no pool': [], reset: [] };
  const run = (v: Variant) => async (): Promise<number> => {
    const r = await box.scan(samples, { ...VARIANTS[v], timeoutMs: TIMEOUT_MS });
    check(r);
    perSample[v].push(...r.samples.map((s) => s.ms));
    return r.samplesPerSecond;
  };
  const rates = await interleave(ROUNDS, { 'fork, warm pool (prewarm 2)': run('fork, warm pool (prewarm 2)'), 'fork, no pool': run('fork, no pool'), reset: run('reset') });
  return (Object.keys(VARIANTS) as Variant[]).map((variant) => ({
    workload, variant, samples: samples.length, samplesPerSecond: spread(rates[variant]),
    // The warm-up round's per-sample times are in here too; medians shrug them off.
    msPerSample: spread(perSample[variant]),
  }));
}

async function main(): Promise<void> {
  const backend = kvmBackend();
  const box = await Sandbox.create();
  try {
    const all = await box.assemble();
    const finishing = all.filter((s) => s.expected !== 'timeout');
    const rows = [
      ...await measure(box, `all ${all.length} samples (${all.length - finishing.length} spin to the ${TIMEOUT_MS} ms deadline)`, all),
      ...await measure(box, `${finishing.length} samples that end by themselves`, finishing),
    ];
    console.log(`\n## scan loop: samples/s, fork vs reset (${backend.capabilities.flavour}, ${new Date().toISOString()}, ${ROUNDS} rounds)\n`);
    console.log('| workload | variant | samples/s median [min–max] | ms per sample median [min–max] |\n|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.workload} | ${r.variant} | ${fmtSpread(r.samplesPerSecond, 1)} | ${fmtSpread(r.msPerSample, 2)} |`);
    console.log('\nms per sample = fork or reset + a new monitor + the run + teardown, each sample of every round.');
    mkdirSync('bench-results', { recursive: true });
    writeFileSync('bench-results/scan.json', JSON.stringify({
      date: new Date().toISOString(), flavour: backend.capabilities.flavour, rounds: ROUNDS, timeoutMs: TIMEOUT_MS,
      sandbox: { memoryBytes: box.snapshot.memorySize, storedBytes: box.snapshot.storedBytes }, rows,
    }, null, 2));
  } finally {
    box.close();
  }
}

await main();
