/**
 * Example — a malware-scan loop on disposable machines (issue 11: the seed's use, end to end).
 * One sandbox machine is built and snapshotted once, with its loader paused just before it reads
 * the disk (`scan-sandbox.ts`). Each sample (`scan-samples.ts`: benign programs, self-modifying
 * code, forbidden ports, wild writes, spinning, crashes) is delivered as the contents of the
 * sandbox's virtio-blk disk and runs in a fresh copy-on-write fork of the snapshot, or in one
 * machine reset to the snapshot between samples (dirty pages re-copied). A new monitor per
 * sample mediates everything the sample may not do (`scan-monitor.ts`); its verdict comes from
 * what the monitor saw, and each sample's hash-chained audit log is verified.
 *
 *   pnpm example:scan
 *
 * @module
 */
import { InvalidArgumentError, Machine, type Snapshot, type Stop, type StopReason } from '@tsvm/core';
import { MemoryBacking } from '@tsvm/devices';
import { Monitor, verifyAuditLog, type AuditVerification } from '@tsvm/monitor';
import { attachSandboxDevices, buildTemplate, diskImage, DISK_SIZE, type SandboxIo } from './scan-sandbox.js';
import { verdictOf, watchSandbox, type AuditChain, type Finding, type Verdict, type Watch } from './scan-monitor.js';
import { SAMPLES, assembleSamples, type AssembledSample, type Sample } from './scan-samples.js';
import { isMain, runCli } from './support.js';

/** How each sample gets a clean machine. */
export type ScanMode = 'fork' | 'reset';

/** What the scan found about one sample. */
export interface SampleReport {
  /** Sample name. */
  readonly name: string;
  /** The verdict the sample's definition expects (not seen by the monitor). */
  readonly expected: Verdict;
  /** The monitor's verdict. */
  readonly verdict: Verdict;
  /** Forbidden acts the monitor stopped. */
  readonly findings: readonly Finding[];
  /** Why the run stopped. */
  readonly stop: StopReason;
  /** The sample's console output. */
  readonly printed: string;
  /** Payload bytes the disk delivered into the code area (seen as DMA by the monitor). */
  readonly delivered: number;
  /** The child's audit log. */
  readonly audit: AuditChain;
  /** The audit chain, verified against its head. */
  readonly verification: AuditVerification;
  /** Wall time for this sample: fork or reset, monitor set-up, run, teardown (ms). */
  readonly ms: number;
}

/** What one scan of all samples found. */
export interface ScanReport {
  /** How machines were made clean. */
  readonly mode: ScanMode;
  /** Per sample, in order. */
  readonly samples: readonly SampleReport[];
  /** Wall time of the loop (ms), sandbox creation excluded. */
  readonly elapsedMs: number;
  /** `samples.length / elapsed`. */
  readonly samplesPerSecond: number;
  /** Reset mode: pages re-copied by all resets. */
  readonly pagesCopied: number;
}

/** Options of {@link Sandbox.scan}. */
export interface ScanOptions {
  /** Fork per sample or reset one machine between samples. */
  readonly mode: ScanMode;
  /** Run deadline per sample (ms); a sample still running then is `timeout`. Default 50. */
  readonly timeoutMs?: number;
  /** Fork mode: empty VMs kept ready by `Snapshot.prewarm` (default 2; 0 = none). */
  readonly prewarm?: number;
}

/** The snapshotted sandbox and the assembled samples. */
export class Sandbox {
  /** The sandbox at its loader's pause point. */
  readonly snapshot: Snapshot;
  /** Guest address of the loader's queue-notify instruction. */
  readonly notifyAt: number;

  private constructor(snapshot: Snapshot, notifyAt: number) {
    this.snapshot = snapshot;
    this.notifyAt = notifyAt;
  }

  /** Builds the template machine, runs its loader to the pause point, snapshots it, closes it. */
  static async create(): Promise<Sandbox> {
    const { vm, notifyAt } = await buildTemplate((regions) => Machine.create({ memory: regions, name: 'scan-sandbox' }));
    try {
      return new Sandbox(await vm.snapshot(), notifyAt);
    } finally {
      await vm.close();
    }
  }

  /** Assembles `samples` (default: all of {@link SAMPLES}) for this sandbox. */
  assemble(samples: readonly Sample[] = SAMPLES): Promise<AssembledSample[]> {
    return assembleSamples(samples, this.notifyAt);
  }

  /** Runs every sample in a clean machine and returns the verdicts. */
  async scan(samples: readonly AssembledSample[], options: ScanOptions): Promise<ScanReport> {
    if (!Array.isArray(samples)) throw new InvalidArgumentError('samples', 'must be an array of assembled samples (Sandbox.assemble)');
    if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    if (options.mode !== 'fork' && options.mode !== 'reset') throw new InvalidArgumentError('options.mode', `must be 'fork' or 'reset', got ${String(options.mode)}`);
    const timeoutMs = options.timeoutMs ?? 50;
    if (typeof timeoutMs !== 'number' || !Number.isFinite(timeoutMs) || timeoutMs <= 0) throw new InvalidArgumentError('options.timeoutMs', `must be a positive number of milliseconds, got ${String(timeoutMs)}`);
    const reports: SampleReport[] = [];
    let pagesCopied = 0;
    if (options.mode === 'fork') {
      this.snapshot.prewarm(options.prewarm ?? 2);
      const t0 = performance.now();
      for (const s of samples) {
        const t = performance.now();
        let io: SandboxIo | undefined;
        const vm = await Machine.fork(this.snapshot, { name: `scan:${s.name}`, setup: (m) => { io = attachSandboxDevices(m, new MemoryBacking(diskImage(s.code))); } });
        try {
          reports.push(await runSample(vm, io as SandboxIo, s, timeoutMs, true, t));
        } finally {
          await vm.close();
        }
      }
      const elapsedMs = performance.now() - t0;
      this.snapshot.prewarm(0);
      return { mode: 'fork', samples: reports, elapsedMs, samplesPerSecond: (1000 * samples.length) / elapsedMs, pagesCopied };
    }
    // One disk whose image is rewritten per sample: a reset machine keeps its device objects.
    const disk = new Uint8Array(DISK_SIZE);
    let io: SandboxIo | undefined;
    const vm = await Machine.fork(this.snapshot, { name: 'scan:reset', setup: (m) => { io = attachSandboxDevices(m, new MemoryBacking(disk)); } });
    try {
      const t0 = performance.now();
      for (const [i, s] of samples.entries()) {
        const t = performance.now();
        if (i > 0) pagesCopied += vm.reset().pagesCopied;
        disk.set(diskImage(s.code));
        (io as SandboxIo).clearOutput();
        // Not sealed: the next sample's monitor replaces this one on the same machine.
        reports.push(await runSample(vm, io as SandboxIo, s, timeoutMs, false, t));
      }
      const elapsedMs = performance.now() - t0;
      return { mode: 'reset', samples: reports, elapsedMs, samplesPerSecond: (1000 * samples.length) / elapsedMs, pagesCopied };
    } finally {
      await vm.close();
    }
  }

  /** Releases the snapshot. Idempotent. */
  close(): void {
    this.snapshot.close();
  }
}

/** One sample on a clean machine under a new monitor. */
async function runSample(vm: Machine, io: SandboxIo, s: AssembledSample, timeoutMs: number, seal: boolean, t0: number): Promise<SampleReport> {
  const lines: string[] = [];
  const mon = new Monitor(vm, { audit: lines, name: `scan:${s.name}` });
  let stop: Stop;
  let watch: Watch;
  try {
    watch = watchSandbox(mon);
    if (seal) mon.seal();
    stop = await vm.run({ timeout: timeoutMs });
  } finally {
    mon.close();
  }
  const head = mon.audit?.head ?? '';
  return {
    name: s.name, expected: s.expected, verdict: verdictOf(stop, watch), findings: watch.findings, stop: stop.reason,
    printed: io.printed(), delivered: watch.delivered, audit: { lines, head },
    verification: verifyAuditLog(lines, { head }), ms: performance.now() - t0,
  };
}

/** Runs all samples in both modes; prints verdicts and samples/s; 0 when every verdict is as expected in both. */
export async function main(): Promise<number> {
  const box = await Sandbox.create();
  try {
    const samples = await box.assemble();
    const fork = await box.scan(samples, { mode: 'fork' });
    const reset = await box.scan(samples, { mode: 'reset' });
    console.log(`sandbox snapshot: ${(box.snapshot.memorySize / 1024).toFixed(0)} KiB of RAM, ${(box.snapshot.storedBytes / 1024).toFixed(0)} KiB stored; ${samples.length} samples, each delivered over virtio-blk\n`);
    console.log('| sample | verdict | expected | what the monitor saw | audit |\n|---|---|---|---|---|');
    let ok = true;
    fork.samples.forEach((r, i) => {
      const again = reset.samples[i];
      const same = again !== undefined && again.verdict === r.verdict;
      const good = r.verdict === r.expected && same && r.verification.ok && again.verification.ok;
      ok &&= good;
      const saw = r.findings[0]?.detail ?? (r.stop === 'debug-exit' ? `exited${r.printed ? `, printed ${JSON.stringify(r.printed)}` : ''}` : r.stop);
      const audit = `${r.audit.lines.length} lines, head ${r.audit.head.slice(0, 12)}… ${r.verification.ok ? 'verified' : 'BROKEN'}`;
      console.log(`| ${r.name} | ${r.verdict}${same ? '' : ` (reset: ${again?.verdict})`} | ${good ? '✓' : `✗ ${r.expected}`} | ${saw} | ${audit} |`);
    });
    const shown = fork.samples.find((r) => r.verdict.startsWith('malicious:'));
    if (shown) {
      console.log(`\naudit chain of '${shown.name}' (fork mode; sha256-chained, the last line is the deny that stopped it):`);
      for (const line of shown.audit.lines) console.log(`  ${line}`);
    }
    for (const s of [fork, reset]) {
      console.log(`\n${s.mode}: ${s.samples.length} samples in ${s.elapsedMs.toFixed(0)} ms = ${s.samplesPerSecond.toFixed(1)} samples/s${s.mode === 'reset' ? ` (${s.pagesCopied} pages re-copied by resets)` : ''}`);
    }
    console.log(ok ? '\nOK: every verdict as expected, fork and reset agree, every audit chain verifies' : '\nFAILED');
    return ok ? 0 : 1;
  } finally {
    box.close();
  }
}

if (isMain(import.meta.url)) await runCli('scan', main);
