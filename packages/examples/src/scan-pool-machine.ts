/**
 * The scan sandbox as a machine module for `MachinePool` (`@tsvm/core/threads`): each pool
 * worker builds the sandbox once from scratch (the template: loader run to its pause point),
 * forks its machine from it, and then runs one sample per lease. A lease's `run({ input })`
 * names the sample; `input()` writes it onto the disk and starts a fresh monitor, `report()`
 * gives the verdict and the audit chain of that run, and the pool's `release()` resets the
 * machine (dirty pages, vCPU and device state) for the next job.
 *
 * ```ts
 * await using pool = await MachinePool.create<typeof import('./scan-pool-machine.js').default>({ module, size: 2 });
 * const m = await pool.acquire();
 * await m.run({ input: { sample: 'forbidden-port' }, timeout: 300 });
 * const { verdict, audit } = await m.report();
 * await m.release();
 * ```
 * @module
 */
import { InvalidArgumentError, Machine, StateError, type Stop, type StopReason } from '@tsvm/core';
import { defineMachine } from '@tsvm/core/threads';
import { MemoryBacking } from '@tsvm/devices';
import { Monitor, verifyAuditLog } from '@tsvm/monitor';
import { verdictOf, watchSandbox, type Verdict, type Watch } from './scan-monitor.js';
import { attachSandboxDevices, buildTemplate, diskImage, DISK_SIZE, type SandboxIo } from './scan-sandbox.js';
import { SAMPLES, assembleSamples, type AssembledSample } from './scan-samples.js';

/** One job's input: which sample to run. */
export interface ScanInput {
  /** A name from `SAMPLES`. */
  readonly sample: string;
}

/** What `report()` tells of the last run. */
export interface ScanRunReport {
  /** The sample run, or `undefined` before the first input. */
  readonly sample: string | undefined;
  /** The monitor's verdict. */
  readonly verdict: Verdict | undefined;
  /** Why the run stopped. */
  readonly stop: StopReason | undefined;
  /** What the sample printed. */
  readonly printed: string;
  /** Forbidden acts (kind and description). */
  readonly findings: ReadonlyArray<{ readonly kind: string; readonly detail: string }>;
  /** The run's audit chain and whether it verifies against its head. */
  readonly audit: { readonly head: string; readonly lines: readonly string[]; readonly verified: boolean };
  /** Runs this machine has done (across resets). */
  readonly runs: number;
}

/** Set by the from-scratch build in this worker (template mode builds before it forks). */
let template: { notifyAt: number; samples: Map<string, AssembledSample> } | undefined;

export default defineMachine(async (_init: Record<string, never> | undefined, ctx) => {
  const snap = ctx.snapshot();
  if (!snap) {
    const { vm, notifyAt } = await buildTemplate((regions) => Machine.create({ memory: regions, name: 'scan-sandbox' }));
    template = { notifyAt, samples: new Map((await assembleSamples(SAMPLES, notifyAt)).map((s) => [s.name, s])) };
    return vm;
  }
  if (!template) throw new StateError('scan-pool-machine forks only from its own template (start the pool without a snapshot file)');
  const samples = template.samples;
  // One disk whose image is rewritten per job: the reset machine keeps its device objects.
  const disk = new Uint8Array(DISK_SIZE);
  let io: SandboxIo | undefined;
  const vm = await Machine.fork(snap, { name: `scan-pool:${ctx.threadId}`, setup: (m) => { io = attachSandboxDevices(m, new MemoryBacking(disk)); } });
  let runs = 0;
  let current: { sample: string; monitor: Monitor; watch: Watch; lines: string[]; stop?: Stop } | undefined;
  const endRun = (): void => { current?.monitor.close(); };
  vm.events.on('stopped', (stop) => { if (current) current.stop = stop; });
  return {
    machine: vm,
    input(value: ScanInput) {
      if (value === null || typeof value !== 'object' || typeof value.sample !== 'string') throw new InvalidArgumentError('input.sample', 'must name a sample');
      const s = samples.get(value.sample);
      if (!s) throw new InvalidArgumentError('input.sample', `no sample is named ${JSON.stringify(value.sample)}`);
      endRun();
      disk.set(diskImage(s.code));
      (io as SandboxIo).clearOutput();
      const lines: string[] = [];
      const monitor = new Monitor(vm, { audit: lines, name: `scan:${s.name}` });
      const watch = watchSandbox(monitor);
      runs++;
      current = { sample: s.name, monitor, watch, lines };
    },
    report(): ScanRunReport {
      const c = current;
      const head = c?.monitor.audit?.head ?? '';
      const lines = c?.lines ?? [];
      return {
        sample: c?.sample, verdict: c?.stop ? verdictOf(c.stop, c.watch) : undefined, stop: c?.stop?.reason,
        printed: (io as SandboxIo).printed(), findings: (c?.watch.findings ?? []).map((f) => ({ kind: f.kind, detail: f.detail })),
        audit: { head, lines, verified: verifyAuditLog(lines, { head }).ok }, runs,
      };
    },
    close: endRun,
  };
});
