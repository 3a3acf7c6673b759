/**
 * A worker process of the queue-driven scan (`scan-queue.ts`): a `MachinePool` of `concurrency`
 * sandbox machines, each in its own worker thread (`scan-pool-machine.ts`: built once, forked
 * from its template), and one BullMQ `Worker` whose processor leases a machine per job, runs
 * the job's sample in it under a fresh monitor (`run({ input })`), takes the verdict and audit
 * chain from its report and releases it (the pool resets it: dirty pages only), at most
 * `concurrency` jobs at once. A guest that spins or storms exits runs on its own thread, so the
 * processor's event loop keeps renewing BullMQ's job locks. The result (verdict + audit chain) goes into the run's results hash
 * with `HSETNX` *before* the job is acknowledged, so a worker killed after storing but before
 * acknowledging leaves a result that the retry finds and does not duplicate.
 *
 * Run directly, it reads `REDIS_URL`, `TSVM_SCAN_QUEUE`, `TSVM_SCAN_CONCURRENCY`,
 * `TSVM_SCAN_SAMPLE_TIMEOUT`, `TSVM_SCAN_LOCK_MS`, `TSVM_SCAN_STALLED_MS` and, when it has a
 * parent, reports `ready` / `active` / `completed` over IPC. SIGTERM closes it gracefully (the
 * jobs in flight finish first). Start it on as many hosts as you like, all with one `REDIS_URL`.
 * @module
 */
import { hostname } from 'node:os';
import { Worker, type Job } from 'bullmq';
import { InvalidArgumentError } from '@tsvm/core';
import { MachinePool } from '@tsvm/core/threads';
import type ScanPoolMachine from './scan-pool-machine.js';
import { SAMPLES } from './scan-samples.js';
import { assertRedisReachable, DEFAULT_QUEUE, DEFAULT_REDIS_URL, redisClient, runKeys, storeResult, type ScanJob, type ScanResult, type WorkerMessage, type WorkerProcessOptions } from './scan-queue.js';
import { isMain, runCli } from './support.js';

/** Options of {@link startScanWorker}: those of a worker process, plus an event callback. */
export interface ScanWorkerOptions extends WorkerProcessOptions {
  /** Called on every job event (the process entry point forwards them over IPC). */
  readonly onEvent?: (m: WorkerMessage) => void;
}

/** A running scan worker. */
export interface ScanWorker {
  /** The BullMQ worker. */
  readonly worker: Worker<ScanJob, { stored: boolean }>;
  /** The pool the jobs run in (its metrics: machines in use, resets/s). */
  readonly pool: MachinePool;
  /** Stops taking jobs, waits for those in flight, closes the pool. */
  close(): Promise<void>;
}

const positive = (name: string, v: number): number => {
  if (!Number.isInteger(v) || v <= 0) throw new InvalidArgumentError(name, `must be a positive integer, got ${String(v)}`);
  return v;
};

/** The machine module next to this file (`.ts` under tsx, `.js` when built). */
const POOL_MODULE = new URL(`./scan-pool-machine${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url);

/** Starts a pool of sandbox machines and a BullMQ worker on `queue` that runs each job in one. */
export async function startScanWorker(options: ScanWorkerOptions): Promise<ScanWorker> {
  const queue = options.queue ?? DEFAULT_QUEUE;
  const concurrency = positive('concurrency', options.concurrency ?? 2);
  const timeoutMs = positive('sampleTimeoutMs', options.sampleTimeoutMs ?? 300);
  const lockDuration = positive('lockDuration', options.lockDuration ?? 10_000);
  const stalledInterval = positive('stalledInterval', options.stalledInterval ?? 5000);
  await assertRedisReachable(options.url);
  const emit = options.onEvent ?? ((): void => undefined);
  const pool = await MachinePool.create<typeof ScanPoolMachine>({ module: POOL_MODULE, size: concurrency, acquireTimeout: lockDuration });
  const names = new Set(SAMPLES.map((s) => s.name));
  const redis = redisClient(options.url);
  redis.on('error', () => undefined); // it reconnects; BullMQ's worker reports the outage
  const host = hostname();
  const processor = async (job: Job<ScanJob, { stored: boolean }>): Promise<{ stored: boolean }> => {
    const { id, sample } = job.data;
    if (typeof sample !== 'string' || !names.has(sample)) throw new InvalidArgumentError('job.data.sample', `no sample is named ${JSON.stringify(sample)}`);
    const runId = job.data.runId;
    if (typeof runId !== 'string') throw new InvalidArgumentError('job.data.runId', 'is missing (enqueue with enqueueScan)');
    const keys = runKeys(queue, runId);
    emit({ type: 'active', pid: process.pid, id, sample, attempt: job.attemptsStarted });
    await redis.hincrby(keys.deliveries, id, 1);
    // Already done by an earlier delivery that died before acknowledging: nothing to run.
    if (await redis.hexists(keys.results, id)) {
      await redis.hincrby(keys.duplicates, id, 1);
      emit({ type: 'completed', pid: process.pid, id, stored: false });
      return { stored: false };
    }
    const t0 = performance.now();
    const m = await pool.acquire();
    const thread = m.threadId;
    let report;
    try {
      await m.run({ input: { sample }, timeout: timeoutMs });
      report = await m.report();
    } finally {
      await m.release();
    }
    if (report.verdict === undefined || report.stop === undefined) throw new Error(`the run of ${sample} left no verdict`);
    const result: ScanResult = {
      id, sample, verdict: report.verdict, stop: report.stop, printed: report.printed, findings: report.findings,
      audit: { head: report.audit.head, lines: [...report.audit.lines] }, worker: { host, pid: process.pid, thread, machineRuns: report.runs },
      attempt: job.attemptsStarted, ms: performance.now() - t0,
    };
    const stored = await storeResult(redis, keys, result);
    emit({ type: 'completed', pid: process.pid, id, stored });
    return { stored };
  };
  const connection = redisClient(options.url);
  connection.on('error', () => undefined);
  const worker = new Worker<ScanJob, { stored: boolean }>(queue, processor, {
    connection, concurrency, lockDuration, stalledInterval, maxStalledCount: 5,
  });
  worker.on('error', (e) => emit({ type: 'error', pid: process.pid, message: e.message }));
  await worker.waitUntilReady();
  return {
    worker,
    pool,
    async close() {
      await worker.close();
      connection.disconnect();
      redis.disconnect();
      await pool.close();
    },
  };
}

/** Entry point: a worker configured from the environment, until SIGTERM. */
export async function main(): Promise<number> {
  const env = (k: string, d: number): number => (process.env[k] === undefined ? d : Number(process.env[k]));
  const send = (m: WorkerMessage): void => { if (process.send) process.send(m); };
  const w = await startScanWorker({
    url: process.env.REDIS_URL ?? DEFAULT_REDIS_URL, queue: process.env.TSVM_SCAN_QUEUE ?? DEFAULT_QUEUE,
    concurrency: env('TSVM_SCAN_CONCURRENCY', 2), sampleTimeoutMs: env('TSVM_SCAN_SAMPLE_TIMEOUT', 300),
    lockDuration: env('TSVM_SCAN_LOCK_MS', 10_000), stalledInterval: env('TSVM_SCAN_STALLED_MS', 5000), onEvent: send,
  });
  send({ type: 'ready', pid: process.pid });
  await new Promise<void>((resolve) => { process.once('SIGTERM', resolve); process.once('SIGINT', resolve); });
  await w.close();
  if (process.connected) process.disconnect();
  return 0;
}

if (isMain(import.meta.url)) await runCli('scan-queue-worker', main);
