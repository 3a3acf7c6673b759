/**
 * `pnpm bench:queue`: the queue-driven scan (`src/scan-queue.ts`) in jobs/s with 1 and 2 worker
 * processes (each `TSVM_BENCH_QUEUE_CONCURRENCY` jobs at once, default 2), on a private
 * `redis-server` started on a free port (no persistence, removed afterwards). The workload is
 * the samples that end by themselves, `TSVM_BENCH_QUEUE_COPIES` copies each (default 4); a round
 * is enqueue → last result stored, measured by the producer; every result's verdict and audit
 * chain are checked, so a fast wrong answer cannot win. One discarded warm-up round per
 * configuration, then `TSVM_BENCH_ROUNDS` rounds (default 5): median [min–max]. Prints a table
 * and writes bench-results/queue.json. Shared-host figures are noisy (±30 % or worse).
 * Exits 0 with a note when `/dev/kvm` or `redis-server` is missing.
 * @module
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { kvmAvailability } from '@tsvm/core/testing';
import { SAMPLES } from '../src/scan-samples.js';
import { auditVerifies, collectResults, enqueueScan, startWorkerProcess, type ScanJob, type WorkerProcess } from '../src/scan-queue.js';
import { findRedisServer, startPrivateRedis } from '../src/scan-queue-redis.js';
import { fmtSpread, spread, type Spread } from './stats.js';

const ROUNDS = Number(process.env.TSVM_BENCH_ROUNDS ?? 5);
const COPIES = Number(process.env.TSVM_BENCH_QUEUE_COPIES ?? 4);
const CONCURRENCY = Number(process.env.TSVM_BENCH_QUEUE_CONCURRENCY ?? 2);
const QUEUE = 'bench-queue';

interface Row { workers: number; concurrency: number; jobs: number; jobsPerSecond: Spread }

async function main(): Promise<void> {
  const kvm = kvmAvailability();
  const bin = findRedisServer();
  if (!kvm.available || !bin) {
    console.log(`bench:queue skipped: ${!kvm.available ? kvm.reason : 'redis-server is not installed'}`);
    return;
  }
  const finishing = SAMPLES.filter((s) => s.expected !== 'timeout');
  const jobs: ScanJob[] = Array.from({ length: COPIES }, (_, c) => finishing.map((s) => ({ id: `${s.name}-${c}`, sample: s.name }))).flat();
  const expected = new Map(SAMPLES.map((s) => [s.name, s.expected]));
  const redis = await startPrivateRedis(bin);
  const rows: Row[] = [];
  try {
    for (const n of [1, 2]) {
      const workers: WorkerProcess[] = Array.from({ length: n }, () => startWorkerProcess({ url: redis.url, queue: QUEUE, concurrency: CONCURRENCY, sampleTimeoutMs: 300 }));
      try {
        await Promise.all(workers.map((w) => w.ready));
        const rates: number[] = [];
        for (let round = 0; round <= ROUNDS; round++) {
          const t0 = performance.now();
          const run = await enqueueScan({ url: redis.url, queue: QUEUE, jobs });
          const got = await collectResults(run, { url: redis.url, timeoutMs: 120_000, pollMs: 5 });
          const ms = performance.now() - t0;
          if (got.missing.length > 0) throw new Error(`${got.missing.length} jobs without a result`);
          for (const j of jobs) {
            const r = got.results.get(j.id);
            if (!r || r.verdict !== expected.get(j.sample) || !auditVerifies(r)) throw new Error(`${j.id}: wrong result ${r?.verdict}`);
          }
          if (round > 0) rates.push((1000 * jobs.length) / ms);
        }
        rows.push({ workers: n, concurrency: CONCURRENCY, jobs: jobs.length, jobsPerSecond: spread(rates) });
      } finally {
        for (const w of workers) w.child.kill('SIGTERM');
        await Promise.all(workers.map((w) => w.exited));
      }
    }
  } finally {
    await redis.stop();
  }
  console.log(`\n## scan on BullMQ: jobs/s by worker processes (${new Date().toISOString()}, ${ROUNDS} rounds, ${jobs.length} jobs a round)\n`);
  console.log('| worker processes | jobs at once each | jobs/s median [min–max] |\n|---|---|---|');
  for (const r of rows) console.log(`| ${r.workers} | ${r.concurrency} | ${fmtSpread(r.jobsPerSecond, 1)} |`);
  console.log('\nA round: enqueue → last result stored (HSETNX), as the producer sees it; each job = a pooled machine (own thread), a new monitor, the run, its reset, the audit chain into Redis.');
  mkdirSync('bench-results', { recursive: true });
  writeFileSync('bench-results/queue.json', JSON.stringify({ date: new Date().toISOString(), rounds: ROUNDS, copies: COPIES, rows }, null, 2));
}

await main();
