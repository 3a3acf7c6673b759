/**
 * The machine's hook points: the exit hooks `handleExit` runs (mediate, observe), the one
 * explainer of unhandled exits, slice hooks run between time slices, sealing, and the
 * `ExitContext` a slice hands to `handleExit`.
 * @module
 */
import { InvalidArgumentError, HookFailure, StateError } from '../errors.js';
import type { VcpuExit } from '../exits.js';
import type { ExitContext } from '../handle-exit.js';
import type { ExitHook, HookInfo, HookStats } from '../hooks.js';
import type { StopRequest } from '../stop.js';
import type { Vcpu } from '../vcpu.js';
import type { MachineState } from './state.js';

/** @internal `Machine.addHook`. */
export function addHook(s: MachineState, hook: ExitHook): () => void {
  s.assertOpen();
  if (s.hooksSealed) throw new StateError('the hook table is sealed');
  if (!hook || typeof hook !== 'object' || typeof hook.name !== 'string' || typeof hook.matches !== 'function' || typeof hook.handle !== 'function' || (hook.mode !== 'mediate' && hook.mode !== 'observe')) {
    throw new InvalidArgumentError('hook', 'must be an ExitHook with name, mode, matches() and handle()');
  }
  s.hooks.push(hook);
  s.hooksVersion++;
  return () => {
    if (s.hooksSealed) throw new StateError('the hook table is sealed');
    const i = s.hooks.indexOf(hook);
    if (i >= 0) { s.hooks.splice(i, 1); s.hooksVersion++; }
  };
}

/** @internal `Machine.setExplainer`. */
export function setExplainer(s: MachineState, explain: (exit: VcpuExit, info: HookInfo) => string | undefined): () => void {
  s.assertOpen();
  if (typeof explain !== 'function') throw new InvalidArgumentError('explain', 'must be a function');
  if (s.explainer) throw new StateError('this machine already has an explainer');
  s.explainer = explain;
  return () => { if (s.explainer === explain) s.explainer = undefined; };
}

/** @internal `Machine.addSliceHook`. */
export function addSliceHook(s: MachineState, name: string, fn: () => void): () => void {
  s.assertOpen();
  if (typeof name !== 'string' || name === '') throw new InvalidArgumentError('name', 'must be a non-empty string');
  if (typeof fn !== 'function') throw new InvalidArgumentError('fn', 'must be a function');
  const entry = { name, fn };
  s.sliceHooks.push(entry);
  return () => { const i = s.sliceHooks.indexOf(entry); if (i >= 0) s.sliceHooks.splice(i, 1); };
}

/** @internal Runs the slice hooks in order; the first throw becomes a `hook-error` stop. */
export function runSliceHooks(s: MachineState): StopRequest | undefined {
  for (const h of s.sliceHooks) {
    try {
      h.fn();
    } catch (error) {
      return error instanceof HookFailure ? { reason: 'hook-error', hook: error.hook, error: error.cause } : { reason: 'hook-error', hook: h.name, error };
    }
  }
  return undefined;
}

/** @internal `Machine.sealHooks`: the hook table and both buses. */
export function sealHooks(s: MachineState): void {
  s.hooksSealed = true;
  s.io.seal();
  s.mmio.seal();
}

/** @internal `Machine.hookStats`: a copy, so callers cannot disturb the live counters. */
export function copyHookStats(s: MachineState): ReadonlyMap<ExitHook, HookStats> {
  return new Map([...s.hookStats].map(([k, v]) => [k, { ...v }]));
}

/**
 * @internal What `handleExit` needs for the exits of one slice on `vcpu`: built once per slice
 * (a hook added meanwhile takes effect at the next one), its `info.seq` advanced by the loop.
 */
export function exitContext(s: MachineState, vcpu: Vcpu): ExitContext {
  // Kept while the hook table and explainer stay as they were: building one makes closures,
  // which cost ~0.6 µs each where the source runs through a loader that names them (tsx, vitest).
  const kept = contexts.get(vcpu);
  if (kept && kept.version === s.hooksVersion && kept.explainer === s.explainer) {
    (kept.ctx.info as { seq: number }).seq = s.seq;
    return kept.ctx;
  }
  const ctx = makeExitContext(s, vcpu);
  contexts.set(vcpu, { version: s.hooksVersion, explainer: s.explainer, ctx });
  return ctx;
}

/** Per vCPU (a vCPU belongs to one machine for its life). */
const contexts = new WeakMap<Vcpu, { version: number; explainer: MachineState['explainer']; ctx: ExitContext }>();

function makeExitContext(s: MachineState, vcpu: Vcpu): ExitContext {
  const info: HookInfo = {
    vcpu: vcpu.id, seq: s.seq,
    rip: () => vcpu.backend.getRegs().rip,
    instructionRip: () => s.instructionRip(vcpu),
  };
  const b = vcpu.backend;
  return {
    pio: s.io, mmio: s.mmio,
    mediate: s.hooks.filter((h) => h.mode === 'mediate'),
    observe: s.hooks.filter((h) => h.mode === 'observe'),
    hookStats: s.hookStats,
    info,
    memory: s.memory,
    msrs: { read: (index) => b.getMsrs([index])[0]?.data ?? 0n, write: (index, data) => b.setMsrs([{ index, data }]) },
    ...(s.explainer ? { explain: s.explainer } : {}),
  };
}
