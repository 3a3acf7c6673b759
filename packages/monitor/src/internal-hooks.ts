/**
 * The monitor's own core hooks: the plumbing that turns mechanisms back into events.
 * - `monitor:seen` (first mediate hook): remembers which exit passed the mediate hooks;
 * - `monitor:probe` / `monitor:debug`: probe traps and guest-debug exits → exec/step events;
 * - `monitor:write-watch`: MMIO writes to protected pages → write-watch events, then the write;
 * - `monitor:deny-by-default` (last mediate hook): an exit no device and no hook handles stops
 *   the machine with a violation naming event, address, RIP and the instruction;
 * - `monitor:mediation-guard` (observe): an access to a mediated range that did not pass the
 *   mediate hooks (a coalesced zone registered behind the monitor's back) stops the machine;
 * - `monitor:rearm` (observe): re-arms probes that could not be re-armed at their successor.
 * @module
 */
import type { ExitHook, HookDecision, HookInfo, Machine, VcpuExit } from '@tsvm/core';
import { describeExit } from '@tsvm/core';
import { MediationBypassError } from './errors.js';
import { eventOf, type MonitorEvent } from './events.js';
import { deny } from './decisions.js';
import { callObserve, hookContext, runMediators, thenDecision, whereIs, type HookRecord, type PipelineEnv } from './records.js';
import { PROBE_PORT, type PatchBreakpoints } from './probe.js';
import type { DebugUnit } from './debug-unit.js';
import { bitnessOf, linearRip } from '@tsvm/core';

const RESUME: HookDecision = { verdict: 'emulate', value: 0 };

/** What the internal hooks read from the monitor (live views, not copies). */
export interface InternalEnv extends PipelineEnv {
  /** All live records. */
  records(): readonly HookRecord[];
  /** The probe engine, if any exec hook uses it. */
  probe(): PatchBreakpoints | undefined;
  /** The int3 engine, if any exec hook uses it. */
  int3(): PatchBreakpoints | undefined;
  /** The guest-debug owner. */
  readonly debug: DebugUnit;
  /** Page ranges `[lo, hi)` the monitor made read-only. */
  protectedPages(): ReadonlyArray<readonly [bigint, bigint]>;
}

/** Runs exec hooks for a hit at `physical`: mediate ones decide, observe ones are told. Resumes unless denied. */
function execHit(env: InternalEnv, physical: bigint, rip: bigint, exit: VcpuExit, info: HookInfo): HookDecision | Promise<HookDecision> {
  const recs = env.records().filter((r) => r.spec.event === 'exec' && r.spec.address === physical);
  const ev: MonitorEvent = { event: 'exec', address: physical, rip };
  const decided = runMediators(env, recs.filter((r) => r.mode === 'mediate'), ev, exit, info);
  return thenDecision(decided, (d) => {
    if (d.verdict === 'deny') return { ...d, effect: 'stop' };
    const ctx = hookContext(env.machine, exit, info);
    for (const r of recs) if (r.mode === 'observe') callObserve(r, ev, ctx);
    return RESUME;
  });
}

function stepHit(env: InternalEnv, rip: bigint, exit: VcpuExit, info: HookInfo): HookDecision | Promise<HookDecision> {
  const recs = env.records().filter((r) => r.spec.event === 'step');
  const ev: MonitorEvent = { event: 'step', rip };
  return thenDecision(runMediators(env, recs.filter((r) => r.mode === 'mediate'), ev, exit, info), (d) => {
    if (d.verdict === 'deny') return { ...d, effect: 'stop' };
    const ctx = hookContext(env.machine, exit, info);
    for (const r of recs) if (r.mode === 'observe') callObserve(r, ev, ctx);
    return RESUME;
  });
}

/** Records which exit object passed through the mediate hooks (drained coalesced writes do not). */
export class SeenHook implements ExitHook {
  /** Name in hook stats. */
  readonly name = 'monitor:seen';
  /** Runs with the mediate hooks. */
  readonly mode = 'mediate' as const;
  /** The last exit that reached the mediate hooks. */
  last: VcpuExit | undefined;
  /** Records and declines. */
  matches(exit: VcpuExit): boolean {
    this.last = exit;
    return false;
  }
  /** Never called. */
  handle(): undefined {
    return undefined;
  }
}

/** `out 0xe5, al` probe traps → exec events. */
export function probeHook(env: InternalEnv): ExitHook {
  return {
    name: 'monitor:probe', mode: 'mediate',
    matches: (exit) => exit.kind === 'io' && exit.port === PROBE_PORT && exit.direction === 'out' && env.probe() !== undefined,
    handle: (exit, info) => {
      const engine = env.probe();
      if (!engine) return undefined;
      const vcpu = env.machine.vcpu(info.vcpu);
      // The probe's own `out`: where it is comes from core's one helper (on PVM RIP is already
      // past it, on VMX/SVM on it).
      const trapRip = info.instructionRip();
      const sregs = vcpu.getSregs();
      const r = engine.onTrap(linearRip(sregs, trapRip), trapRip, info.seq);
      if (!r.ours) return undefined;
      return r.hit ? execHit(env, r.hit.physical, trapRip, exit, info) : RESUME;
    },
  };
}

/** Guest-debug exits → exec (sw/hw breakpoints) and step events. */
export function debugHook(env: InternalEnv): ExitHook {
  return {
    name: 'monitor:debug', mode: 'mediate',
    matches: (exit) => exit.kind === 'debug',
    handle: (exit, info) => {
      if (exit.kind !== 'debug') return undefined;
      const cause = env.debug.onDebugExit(exit);
      const vcpu = env.machine.vcpu(info.vcpu);
      switch (cause.kind) {
        case 'internal': return RESUME;
        case 'step': return stepHit(env, vcpu.getRegs().rip, exit, info);
        case 'hw': {
          const rec = env.records().find((r) => r.spec.event === 'exec' && r.spec.virtualAddress === cause.address);
          return rec && rec.spec.event === 'exec' ? execHit(env, rec.spec.address, vcpu.getRegs().rip, exit, info) : RESUME;
        }
        case 'sw': {
          const engine = env.int3();
          const sregs = vcpu.getSregs();
          const rip = bitnessOf(sregs) === 64 ? cause.address : cause.address - sregs.cs.base;
          const r = engine?.onTrap(cause.address, rip, info.seq);
          if (!r?.ours) return undefined;
          return r.hit ? execHit(env, r.hit.physical, rip, exit, info) : RESUME;
        }
        case 'unknown': return undefined;
      }
    },
  };
}

function inPages(pages: ReadonlyArray<readonly [bigint, bigint]>, a: bigint): boolean {
  return pages.some(([lo, hi]) => a >= lo && a < hi);
}

/** MMIO writes to protected pages → write-watch events; then performs (or replaces) the write. */
export function writeWatchHook(env: InternalEnv): ExitHook {
  return {
    name: 'monitor:write-watch', mode: 'mediate',
    matches: (exit) => exit.kind === 'mmio' && exit.isWrite && inPages(env.protectedPages(), exit.address),
    handle: (exit, info) => {
      if (exit.kind !== 'mmio') return undefined;
      const last = exit.address + BigInt(exit.size) - 1n;
      const recs = env.records().filter((r) => r.spec.event === 'write-watch' && r.spec.lo <= last && exit.address <= r.spec.hi);
      let value = 0n;
      for (let i = Math.min(8, exit.size) - 1; i >= 0; i--) value = (value << 8n) | BigInt(exit.data[i] ?? 0);
      const ev: MonitorEvent = { event: 'write-watch', address: exit.address, size: exit.size, value };
      return thenDecision(runMediators(env, recs.filter((r) => r.mode === 'mediate'), ev, exit, info), (d) => {
        if (d.verdict === 'deny') return d.effect === 'ignore' ? RESUME : d.effect === 'gp' ? d : { ...d, effect: 'stop' };
        let bytes = exit.data;
        if (d.verdict === 'emulate') {
          bytes = new Uint8Array(exit.size);
          let v = BigInt.asUintN(64, BigInt(d.value));
          for (let i = 0; i < exit.size; i++) { bytes[i] = Number(v & 0xffn); v >>= 8n; }
        }
        // Through the patch engines: a write over a hooked instruction keeps its trap (and the
        // trap restores the new bytes when it fires) instead of silently erasing it.
        const probe = env.probe(), int3 = env.int3();
        if (!probe && !int3) env.machine.memory.write(exit.address, bytes);
        probe?.write(exit.address, bytes, int3);
        int3?.write(exit.address, bytes, probe);
        const ctx = hookContext(env.machine, exit, info);
        // Host writes bypass KVM's dirty log, so observers of protected pages are told here.
        for (const r of recs) if (r.mode === 'observe') callObserve(r, ev, ctx);
        return RESUME;
      });
    },
  };
}

/** The last mediate hook: what nobody handles is denied, with RIP and the instruction. */
export function denyByDefaultHook(machine: Machine): ExitHook {
  return {
    name: 'monitor:deny-by-default', mode: 'mediate',
    matches: (exit) => {
      switch (exit.kind) {
        case 'io': return machine.io.find(BigInt(exit.port), exit.size) === undefined;
        case 'mmio': return machine.mmio.find(exit.address, exit.size) === undefined;
        case 'msr': case 'debug': case 'hypercall': case 'exception': case 'unsupported': return true;
        default: return false;
      }
    },
    handle: (exit, info) => deny({ reason: `deny by default: no device or hook handles ${describeExit(exit)} — ${whereIs(machine, info)}` }),
  };
}

/** Stops the machine when an access to a mediated range arrives without passing the mediate hooks. */
export function mediationGuard(env: InternalEnv, seen: SeenHook): ExitHook {
  const mediated = (exit: VcpuExit): HookRecord | undefined =>
    env.records().find((r) => r.mode === 'mediate' && (r.spec.event === 'pio' || r.spec.event === 'mmio' || r.spec.event === 'hypercall') && eventOf(r.spec, exit) !== undefined);
  return {
    name: 'monitor:mediation-guard', mode: 'observe',
    matches: (exit) => (exit.kind === 'io' || exit.kind === 'mmio') && exit !== seen.last && mediated(exit) !== undefined,
    handle: (exit) => {
      const rec = mediated(exit);
      throw new MediationBypassError(`${describeExit(exit)} reached the device without passing mediate hook '${rec?.name ?? '?'}' (a coalesced zone covers a mediated range?)`);
    },
  };
}

/** Re-arms probes whose successors could not be trapped. */
export function rearmHook(env: InternalEnv): ExitHook {
  return {
    name: 'monitor:rearm', mode: 'observe',
    matches: () => (env.probe()?.hasLazy ?? false) || (env.int3()?.hasLazy ?? false),
    handle: (_exit, info) => {
      env.probe()?.rearmLazy(info.seq);
      env.int3()?.rearmLazy(info.seq);
    },
  };
}
