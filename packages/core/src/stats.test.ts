import { afterEach, describe, expect, it, vi } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend, outExit } from './testing/mock.js';
import { TIMING_SAMPLE, timingGap } from './stats.js';

const PORT = 0x500;

/**
 * A machine on the mock whose exits take a scripted time on a fake clock: exit i spends
 * `runUs(i)` µs in `run()` and `handleUs(i)` µs in the device. Stops after `n` exits.
 */
async function timedRun(n: number, runUs: (i: number) => number, handleUs: (i: number) => number) {
  let clock = 0; // ms, what performance.now() returns
  vi.spyOn(performance, 'now').mockImplementation(() => clock);
  const backend = new MockBackend();
  const vcpu = backend.script();
  let ran = 0;
  vcpu.whenEmpty = outExit(PORT, 1);
  for (let i = 0; i < n; i++) vcpu.script(() => { clock += runUs(i) / 1000; return outExit(PORT, 1); });
  const vm = await Machine.create({ memory: 64 * 1024, backend });
  let handled = 0;
  vm.io.register({ port: PORT, size: 1 }, {
    name: 'timed', write: (_o, _v, _s, a) => {
      clock += handleUs(handled) / 1000;
      if (++handled === n) a.requestStop({ reason: 'debug-exit', code: 0 });
    },
  });
  const stop = await vm.run({ sliceMs: 1000 });
  ran = handled;
  const st = vm.stats();
  await vm.close();
  return { stop, ran, io: st.byKind.io, total: st.total };
}

afterEach(() => { vi.restoreAllMocks(); });

describe('sampled exit timing (Horvitz–Thompson)', () => {
  it('draws geometric gaps with mean TIMING_SAMPLE', () => {
    const n = 200_000;
    let sum = 0, ones = 0, min = Infinity, integers = true;
    for (let i = 0; i < n; i++) { const g = timingGap(); sum += g; if (g === 1) ones++; min = Math.min(min, g); integers &&= Number.isInteger(g); }
    expect(integers).toBe(true);
    expect(min).toBe(1);
    // Mean 16, sd 15.5: the mean of 200k draws is within ±0.2 at 6 sigma.
    expect(Math.abs(sum / n - TIMING_SAMPLE)).toBeLessThan(0.2);
    expect(Math.abs(ones / n - 1 / TIMING_SAMPLE)).toBeLessThan(0.004);
  });

  it('counts every exit exactly and estimates run and handle time without bias, even when exit times alternate', async () => {
    // Alternating 1 µs / 9 µs runs: a sampler taking every 16th exit would see only one parity
    // and be off by a factor 1.8 or 0.2; independent sampling is not.
    const n = 40_000;
    const r = await timedRun(n, (i) => (i % 2 === 0 ? 1 : 9), (i) => (i % 2 === 0 ? 0.5 : 2.5));
    expect(r.stop.reason).toBe('debug-exit');
    expect(r.ran).toBe(n);
    expect(r.io.count).toBe(n);
    expect(r.total).toBe(n);
    const trueRunNs = (n / 2) * 10_000, trueHandleNs = (n / 2) * 3_000;
    // Relative error ~ sqrt(15/n) * (spread of the two kinds) ≈ 3 %: 15 % is several sigma.
    expect(Math.abs(r.io.runNs / trueRunNs - 1)).toBeLessThan(0.15);
    expect(Math.abs(r.io.handleNs / trueHandleNs - 1)).toBeLessThan(0.15);
    // And it did sample: an estimate from every exit would be exact.
    expect(r.io.runNs).not.toBeCloseTo(trueRunNs, 0);
  });

  it('times every exit exactly when exits are slow (≥ 20 µs apart)', async () => {
    const n = 500;
    const r = await timedRun(n, (i) => 30 + (i % 7), () => 4);
    let trueRun = 0;
    for (let i = 0; i < n; i++) trueRun += (30 + (i % 7)) * 1000;
    expect(r.io.count).toBe(n);
    expect(r.io.runNs / trueRun).toBeCloseTo(1, 9);
    expect(r.io.handleNs / (n * 4000)).toBeCloseTo(1, 9);
  });

  it('times the first exit of a run exactly', async () => {
    const r = await timedRun(1, () => 5, () => 2);
    expect(r.io.count).toBe(1);
    expect(r.io.runNs).toBeCloseTo(5000, 6);
    expect(r.io.handleNs).toBeCloseTo(2000, 6);
  });
});
