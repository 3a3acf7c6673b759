/**
 * `pnpm bench:replay`: record cheap, analyse expensive. A ring-3 guest folds random port
 * values and DMA'd random bytes into memory; measured over 11 interleaved rounds (ratios per round, median and spread): a plain run, a recorded
 * run (overhead vs plain; issue target ≤ 1.2×), a replay without devices (speed vs record;
 * target ≥ 0.8×) and a replay under a `Monitor` with an exec hook on the loop head.
 * One table line per figure, then JSON.
 * @module
 */
import { createHash } from 'node:crypto';
import { Machine, tappable, kvmBackend, record, replay, type Recording } from '@tsvm/core';
import { REPLAY_GUEST_LOOP, attachReplayDevices, replayGuestSource } from '@tsvm/core/testing';
import { asm } from '@tsvm/core/asm';
import { Monitor } from '@tsvm/monitor';
import type { CalibrationTable } from '@tsvm/monitor';
import { hostCalibration, isMain } from '../src/support.js';

/** Rounds the guest runs: two exits (an `in`, an `out` that triggers DMA) each. */
export const ROUNDS = 200;
/** Guest-virtual address of the loop head (`round:`), where the analysis puts its exec hook. */
export const LOOP = REPLAY_GUEST_LOOP;

/** A machine with the guest loaded and its devices (random port, DMA engine, debug-exit) attached. */
export async function guest(recordable: boolean): Promise<Machine> {
  const vm = await Machine.create({ memory: 2 * 1024 * 1024, name: 'replay-bench', ...(recordable ? { backend: tappable(kvmBackend()) } : {}) });
  attachReplayDevices(vm);
  vm.loadFlat(await asm(replayGuestSource(ROUNDS), { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  return vm;
}

/** SHA-256 of all guest RAM. */
export const ramHash = (vm: Machine): string => createHash('sha256').update(vm.memory.read(0, vm.memory.totalSize)).digest('hex');

/** An analysis for replays: a `Monitor` with an exec hook on the loop head; counts its hits. */
export function execAnalysis(calibration: CalibrationTable | undefined): { setup: (m: Machine) => void; hits: () => number; mechanism: () => string } {
  let hits = 0;
  let mechanism = '';
  return {
    setup: (m) => {
      const mon = new Monitor(m, calibration ? { calibration } : {});
      mechanism = mon.observe({ event: 'exec', address: LOOP }, () => { hits++; }).mechanism;
    },
    hits: () => hits,
    mechanism: () => mechanism,
  };
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1] as number;
/** Interleaved rounds (`TSVM_BENCH_REPS`): each a plain run, a recorded one and two replays. */
const REPS = Number(process.env.TSVM_BENCH_REPS ?? 11);

async function main(): Promise<void> {
  const calibration = await hostCalibration();
  const plain: number[] = [];
  const rec: number[] = [];
  const rep: number[] = [];
  const heavy: number[] = [];
  let hits = 0;
  let mechanism = '';
  let same = true;
  for (let i = 0; i < REPS; i++) {
    {
      await using vm = await guest(false);
      const t = performance.now();
      await vm.run({ timeout: 30_000 });
      plain.push(performance.now() - t);
    }
    let recording: Recording;
    let hash: string;
    {
      await using vm = await guest(true);
      const t = performance.now();
      const r = await record(vm, { timeout: 30_000 });
      rec.push(performance.now() - t);
      recording = r;
      hash = ramHash(vm);
    }
    {
      const t = performance.now();
      const r = await replay(recording);
      rep.push(performance.now() - t);
      same &&= r.divergence === undefined && ramHash(r.machine) === hash;
      await r.machine.close();
    }
    {
      const a = execAnalysis(calibration);
      const t = performance.now();
      const r = await replay(recording, { monitor: a.setup });
      heavy.push(performance.now() - t);
      same &&= r.divergence === undefined;
      hits = a.hits();
      mechanism = a.mechanism();
      await r.machine.close();
    }
    recording.snapshot.close();
  }
  const p = median(plain);
  const r = median(rec);
  const q = median(rep);
  const h = median(heavy);
  const exits = ROUNDS * 2 + 1;
  // Ratios per round (the runs of a round are next to each other in time, so a slow patch of
  // this shared host moves both sides), then their median and spread.
  const overheads = rec.map((x, i) => x / (plain[i] as number));
  const speeds = rec.map((x, i) => x / (rep[i] as number));
  const spread = (xs: number[]): string => `[${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)}]`;
  const overhead = median(overheads);
  const speed = median(speeds);
  console.log(`replay bench (${exits} guest exits, ${ROUNDS} DMA writes, ring 3, median of ${REPS} interleaved rounds)`);
  console.log(`  plain run            ${p.toFixed(2)} ms`);
  console.log(`  record (snapshot+run) ${r.toFixed(2)} ms   overhead ${overhead.toFixed(3)}× ${spread(overheads)} plain (target ≤ 1.2×)`);
  console.log(`  replay, no devices   ${q.toFixed(2)} ms   speed ${speed.toFixed(3)}× ${spread(speeds)} record (target ≥ 0.8×)`);
  console.log(`  replay + exec hook   ${h.toFixed(2)} ms   ${hits} hits via ${mechanism}, ${(h / q).toFixed(1)}× a bare replay`);
  console.log(`  identical result: ${same}`);
  console.log(JSON.stringify({ bench: 'replay', exits, plainMs: p, recordMs: r, replayMs: q, replayExecHookMs: h, recordOverhead: overhead, replaySpeed: speed, overheads, speeds, execHits: hits, mechanism, identical: same }));
}

if (isMain(import.meta.url)) {
  main().catch((e: unknown) => { console.error(e); process.exitCode = 1; });
}
