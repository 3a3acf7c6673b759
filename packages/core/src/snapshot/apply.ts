/**
 * Applying a manifest's CPU-side state — VM blobs (irqchip, PIT, clock) and every vCPU's
 * registers, MSRs and blobs — to backend objects. Shared by restore, reset and the VM pool
 * (which applies it ahead of time, off the fork's path). Each failure is a
 * {@link SnapshotFormatError} naming the manifest field, the backend's error as `cause`.
 * @module
 */
import type { BackendVcpu, BackendVm, EntryPrelude } from '../backend.js';
import { SnapshotFormatError } from '../errors.js';
import type { SnapshotManifest, SnapshotVcpu } from './manifest.js';

/** Runs `f`, turning any failure into a `SnapshotFormatError` naming `field`. */
export function step(field: string, f: () => void): void {
  try {
    f();
  } catch (e) {
    if (e instanceof SnapshotFormatError) throw new SnapshotFormatError(`snapshot: ${field}: ${e.message}`, { cause: e });
    throw new SnapshotFormatError(`snapshot: ${field}: the backend refused it: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
}

/**
 * Writes MSRs; ones this host refuses (KVM lists some it will not take back, e.g. PVM refuses
 * `MSR_KVM_POLL_CONTROL` when the guest's CPUID lacks the feature) are found once, remembered
 * per snapshot in `rejected` and skipped after.
 */
function setMsrs(b: BackendVcpu, msrs: readonly { index: number; data: bigint }[], rejected: Set<number>): void {
  const list = rejected.size === 0 ? msrs : msrs.filter((e) => !rejected.has(e.index));
  try {
    b.setMsrs(list);
  } catch {
    for (const e of list) {
      try { b.setMsrs([e]); } catch { rejected.add(e.index); }
    }
  }
}

/** Calls `f` with each vCPU and its manifest entry (field prefix `vcpus[i]`); a missing vCPU is a format error. */
function eachVcpu(vcpus: readonly BackendVcpu[], manifest: SnapshotManifest, f: (b: BackendVcpu, s: SnapshotVcpu, at: string) => void): void {
  manifest.vcpus.forEach((s, i) => {
    const b = vcpus[i];
    const at = `vcpus[${i}]`;
    if (!b) throw new SnapshotFormatError(`snapshot: ${at}: the machine has no such vCPU`);
    f(b, s, at);
  });
}

/** One vCPU's state through ioctls: registers, special registers, MSRs, blobs. */
function applyVcpuByIoctls(b: BackendVcpu, s: SnapshotVcpu, at: string, rejected: Set<number>): void {
  step(`${at}.regs`, () => b.setRegs(s.regs));
  // (SVM's busy-TR quirk is the KVM backend's to undo, at every setSregs.)
  step(`${at}.sregs`, () => b.setSregs(s.sregs));
  step(`${at}.msrs`, () => setMsrs(b, s.msrs, rejected));
  step(`${at}.blobs`, () => b.setState({ ...s.blobs }));
}

/** Applies VM blobs and vCPU state (`vcpus[i]` gets `manifest.vcpus[i]`). */
export function applyCpuState(vm: BackendVm, vcpus: readonly BackendVcpu[], manifest: SnapshotManifest, rejected: Set<number>): void {
  step('vm', () => vm.setState(manifest.vm));
  eachVcpu(vcpus, manifest, (b, s, at) => applyVcpuByIoctls(b, s, at, rejected));
}

/**
 * What reset puts back, by which mechanism (KVM backend; another backend without
 * `loadState` gets {@link applyCpuState}'s ioctls for all of it):
 * - VM: every blob of `manifest.vm` (`clock`; with an irqchip also `pic-master`, `pic-slave`,
 *   `ioapic`, `pit2`), one VM ioctl each (~2 µs on PVM: VM ioctls do not load a vCPU).
 * - vCPU registers, special registers (incl. EFER, CR0-4, segments, APIC base) and events
 *   (pending/injected exceptions, NMI, interrupt shadow): written into `kvm_run` and loaded by the
 *   next `KVM_RUN` (`loadState`), or with ioctls where that cannot be used (an in-kernel LAPIC,
 *   a vCPU not RUNNABLE, a host without all three `KVM_SYNC_X86_*` fields).
 * - MSRs (the snapshot's whole list, TSC included): one `KVM_SET_MSRS`.
 * - XCRs, XSAVE (x87/SSE/AVX registers; `fpu` only without XSAVE), debug registers: one ioctl
 *   each; the LAPIC (with an irqchip) too.
 * - MP state: skipped without an in-kernel LAPIC, where KVM keeps every vCPU RUNNABLE (the only
 *   value such a snapshot can hold); an ioctl otherwise.
 * Nothing is skipped on the guess that the guest left it alone: a guest at CPL0 can change every
 * one of these without an exit the host would see.
 */
export function applyCpuStateForReset(vm: BackendVm, vcpus: readonly BackendVcpu[], manifest: SnapshotManifest, rejected: Set<number>): void {
  step('vm', () => vm.setState(manifest.vm));
  eachVcpu(vcpus, manifest, (b, s, at) => {
    let fast = false;
    step(`${at}.blobs`, () => { fast = b.loadState?.({ regs: s.regs, sregs: s.sregs, blobs: s.blobs }) ?? false; });
    if (fast) step(`${at}.msrs`, () => setMsrs(b, s.msrs, rejected));
    else applyVcpuByIoctls(b, s, at, rejected);
  });
}

/**
 * Reset of a machine whose guest ran only at CPL3 above the host's system area since the
 * snapshot (`restore.ts` checks that; see `cpu/x86.ts`): what CPL3 code can change goes back;
 * what only CPL0 code can change is left as it is, because nothing at CPL0 but the host's
 * stubs has run:
 * - registers, special registers (FS/GS base, CR2 included), events: through `kvm_run`;
 * - XSAVE (x87/SSE/AVX): one ioctl, or with `prelude` (where x87/SSE is all CPL3 can reach)
 *   reset's entry stub loads it in the guest (see `EntryPrelude`);
 * - not the TSC: KVM takes a host write of it within a second of the last one as a
 *   synchronisation and keeps it running (a fork or full reset here writes the snapshot's
 *   value and the guest reads it ~0.1 s on, as if never written), and that write costs ~20-30 µs on
 *   PVM (it updates the VM's master clock); the guest's TSC runs on across resets, as across a
 *   fork. The VM's kvmclock is put back where the snapshot has kvmclock enabled;
 * - debug registers only while guest debugging is on (KVM edits DR6/DR7 then); XCRs and every
 *   other MSR (`wrmsr`, `xsetbv`, `mov dr` fault at CPL3) not at all.
 * Returns false, having changed nothing, where the vCPU cannot take state through `kvm_run`
 * (the caller then takes {@link applyCpuStateForReset}).
 */
export function applyCpl3StateForReset(vm: BackendVm, vcpus: readonly BackendVcpu[], manifest: SnapshotManifest, kvmclock: boolean, prelude?: EntryPrelude): boolean {
  const s = manifest.vcpus[0];
  const b = vcpus[0];
  if (!s || !b || vcpus.length !== 1 || !b.loadState) return false;
  const blobs: Record<string, Uint8Array> = {};
  for (const k of ['events', 'mp-state', 'xsave'] as const) { const x = s.blobs[k]; if (x && !(k === 'xsave' && prelude)) blobs[k] = x; }
  const fpu = s.blobs['fpu'];
  if (fpu && !s.blobs['xsave']) blobs['fpu'] = fpu;
  const dbg = s.blobs['debugregs'];
  if (dbg && (b.guestDebugging?.() ?? true)) blobs['debugregs'] = dbg;
  let fast = false;
  step('vcpus[0].blobs', () => { fast = b.loadState?.({ regs: s.regs, sregs: s.sregs, blobs }, prelude) ?? false; });
  if (!fast) return false;
  if (kvmclock) step('vm', () => vm.setState(manifest.vm));
  return true;
}
