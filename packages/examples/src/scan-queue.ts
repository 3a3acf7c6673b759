/**
 * Example — the scan example (`scan.ts`) scaled out on a real job queue: each sample is a
 * **BullMQ** job in **Redis**; worker processes (`scan-queue-worker.ts`, on this host or on
 * others pointed at the same Redis) each keep one snapshotted sandbox and run up to
 * `concurrency` jobs at once, each on a pooled machine (its own worker thread, reset between jobs) under a new monitor.
 *
 * Delivery is at-least-once: a worker that dies mid-job stops renewing the job's lock, another
 * worker's stalled-job check puts the job back, and it runs again. So a result can be produced
 * twice; the results store makes that harmless: a Redis hash, one field per job id, written
 * with `HSETNX` (the first result wins, a later one is counted and dropped). Each result carries
 * the verdict and the sample's hash-chained audit log (lines and head), which the reader
 * verifies. The producer ({@link collectResults}) also reconciles: a job that has no result
 * and is no longer in the queue (Redis restarted without persistence, or a job failed all its
 * attempts) is added again, so no sample is lost; every Redis error it rode out is reported.
 *
 *   pnpm example:scan-queue            # REDIS_URL (default redis://127.0.0.1:6379)
 *
 * starts two worker processes on this host, enqueues every sample, prints verdicts and jobs/s.
 * @module
 */
import { fork, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { Queue, type JobsOptions } from 'bullmq';
import { Redis } from 'ioredis';
import { InvalidArgumentError, TsvmError } from '@tsvm/core';
import { verifyAuditLog } from '@tsvm/monitor';
import type { Verdict } from './scan-monitor.js';
import { SAMPLES } from './scan-samples.js';
import { isMain, runCli } from './support.js';

/** Where the example looks for Redis unless `REDIS_URL` says otherwise. */
export const DEFAULT_REDIS_URL = 'redis://127.0.0.1:6379';
/** Default BullMQ queue name. */
export const DEFAULT_QUEUE = 'tsvm-scan';

/** Redis could not be reached (or answered nothing) within the connect timeout. */
export class QueueUnavailableError extends TsvmError {
  /** The Redis URL tried. */
  readonly url: string;

  /**
   * @param url - the Redis URL tried.
   * @param cause - the client's error.
   */
  constructor(url: string, cause: unknown) {
    super('TSVM_QUEUE_UNAVAILABLE', `Redis at ${url} is unreachable (${cause instanceof Error ? cause.message : String(cause)}); start one (redis-server) or set REDIS_URL`, { cause });
    this.url = url;
  }
}

/** What one job asks: run sample `sample` (a name in {@link SAMPLES}); `id` names the result. */
export interface ScanJob {
  /** The run this job belongs to (set by {@link enqueueScan}). */
  readonly runId?: string;
  /** Unique id of this job within its run (the results-hash field). */
  readonly id: string;
  /** Name of the sample to run. */
  readonly sample: string;
}

/** What a worker stores for one job. */
export interface ScanResult {
  /** The job's id. */
  readonly id: string;
  /** The sample's name. */
  readonly sample: string;
  /** The monitor's verdict. */
  readonly verdict: Verdict;
  /** Why the run stopped. */
  readonly stop: string;
  /** The sample's console output. */
  readonly printed: string;
  /** Kinds and descriptions of the forbidden acts the monitor stopped. */
  readonly findings: ReadonlyArray<{ readonly kind: string; readonly detail: string }>;
  /** The sample's hash-chained audit log. */
  readonly audit: { readonly head: string; readonly lines: readonly string[] };
  /**
   * Which worker produced it: host name, process id, and the pooled machine's worker thread and
   * how many jobs that machine had run (reset in between) with this one.
   */
  readonly worker: { readonly host: string; readonly pid: number; readonly thread?: number; readonly machineRuns?: number };
  /** BullMQ's attempt number when it was produced (1 = first delivery). */
  readonly attempt: number;
  /** Wall time of the run in the worker (ms). */
  readonly ms: number;
}

/** Redis keys of one run. */
export interface RunKeys {
  /** Hash: job id → JSON {@link ScanResult} (HSETNX: first result wins). */
  readonly results: string;
  /** Hash: job id → how many times a worker started it. */
  readonly deliveries: string;
  /** Hash: job id → how many later results were dropped because one was stored already. */
  readonly duplicates: string;
}

/** The keys of run `runId` on queue `queue`. */
export function runKeys(queue: string, runId: string): RunKeys {
  const base = `${queue}:run:${runId}`;
  return { results: `${base}:results`, deliveries: `${base}:deliveries`, duplicates: `${base}:duplicates` };
}

/** Options of the clients this example makes. */
export interface RedisClientOptions {
  /** Milliseconds to wait for the first connection (default 2000). */
  readonly connectTimeout?: number;
}

/**
 * A client for BullMQ and the results store: reconnects forever (a restarted Redis is picked up
 * again) and queues commands while disconnected (`maxRetriesPerRequest: null`, as BullMQ wants).
 */
export function redisClient(url: string): Redis {
  return new Redis(url, { maxRetriesPerRequest: null, retryStrategy: (n) => Math.min(50 * n, 1000) });
}

/** Connects once to `url` and pings; a {@link QueueUnavailableError} when nothing answers. */
export async function assertRedisReachable(url: string, options: RedisClientOptions = {}): Promise<void> {
  if (typeof url !== 'string' || !/^rediss?:\/\//.test(url)) throw new InvalidArgumentError('url', `must be a redis:// URL, got ${String(url)}`);
  const probe = new Redis(url, { lazyConnect: true, connectTimeout: options.connectTimeout ?? 2000, retryStrategy: () => null, maxRetriesPerRequest: 0, enableOfflineQueue: false });
  let seen: unknown;
  probe.on('error', (e) => { seen ??= e; });
  try {
    await probe.connect();
    await probe.ping();
  } catch (e) {
    // The socket's own error (ECONNREFUSED, ENOTFOUND, ...) says more than "Connection is closed".
    throw new QueueUnavailableError(url, seen ?? e);
  } finally {
    probe.disconnect();
  }
}

/**
 * Stores `result` unless this job already has one. Returns true when it was stored, false when
 * an earlier delivery's result was there (then the duplicate is counted, not stored).
 */
export async function storeResult(redis: Redis, keys: RunKeys, result: ScanResult): Promise<boolean> {
  const stored = await redis.hsetnx(keys.results, result.id, JSON.stringify(result));
  if (stored === 1) return true;
  await redis.hincrby(keys.duplicates, result.id, 1);
  return false;
}

/** Every stored result of a run, by job id. */
export async function readResults(redis: Redis, keys: RunKeys): Promise<Map<string, ScanResult>> {
  const all = await redis.hgetall(keys.results);
  return new Map(Object.entries(all).map(([id, json]) => [id, JSON.parse(json) as ScanResult]));
}

/** Options of {@link enqueueScan}. */
export interface EnqueueOptions {
  /** Redis URL. */
  readonly url: string;
  /** Queue name (default {@link DEFAULT_QUEUE}). */
  readonly queue?: string;
  /** Run id (default: a random UUID); BullMQ job ids are `<runId>.<job id>`. */
  readonly runId?: string;
  /** The jobs; default: one per sample of {@link SAMPLES}, id = sample name. */
  readonly jobs?: readonly ScanJob[];
  /** Deliveries per job before BullMQ gives up on it (default 5; the producer's reconcile adds it again). */
  readonly attempts?: number;
}

/** A run in progress: its queue, keys and jobs. */
export interface ScanRun {
  /** Queue name. */
  readonly queue: string;
  /** Run id. */
  readonly runId: string;
  /** Redis keys of the run. */
  readonly keys: RunKeys;
  /** The jobs enqueued. */
  readonly jobs: readonly ScanJob[];
  /** Job options used (also by reconciliation). */
  readonly jobOptions: JobsOptions;
}

/** BullMQ's id of job `id` of run `runId` (BullMQ ids may not contain `:`). */
export const bullId = (runId: string, id: string): string => `${runId}.${id}`;

const knownSamples = new Set(SAMPLES.map((s) => s.name));

/** Enqueues one BullMQ job per {@link ScanJob}; job ids make adding the same job twice a no-op. */
export async function enqueueScan(options: EnqueueOptions): Promise<ScanRun> {
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  const queue = options.queue ?? DEFAULT_QUEUE;
  const runId = options.runId ?? randomUUID();
  const jobs = options.jobs ?? SAMPLES.map((s) => ({ id: s.name, sample: s.name }));
  const ids = new Set<string>();
  for (const j of jobs) {
    if (!knownSamples.has(j.sample)) throw new InvalidArgumentError('jobs', `no sample is named ${JSON.stringify(j.sample)}`);
    if (typeof j.id !== 'string' || j.id.length === 0 || j.id.includes(':')) throw new InvalidArgumentError('jobs', `a job id must be a non-empty string without ':', got ${JSON.stringify(j.id)}`);
    if (ids.has(j.id)) throw new InvalidArgumentError('jobs', `two jobs have the id ${JSON.stringify(j.id)}`);
    ids.add(j.id);
  }
  await assertRedisReachable(options.url);
  const jobOptions: JobsOptions = { attempts: options.attempts ?? 5, backoff: { type: 'exponential', delay: 200 }, removeOnComplete: false, removeOnFail: false };
  const run: ScanRun = { queue, runId, keys: runKeys(queue, runId), jobs, jobOptions };
  const connection = redisClient(options.url);
  const q = new Queue(queue, { connection });
  try {
    await q.addBulk(jobs.map((j) => ({ name: 'scan', data: { ...j, runId }, opts: { ...jobOptions, jobId: bullId(runId, j.id) } })));
  } finally {
    await q.close();
    connection.disconnect();
  }
  return run;
}

/** What {@link collectResults} gathered. */
export interface CollectedRun {
  /** One result per job id (complete unless `missing` is not empty). */
  readonly results: Map<string, ScanResult>;
  /** Job ids without a result at the deadline. */
  readonly missing: string[];
  /** Redis errors the producer rode out (with the time since the start, ms): the failure report. */
  readonly redisErrors: string[];
  /** Jobs added again because they had no result and were no longer queued. */
  readonly reenqueued: string[];
  /** Per job id, how many times a worker started it (> 1: it was retried). */
  readonly deliveries: Map<string, number>;
  /** Per job id, results dropped because one was already stored. */
  readonly duplicates: Map<string, number>;
  /** From the call to the last result (ms). */
  readonly elapsedMs: number;
}

/** Options of {@link collectResults}. */
export interface CollectOptions {
  /** Redis URL. */
  readonly url: string;
  /** Give up after this many ms (default 120 000). */
  readonly timeoutMs?: number;
  /** Poll period (default 100 ms). */
  readonly pollMs?: number;
  /** How often jobs without results are checked and re-added when gone (default 2000 ms). */
  readonly reconcileMs?: number;
}

/**
 * Waits until every job of `run` has a result (or the deadline). Rides out Redis errors (they
 * are reported in `redisErrors`) and re-adds jobs that have no result and are no longer in the
 * queue (lost with a restarted Redis, or failed all attempts).
 */
export async function collectResults(run: ScanRun, options: CollectOptions): Promise<CollectedRun> {
  const t0 = performance.now();
  const timeoutMs = options.timeoutMs ?? 120_000;
  const pollMs = options.pollMs ?? 100;
  const reconcileMs = options.reconcileMs ?? 2000;
  const redis = redisClient(options.url);
  const redisErrors: string[] = [];
  const reenqueued: string[] = [];
  const note = (e: unknown): void => {
    const line = `${(performance.now() - t0).toFixed(0)} ms: ${e instanceof Error ? e.message : String(e)}`;
    if (redisErrors.at(-1)?.replace(/^\d+ ms: /, '') !== line.replace(/^\d+ ms: /, '')) redisErrors.push(line);
  };
  redis.on('error', note);
  const qConnection = redis.duplicate();
  qConnection.on('error', note);
  const q = new Queue(run.queue, { connection: qConnection });
  q.on('error', note);
  let results = new Map<string, ScanResult>();
  let lastReconcile = performance.now();
  let elapsedMs = 0;
  try {
    while (performance.now() - t0 < timeoutMs) {
      try {
        results = await readResults(redis, run.keys);
        elapsedMs = performance.now() - t0;
        if (run.jobs.every((j) => results.has(j.id))) break;
        if (performance.now() - lastReconcile >= reconcileMs) {
          lastReconcile = performance.now();
          for (const j of run.jobs) {
            if (results.has(j.id)) continue;
            const jobId = bullId(run.runId, j.id);
            const state = await q.getJobState(jobId);
            if (state === 'unknown') {
              await q.add('scan', { ...j, runId: run.runId }, { ...run.jobOptions, jobId });
              reenqueued.push(j.id);
            } else if (state === 'failed') {
              await (await q.getJob(jobId))?.retry('failed');
              reenqueued.push(j.id);
            }
          }
        }
      } catch (e) {
        note(e);
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
    const counts = async (key: string): Promise<Map<string, number>> => {
      try {
        return new Map(Object.entries(await redis.hgetall(key)).map(([k, v]) => [k, Number(v)]));
      } catch (e) {
        note(e);
        return new Map();
      }
    };
    return {
      results, missing: run.jobs.filter((j) => !results.has(j.id)).map((j) => j.id), redisErrors, reenqueued,
      deliveries: await counts(run.keys.deliveries), duplicates: await counts(run.keys.duplicates), elapsedMs,
    };
  } finally {
    await q.close().catch(() => undefined);
    qConnection.disconnect();
    redis.disconnect();
  }
}

/** Whether `r`'s audit chain verifies against its head (and is not empty). */
export function auditVerifies(r: ScanResult): boolean {
  return r.audit.lines.length > 0 && verifyAuditLog(r.audit.lines, { head: r.audit.head }).ok;
}

/** Options of {@link startWorkerProcess}. */
export interface WorkerProcessOptions {
  /** Redis URL. */
  readonly url: string;
  /** Queue name (default {@link DEFAULT_QUEUE}). */
  readonly queue?: string;
  /** Jobs at once in the process = machines in its pool (default 2). */
  readonly concurrency?: number;
  /** Run deadline per sample (ms, default 300). */
  readonly sampleTimeoutMs?: number;
  /** BullMQ lock duration (ms, default 10 000): how long a dead worker's job stays locked. */
  readonly lockDuration?: number;
  /** BullMQ stalled-job check period (ms, default 5000). */
  readonly stalledInterval?: number;
}

/** Messages a worker process sends its parent over IPC. */
export type WorkerMessage =
  | { readonly type: 'ready'; readonly pid: number }
  | { readonly type: 'active'; readonly pid: number; readonly id: string; readonly sample: string; readonly attempt: number }
  | { readonly type: 'completed'; readonly pid: number; readonly id: string; readonly stored: boolean }
  | { readonly type: 'error'; readonly pid: number; readonly message: string };

/** A worker process started by {@link startWorkerProcess}. */
export interface WorkerProcess {
  /** The child process. */
  readonly child: ChildProcess;
  /** Resolves once its BullMQ worker is running (sandbox snapshotted); rejects if it exits first. */
  readonly ready: Promise<void>;
  /** Every message it sent, in order. */
  readonly messages: WorkerMessage[];
  /** Resolves with the exit code (or signal) when it ends. */
  readonly exited: Promise<number | NodeJS.Signals>;
}

/** Starts `scan-queue-worker.ts` as a child process (`node --import tsx`) with options in its environment. */
export function startWorkerProcess(options: WorkerProcessOptions): WorkerProcess {
  const env: NodeJS.ProcessEnv = {
    ...process.env, REDIS_URL: options.url, TSVM_SCAN_QUEUE: options.queue ?? DEFAULT_QUEUE,
    TSVM_SCAN_CONCURRENCY: String(options.concurrency ?? 2), TSVM_SCAN_SAMPLE_TIMEOUT: String(options.sampleTimeoutMs ?? 300),
    TSVM_SCAN_LOCK_MS: String(options.lockDuration ?? 10_000), TSVM_SCAN_STALLED_MS: String(options.stalledInterval ?? 5000),
  };
  const child = fork(new URL('./scan-queue-worker.ts', import.meta.url), [], { env, execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const messages: WorkerMessage[] = [];
  const exited = new Promise<number | NodeJS.Signals>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? code ?? 0)));
  const ready = new Promise<void>((resolve, reject) => {
    child.on('message', (m: WorkerMessage) => {
      messages.push(m);
      if (m.type === 'ready') resolve();
    });
    void exited.then((how) => reject(new Error(`the scan worker exited (${String(how)}) before it was ready`)));
  });
  ready.catch(() => undefined);
  return { child, ready, messages, exited };
}

/** Two local worker processes, every sample enqueued; prints verdicts and jobs/s. 0 when all are as expected. */
export async function main(): Promise<number> {
  const url = process.env.REDIS_URL ?? DEFAULT_REDIS_URL;
  await assertRedisReachable(url);
  const queue = `${DEFAULT_QUEUE}-${process.pid}`;
  const workers = [0, 1].map(() => startWorkerProcess({ url, queue }));
  try {
    await Promise.all(workers.map((w) => w.ready));
    const run = await enqueueScan({ url, queue });
    const got = await collectResults(run, { url, timeoutMs: 120_000 });
    const expected = new Map(SAMPLES.map((s) => [s.name, s.expected]));
    console.log(`${run.jobs.length} jobs on BullMQ queue '${queue}' at ${url}, 2 worker processes\n`);
    console.log('| job | verdict | expected | worker pid | attempt | audit |\n|---|---|---|---|---|---|');
    let ok = got.missing.length === 0;
    for (const j of run.jobs) {
      const r = got.results.get(j.id);
      if (!r) { console.log(`| ${j.id} | MISSING | ${expected.get(j.sample)} | | | |`); continue; }
      const good = r.verdict === expected.get(j.sample) && auditVerifies(r);
      ok &&= good;
      console.log(`| ${j.id} | ${r.verdict} | ${good ? '✓' : `✗ ${expected.get(j.sample)}`} | ${r.worker.pid} | ${r.attempt} | ${r.audit.lines.length} lines, head ${r.audit.head.slice(0, 12)}… ${auditVerifies(r) ? 'verified' : 'BROKEN'} |`);
    }
    console.log(`\n${got.results.size} results in ${got.elapsedMs.toFixed(0)} ms = ${((1000 * got.results.size) / got.elapsedMs).toFixed(1)} jobs/s`);
    if (got.redisErrors.length > 0) console.log(`Redis errors ridden out:\n  ${got.redisErrors.join('\n  ')}`);
    console.log(ok ? '\nOK: one result per job, every verdict as expected, every audit chain verifies' : '\nFAILED');
    return ok ? 0 : 1;
  } finally {
    for (const w of workers) w.child.kill('SIGTERM');
    await Promise.all(workers.map((w) => w.exited));
  }
}

if (isMain(import.meta.url)) {
  await runCli('scan-queue', async () => {
    try {
      return await main();
    } catch (e) {
      if (e instanceof QueueUnavailableError) {
        console.error(`scan-queue: ${e.message}`);
        return 3;
      }
      throw e;
    }
  });
}
