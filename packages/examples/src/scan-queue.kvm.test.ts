import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '@tsvm/core';
import { kvmAvailability } from '@tsvm/core/testing';
import { verifyAuditLog } from '@tsvm/monitor';
import { SAMPLES } from './scan-samples.js';
import { assertRedisReachable, collectResults, enqueueScan, QueueUnavailableError, redisClient, startWorkerProcess, storeResult, runKeys, type ScanJob, type ScanResult, type WorkerProcess } from './scan-queue.js';
import { findRedisServer, freePort, startPrivateRedis, type PrivateRedis } from './scan-queue-redis.js';

const kvm = kvmAvailability();
const redisBin = findRedisServer();
const skip = !kvm.available ? kvm.reason : !redisBin ? 'redis-server is not installed (pnpm test installs it as root on Debian)' : undefined;
const expected = new Map(SAMPLES.map((s) => [s.name, s.expected]));
const SPINNERS = new Set(['spin', 'print-then-spin']);
// Spinners run this long, so a worker killed on one is surely mid-job.
const SAMPLE_TIMEOUT_MS = 1500;
const QUEUE = 'scan-test';

describe('scan-queue: bad input without KVM', () => {
  it('unreachable Redis is a QueueUnavailableError that names the URL', async () => {
    const url = `redis://127.0.0.1:${await freePort()}`;
    await expect(assertRedisReachable(url, { connectTimeout: 500 })).rejects.toThrow(QueueUnavailableError);
    await expect(enqueueScan({ url })).rejects.toThrow(new RegExp(`Redis at ${url} is unreachable`));
    await expect(assertRedisReachable('http://x')).rejects.toThrow(InvalidArgumentError);
  });

  it('unknown samples and duplicate or bad job ids are refused before Redis is touched', async () => {
    const url = 'redis://127.0.0.1:1';
    await expect(enqueueScan({ url, jobs: [{ id: 'a', sample: 'nope' }] })).rejects.toThrow(/no sample is named "nope"/);
    await expect(enqueueScan({ url, jobs: [{ id: 'a', sample: 'hello' }, { id: 'a', sample: 'spin' }] })).rejects.toThrow(/two jobs have the id "a"/);
    await expect(enqueueScan({ url, jobs: [{ id: 'a:b', sample: 'hello' }] })).rejects.toThrow(InvalidArgumentError);
  });
});

describe.skipIf(skip !== undefined)(`example: scan on BullMQ${skip ? ` (SKIPPED: ${skip})` : ''}`, () => {
  let redis: PrivateRedis;
  let workers: WorkerProcess[] = [];
  const startWorker = async (): Promise<WorkerProcess> => {
    const w = startWorkerProcess({ url: redis.url, queue: QUEUE, concurrency: 2, sampleTimeoutMs: SAMPLE_TIMEOUT_MS, lockDuration: 3000, stalledInterval: 1000 });
    workers.push(w);
    await w.ready;
    return w;
  };
  beforeAll(async () => {
    redis = await startPrivateRedis(redisBin as string);
    await Promise.all([startWorker(), startWorker()]);
  }, 120_000);
  afterAll(async () => {
    for (const w of workers) if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill('SIGKILL');
    await Promise.all(workers.map((w) => w.exited));
    await redis?.stop();
  });

  const checkResults = (jobs: readonly ScanJob[], results: Map<string, ScanResult>): void => {
    expect([...results.keys()].sort()).toEqual(jobs.map((j) => j.id).sort());
    for (const j of jobs) {
      const r = results.get(j.id) as ScanResult;
      expect([j.id, r.verdict], j.id).toEqual([j.id, expected.get(j.sample)]);
      expect(r.audit.lines.length, j.id).toBeGreaterThan(0);
      expect(verifyAuditLog(r.audit.lines, { head: r.audit.head }), j.id).toEqual({ ok: true, count: r.audit.lines.length, head: r.audit.head });
    }
  };

  it('the results store keeps the first result of a job and counts a later one', async () => {
    const c = redisClient(redis.url);
    try {
      const keys = runKeys(QUEUE, 'store-test');
      const r = { id: 'x', sample: 'hello', verdict: 'benign', stop: 'debug-exit', printed: '', findings: [], audit: { head: 'h', lines: ['l'] }, worker: { host: 'h', pid: 1 }, attempt: 1, ms: 1 } as const;
      expect(await storeResult(c, keys, r)).toBe(true);
      expect(await storeResult(c, keys, { ...r, attempt: 2, verdict: 'timeout' })).toBe(false);
      expect(JSON.parse((await c.hget(keys.results, 'x')) as string)).toMatchObject({ attempt: 1, verdict: 'benign' });
      expect(await c.hget(keys.duplicates, 'x')).toBe('1');
    } finally {
      c.disconnect();
    }
  });

  it('a worker SIGKILLed mid-job: its jobs are retried by the other, every job has exactly one result, verdicts and audit chains hold', async () => {
    const [a, b] = workers as [WorkerProcess, WorkerProcess];
    // Spinners first: the first four jobs run 1.5 s each, so each worker holds two of them.
    const spinners: ScanJob[] = [{ id: 'spin', sample: 'spin' }, { id: 'print-then-spin', sample: 'print-then-spin' }, { id: 'spin-2', sample: 'spin' }, { id: 'print-then-spin-2', sample: 'print-then-spin' }];
    const jobs = [...spinners, ...SAMPLES.filter((s) => !SPINNERS.has(s.name)).map((s) => ({ id: s.name, sample: s.name }))];
    expect(jobs.length).toBeGreaterThanOrEqual(20);
    const run = await enqueueScan({ url: redis.url, queue: QUEUE, jobs });
    const activeOf = (w: WorkerProcess): string[] => {
      const done = new Set(w.messages.flatMap((m) => (m.type === 'completed' ? [m.id] : [])));
      return w.messages.flatMap((m) => (m.type === 'active' && !done.has(m.id) ? [m.id] : []));
    };
    const deadline = Date.now() + 30_000;
    while (!activeOf(a).some((id) => id.includes('spin')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 200));
    const killed = activeOf(a);
    expect(killed.some((id) => id.includes('spin'))).toBe(true);
    a.child.kill('SIGKILL');
    expect(await a.exited).toBe('SIGKILL');

    const got = await collectResults(run, { url: redis.url, timeoutMs: 90_000 });
    expect(got.missing).toEqual([]);
    checkResults(jobs, got.results);
    for (const id of killed) {
      // Started by the killed worker, finished by the other one: delivered at least twice, stored once.
      expect(got.results.get(id)?.worker.pid, id).toBe(b.child.pid);
      expect(got.deliveries.get(id), id).toBeGreaterThanOrEqual(2);
      expect(got.results.get(id)?.attempt, id).toBeGreaterThanOrEqual(2);
    }
    // Each worker process ran its jobs in its pool: at most `concurrency` (2) machine threads, each
    // machine reused (reset between jobs) rather than made per job.
    const ofB = [...got.results.values()].filter((r) => r.worker.pid === b.child.pid);
    const threads = new Set(ofB.map((r) => r.worker.thread));
    expect(threads.size).toBeGreaterThanOrEqual(1);
    expect(threads.size).toBeLessThanOrEqual(2);
    for (const t of threads) expect(t).toBeGreaterThan(0);
    expect(Math.max(...ofB.map((r) => r.worker.machineRuns ?? 0))).toBeGreaterThan(1);
    // No result is stored twice: the hash has one field per job (checked above), and no retry of a killed job found one already.
    for (const id of killed) expect(got.duplicates.get(id) ?? 0, id).toBe(0);
    expect(got.redisErrors).toEqual([]);
  }, 150_000);

  it('Redis restarted mid-run (its data lost): the producer reports the outage, re-adds lost jobs, and every job ends with one result', async () => {
    await startWorker(); // replaces the worker killed above
    const jobs = SAMPLES.map((s) => ({ id: s.name, sample: s.name }));
    const run = await enqueueScan({ url: redis.url, queue: QUEUE, jobs });
    const collecting = collectResults(run, { url: redis.url, timeoutMs: 90_000, reconcileMs: 1000 });
    const c = redisClient(redis.url);
    c.on('error', () => undefined);
    const deadline = Date.now() + 30_000;
    while ((await c.hlen(run.keys.results)) < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    c.disconnect();
    await redis.kill();
    await new Promise((r) => setTimeout(r, 500));
    await redis.start();
    const got = await collecting;
    expect(got.missing).toEqual([]);
    checkResults(jobs, got.results);
    expect(got.redisErrors.length).toBeGreaterThan(0);
    expect(got.reenqueued.length).toBeGreaterThan(0);
  }, 150_000);
});
