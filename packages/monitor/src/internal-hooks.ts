/**
 * The mechanism handlers the monitor's mediate dispatcher (`dispatch.ts`) routes to: the
 * plumbing that turns mechanisms back into events.
 * - probe: probe traps (`out` to the probe port) → exec events;
 * - debug: guest-debug exits → exec/step events;
 * - write-watch: stores to protected (read-only) pages → write-watch events; an allowed store
 *   is written through by core, or by the patch engines when exec hooks patch code.
 * @module
 */
import { bitnessOf, linearRip, type ExitHook, type HookDecision, type HookInfo, type VcpuExit } from '@tsvm/core';
import type { MonitorEvent } from './events.js';
import { callObserve, hookContext, runMediators, thenDecision, type HookRecord, type PipelineEnv } from './records.js';
import { PROBE_PORT, type PatchBreakpoints } from './probe.js';
import { readCode } from './decode.js';
import type { DebugUnit } from './debug-unit.js';

const RESUME: HookDecision = { verdict: 'emulate', value: 0 };
const ALLOW: HookDecision = { verdict: 'allow' };

/** What the internal hooks read from the monitor (live views, not copies). */
export interface InternalEnv extends PipelineEnv {
  /** All live records. */
  records(): readonly HookRecord[];
  /** The probe engine, if any exec hook uses it. */
  probe(): PatchBreakpoints | undefined;
  /** Points the patch engines' register access at the vCPU of the exit being handled. */
  atVcpu(index: number): void;
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
  const probe = env.probe(), int3 = env.int3();
  const engine = probe ?? int3;
  const code = engine ? engine.originalCode(physical, engine === probe ? int3 : undefined) : readCode(env.machine.memory, physical);
  const ev: MonitorEvent = { event: 'exec', address: physical, rip, code };
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

/** `out 0xe5, al` probe traps → exec events. */
export function probeHook(env: InternalEnv): ExitHook {
  return {
    name: 'monitor:probe', mode: 'mediate',
    matches: (exit) => exit.kind === 'io' && exit.port === PROBE_PORT && exit.direction === 'out' && env.probe() !== undefined,
    handle: (exit, info) => {
      const engine = env.probe();
      if (!engine) return undefined;
      env.atVcpu(info.vcpu);
      const vcpu = env.machine.vcpu(info.vcpu);
      // The probe's own `out imm8`: RIP is on it or past it as this host's KVM does for that form
      // (`capabilities.ioExitRip`). No decode is needed to tell it from another `out` to the
      // probe port: the engine owns the trap only if its bytes are at that address, and an
      // `out dx`/`outs` cannot start on the trap's second byte (0xe5 is not one of them).
      const rip = vcpu.getRegs().rip;
      const trapRip = env.machine.capabilities.ioExitRip['out-imm'] === 'after' ? rip - BigInt(engine.trapLength) : rip;
      const sregs = vcpu.getSregs();
      const r = engine.onTrap(linearRip(sregs, trapRip), trapRip, info.seq, sregs);
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
      env.atVcpu(info.vcpu);
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
          const r = engine?.onTrap(cause.address, rip, info.seq, sregs);
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
        const ctx = hookContext(env.machine, exit, info);
        // Host writes bypass KVM's dirty log, so observers of protected pages are told here.
        for (const r of recs) if (r.mode === 'observe') callObserve(r, ev, ctx);
        const probe = env.probe(), int3 = env.int3();
        // An allowed store as the guest made it: core writes it through (its default).
        if (!probe && !int3 && d.verdict === 'allow') return ALLOW;
        // Otherwise through the patch engines (a write over a hooked instruction keeps its trap,
        // and the trap restores the new bytes when it fires), or the replacement value.
        if (!probe && !int3) env.machine.memory.write(exit.address, bytes);
        probe?.write(exit.address, bytes, int3);
        int3?.write(exit.address, bytes, probe);
        return RESUME;
      });
    },
  };
}
