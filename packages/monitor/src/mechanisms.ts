/**
 * Mechanism selection: for one hook (event + mode), the cheapest mechanism that *works on this
 * host at the hook's CPL* — from `machine.capabilities` (what KVM accepts) and the calibration
 * table (what actually works when the guest runs, and its price). Pure, so it is tested with
 * injected tables. An event nothing here can deliver is refused with a typed error naming what
 * does work.
 * @module
 */
import type { HostCapabilities } from '@tsvm/core';
import { MechanismUnavailableError } from './errors.js';
import type { NormalSpec } from './events.js';
import { priceOf, probePriceOf, resultOf, type CalibrationTable, type Cpl, type MechanismId } from './calibration/table.js';

/** What the selection needs to know about the machine and the other hooks. */
export interface SelectionInput {
  /** The normalised event spec. */
  readonly spec: NormalSpec;
  /** Mediate or observe. */
  readonly mode: 'mediate' | 'observe';
  /** CPL the hook targets (exec/step/msr); defaults to the vCPU's CPL. */
  readonly cpl: Cpl;
  /** What KVM accepts here. */
  readonly caps: HostCapabilities;
  /** What works and what it costs. */
  readonly table: CalibrationTable;
  /** Whether a mediate hook overlaps this (observe) hook's range: then it must exit too. */
  readonly mediatedOverlap: boolean;
  /** Whether devices cover the whole range (coalesced writes to nothing would defer deny-by-default). */
  readonly devicesCover: boolean;
  /** Free hardware debug registers. */
  readonly freeDebugRegs: number;
  /** Exec hooks: probe exits per hit at the hooked instruction (2 or 3: it must run in place). */
  readonly probeExitsPerHit?: 1 | 2 | 3;
  /** vCPUs of the machine (default 1). */
  readonly vcpus?: number;
}

/** The chosen mechanism and why. */
export interface Selection {
  /** Mechanism id (priced by the cost model). */
  readonly mechanism: MechanismId;
  /** One line: why this one. */
  readonly why: string;
  /** Mechanisms considered and rejected, with the reason (for `plan()`). */
  readonly rejected: ReadonlyArray<{ readonly mechanism: MechanismId; readonly why: string }>;
}

function failure(table: CalibrationTable, id: MechanismId, cpl: Cpl): string {
  const r = resultOf(table, id, cpl);
  return r.works ? 'works' : r.failure;
}

/** Picks the mechanism for one hook. @throws MechanismUnavailableError when none can deliver it. */
export function selectMechanism(inp: SelectionInput): Selection {
  const { spec, mode, cpl, caps, table } = inp;
  const src = table.source === 'assumed' ? ' (assumed figures: run calibrate())' : '';
  switch (spec.event) {
    case 'pio': case 'mmio': {
      const exit: MechanismId = spec.event === 'pio' ? 'pio-exit' : 'mmio-exit';
      const ring: MechanismId = spec.event === 'pio' ? 'coalesced-pio' : 'coalesced-mmio';
      if (mode === 'mediate') return { mechanism: exit, why: 'mediation needs a synchronous exit', rejected: [{ mechanism: ring, why: 'delivered late: cannot change the outcome' }] };
      const capable = spec.event === 'pio' ? caps.coalescedPio : caps.coalescedMmio;
      const why = !capable ? `KVM here has no coalesced ${spec.event.toUpperCase()}`
        : !resultOf(table, ring, cpl).works ? failure(table, ring, cpl)
        : spec.dir === (spec.event === 'pio' ? 'in' : 'read') ? 'the ring only carries writes'
        : inp.mediatedOverlap ? 'a mediate hook overlaps this range (complete mediation)'
        : !inp.devicesCover ? 'no device covers the whole range: deny-by-default must stay synchronous'
        : undefined;
      if (why) return { mechanism: exit, why: `exit, because coalescing is out: ${why}`, rejected: [{ mechanism: ring, why }] };
      return { mechanism: ring, why: `coalesced ring: ~${priceOf(table, ring, cpl)} ns/write vs ~${priceOf(table, exit, cpl)} ns/exit${src}${spec.dir === 'both' ? '; reads still exit' : ''}`, rejected: [{ mechanism: exit, why: 'dearer' }] };
    }
    case 'msr':
      if (!caps.userSpaceMsr) throw new MechanismUnavailableError('msr', 'this host has no user-space MSR exits (KVM_CAP_X86_USER_SPACE_MSR)', { alternatives: ['pio, mmio, hypercall and write-watch hooks'] });
      return { mechanism: 'msr-exit', why: `MSR filter → user-space exit${resultOf(table, 'msr-exit', 3).works ? '' : '; note: at CPL3 rdmsr/wrmsr #GP before any exit'}`, rejected: [] };
    case 'cpuid':
      throw new MechanismUnavailableError('cpuid', `CPUID never exits to userspace on KVM, so no hook can ${mode} it`, {
        alternatives: ['Monitor.emulateCpuid(entries) installs a static table at set-up time (honoured at CPL0; at CPL3 on PVM the outer hypervisor answers)'],
      });
    case 'hypercall':
      return { mechanism: 'pio-exit', why: `guest 'out' to port 0x${spec.port.toString(16)} (vmcall hangs on PVM)`, rejected: [] };
    case 'exec': return selectExec(inp);
    case 'step': {
      if (!caps.guestDebug) throw new MechanismUnavailableError('step', 'KVM_SET_GUEST_DEBUG is not available', { cpl, alternatives: ['exec hooks (probe-breakpoint)'] });
      const r = resultOf(table, 'single-step', cpl);
      if (!r.works) {
        throw new MechanismUnavailableError('step', `single-step does not work at CPL${cpl} here: ${r.failure}`, {
          cpl, alternatives: [...workingAt(table, cpl, ['sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint']).map((m) => `exec hooks via ${m}`), ...(resultOf(table, 'single-step', cpl === 0 ? 3 : 0).works ? [`step at CPL${cpl === 0 ? 3 : 0}`] : [])],
        });
      }
      return { mechanism: 'single-step', why: `KVM_GUESTDBG_SINGLESTEP works at CPL${cpl}${src}`, rejected: [] };
    }
    case 'write-watch':
      if (mode === 'mediate') {
        if (!caps.readonlyMemory) throw new MechanismUnavailableError('write-watch', 'mediating writes needs read-only memslots (KVM_CAP_READONLY_MEM)', { alternatives: ['observe write-watch (dirty log)'] });
        return { mechanism: 'ro-slot-write', why: 'read-only memslot: each write exits as MMIO (whole 4 KiB pages)', rejected: [{ mechanism: 'dirty-log-page', why: 'sampled after the fact' }] };
      }
      return { mechanism: 'dirty-log-page', why: 'dirty log sampled at run end and on each monitor-visible exit (page granularity, no values)', rejected: caps.readonlyMemory ? [{ mechanism: 'ro-slot-write', why: 'one exit per write: dearer' }] : [] };
    case 'halt': case 'shutdown': case 'any-exit':
      return { mechanism: 'exit', why: 'the exit happens anyway; the hook adds dispatch only', rejected: [] };
  }
}

function workingAt(table: CalibrationTable, cpl: Cpl, ids: readonly MechanismId[]): MechanismId[] {
  return ids.filter((id) => resultOf(table, id, cpl).works);
}

function selectExec(inp: SelectionInput): Selection {
  const { caps, table, cpl } = inp;
  const rejected: Array<{ mechanism: MechanismId; why: string }> = [];
  const candidates: Array<{ id: MechanismId; ns: number }> = [];
  for (const id of ['sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint'] as const) {
    const r = resultOf(table, id, cpl);
    if (!r.works) { rejected.push({ mechanism: id, why: `CPL${cpl}: ${r.failure}` }); continue; }
    // Several vCPUs: only a trap that stays in memory for all of them sees every execution.
    // Guest debug (breakpoints) is set on vCPU 0 alone, and an in-place probe is out of memory
    // while one vCPU steps over it, so another could run the instruction unseen.
    if ((inp.vcpus ?? 1) > 1 && id !== 'probe-breakpoint') { rejected.push({ mechanism: id, why: `guest debug covers vCPU 0 only, the machine has ${inp.vcpus}` }); continue; }
    if ((inp.vcpus ?? 1) > 1 && (inp.probeExitsPerHit ?? 1) > 1) { rejected.push({ mechanism: id, why: `the instruction must run in place: with ${inp.vcpus} vCPUs another could run it while the trap is out` }); continue; }
    if (id !== 'probe-breakpoint' && !caps.guestDebug) { rejected.push({ mechanism: id, why: 'KVM_SET_GUEST_DEBUG unavailable' }); continue; }
    if (id === 'hw-breakpoint' && inp.freeDebugRegs < 1) { rejected.push({ mechanism: id, why: 'all 4 debug registers in use' }); continue; }
    if (id === 'hw-breakpoint' && !resultOf(table, 'single-step', cpl).works) { rejected.push({ mechanism: id, why: 'stepping over the breakpoint needs single-step' }); continue; }
    // A probe on an instruction that must run in place costs its in-place price, not one exit's.
    candidates.push({ id, ns: id === 'probe-breakpoint' ? probePriceOf(table, cpl, inp.probeExitsPerHit ?? 1) ?? r.ns : r.ns });
  }
  candidates.sort((a, b) => a.ns - b.ns);
  const best = candidates[0];
  if (!best) {
    const smp = (inp.vcpus ?? 1) > 1 ? ` on a ${inp.vcpus}-vCPU machine (${rejected.map((r) => `${r.mechanism}: ${r.why}`).join('; ')})` : '';
    throw new MechanismUnavailableError('exec', `no breakpoint mechanism works at CPL${cpl}${smp}`, { cpl, alternatives: [...(smp ? ['hook an instruction that can run out of line (no memory operand, branch or port I/O)'] : []), 'pio/mmio hooks on what the code touches'] });
  }
  for (const c of candidates.slice(1)) rejected.push({ mechanism: c.id, why: `dearer (~${c.ns} ns vs ~${best.ns} ns)` });
  const why = best.id === 'probe-breakpoint'
    ? (inp.probeExitsPerHit ?? 1) > 1
      ? `patched 'out 0xe5, al' probe, the instruction run in place (${inp.probeExitsPerHit} exits/hit); ${caps.guestDebug && candidates.length > 1 ? 'cheapest here' : `guest debug does not work at CPL${cpl} here`}`
      : `patched 'out 0xe5, al' probe, the instruction run out of line (1 exit/hit; 2 if it must run in place); ${caps.guestDebug && candidates.length > 1 ? 'cheapest here' : `guest debug does not work at CPL${cpl} here`}`
    : `${best.id} works at CPL${cpl} and is cheapest (~${best.ns} ns)`;
  return { mechanism: best.id, why, rejected };
}
