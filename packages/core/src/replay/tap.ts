/**
 * A `Backend` wrapper with a tap point on every vCPU and VM call the guest's inputs pass
 * through: `run()` (the exits), `completeRead` / `completeMsr` / `faultInstruction` (what the
 * guest gets back) and `irqLine` (interrupts). Recording and replaying are two taps; with no
 * tap installed the wrapper only forwards (one property load and a branch per call), so a
 * machine can be created recordable and run normally until someone records it.
 *
 * Wrapping the backend rather than the run loop keeps `Machine` untouched: the loop, hooks,
 * devices and monitor work exactly as they do without recording.
 * @module
 */
import type { Backend, BackendVcpu, BackendVm } from '../backend.js';
import type { VcpuExit } from '../exits.js';
import type { GuestMemory } from '../memory.js';
import { PROBE_PORT } from '../reserved.js';
import { forwarding } from '../forwarding.js';

/** @internal What a recorder or replayer plugs into a tappable vCPU. */
export interface VcpuTap {
  /** Before each `KVM_RUN` (an exit boundary: deliver or apply what is due). */
  beforeRun(): void;
  /** After each `KVM_RUN`; may throw to end the run (`backend-error` stop). */
  afterRun(exit: VcpuExit): void;
  /** The bytes the pending read completes with. */
  read(data: Uint8Array): Uint8Array;
  /** The result the pending MSR access completes with. */
  msr(data: bigint, error: boolean): { data: bigint; error: boolean };
  /** The pending access is abandoned with an exception. */
  fault(vector: number, errorCode: number | undefined): void;
  /** An irqchip line change; `true` lets it through now. */
  irqLine(irq: number, level: boolean): boolean;
}

/** @internal One VM's tap point (shared by its VM and vCPU wrappers). */
export interface TapSlot {
  /** The installed tap, if any. */
  tap: VcpuTap | undefined;
  /** The unwrapped VM (for delivering deferred interrupts). */
  readonly vm: BackendVm;
}

const slots = new WeakMap<object, TapSlot>();
const tapped = new WeakSet<Backend>();

/** @internal The tap slot of a vCPU created by a {@link tappable} backend. */
export function slotOf(vcpu: BackendVcpu): TapSlot | undefined {
  return slots.get(vcpu);
}

function tapVcpu(inner: BackendVcpu, slot: TapSlot): BackendVcpu {
  const w = forwarding(inner, {
    run: (): VcpuExit => {
      const t = slot.tap;
      if (t === undefined) return inner.run();
      t.beforeRun();
      const exit = inner.run();
      t.afterRun(exit);
      return exit;
    },
    completeRead: (data: Uint8Array): void => { inner.completeRead(slot.tap ? slot.tap.read(data) : data); },
    completeMsr: (data: bigint, error: boolean): void => {
      const r = slot.tap ? slot.tap.msr(data, error) : { data, error };
      inner.completeMsr(r.data, r.error);
    },
    faultInstruction: (vector: number, errorCode: number | undefined, rip: bigint): void => {
      slot.tap?.fault(vector, errorCode);
      inner.faultInstruction(vector, errorCode, rip);
    },
  });
  slots.set(w, slot);
  return w;
}

function tapVm(inner: BackendVm): BackendVm {
  const slot: TapSlot = { tap: undefined, vm: inner };
  return forwarding(inner, {
    createVcpu: (id: number) => tapVcpu(inner.createVcpu(id), slot),
    irqLine: (irq: number, level: boolean) => { if (!slot.tap || slot.tap.irqLine(irq, level)) inner.irqLine(irq, level); },
  });
}

/**
 * Makes `backend` recordable: machines created on the result (`Machine.create({ backend })`)
 * behave exactly as on `backend` until `startRecording` / `record` taps them. Idempotent.
 */
export function tappable(backend: Backend): Backend {
  if (tapped.has(backend)) return backend;
  // Everything else the backend offers (its clock, CPUID probe, VM-less memory for snapshots) as it is.
  const b = forwarding(backend, { createVm: (o) => tapVm(backend.createVm(o)) });
  tapped.add(b);
  return b;
}

/**
 * Whether `exit` is a guest exit for record/replay: one the guest's own instruction stream
 * caused and whose order is deterministic. Not counted: slice-timer `intr`s (timing), the
 * monitor's probe traps (`out` to {@link PROBE_PORT}), guest-debug exits (breakpoints a
 * monitor set) and MMIO exits on guest RAM (stores to a read-only slot a write-watch made).
 * So a replay under a heavier monitor sees the same numbered exits as the recording.
 */
export function countsAsGuestExit(exit: VcpuExit, memory: GuestMemory): boolean {
  switch (exit.kind) {
    case 'intr': case 'debug': return false;
    case 'io': return exit.port !== PROBE_PORT && exit.late !== true;
    case 'mmio': return exit.late !== true && !memory.contains(exit.address, exit.size);
    default: return true;
  }
}
