/**
 * Putting a used vCPU back to power-on state, for a closed plain machine's VM that the KVM
 * backend keeps for the next plain `Machine.create` (creating and destroying a VM and its vCPU
 * costs ~1 ms of kernel work on PVM; this costs ~0.1 ms).
 *
 * "Power-on" is what a brand-new vCPU of this process showed through KVM's state API — the same
 * API (and MSR list, `KVM_GET_MSR_INDEX_LIST`) live migration relies on to carry *all* guest-
 * visible vCPU state — captured once per backend from the first plain vCPU before it ever ran.
 * A wipe writes every piece of it back, after finishing any exit the previous guest left
 * pending (KVM would otherwise complete it into the next guest's registers). What the API
 * cannot reach cannot be promised. An MSR KVM lists but will not take back from the host (PVM
 * refuses `MSR_KVM_POLL_CONTROL` when the CPUID lacks its feature, and then so does the guest's
 * `wrmsr`) is not written but *checked*: a wipe that finds it changed fails, and the VM is
 * destroyed instead of kept.
 * @module
 */
import { KVM_CONST, KvmError, VCPU_EVENTS_OFFSETS, type KvmVcpu } from '@tsvm/kvm-backend';
import type { MsrEntry, Regs, Sregs } from '../backend.js';

/**
 * The blobs a wipe writes, in this order. `fpu` as well as `xsave`: `KVM_SET_XSAVE` leaves the
 * bytes of a component its header marks "init" as they were in the kernel's buffer, where
 * `KVM_GET_FPU` still shows them (XMM registers, found by this module's test); `KVM_SET_FPU`
 * first overwrites them. XCRs before XSAVE (XCR0 decides what XSAVE loads).
 */
const BLOBS = ['fpu', 'xcrs', 'xsave', 'debugregs'] as const;

/** `KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR`: without them `KVM_SET_VCPU_EVENTS` keeps the old values. */
const EVENTS_ALSO = 0x1 | 0x2;

/** What a brand-new vCPU looks like through KVM's state API (see the module doc). */
export interface PowerOnImage {
  readonly regs: Regs;
  readonly sregs: Sregs;
  /** `fpu`, `xsave` and `xcrs` (where XSAVE is offered), `debugregs`. */
  readonly blobs: Readonly<Partial<Record<(typeof BLOBS)[number], Uint8Array>>>;
  /** `kvm_vcpu_events` with the NMI-pending and SIPI fields marked valid. */
  readonly events: Uint8Array;
  /** Every MSR of `KVM_GET_MSR_INDEX_LIST` this vCPU can read and KVM takes back, with its power-on value. */
  readonly msrs: readonly MsrEntry[];
  /** Readable MSRs KVM refuses to take back from the host: checked unchanged instead. */
  readonly fixedMsrs: readonly MsrEntry[];
  /** The CPUID table KVM held for the vCPU (`KVM_GET_CPUID2` bytes): checked unchanged. */
  readonly cpuid: Uint8Array;
}

/**
 * Reads `v`'s state; `v` must be brand new (never run, nothing set but its CPUID and signal
 * mask). Writes the MSRs back once to learn which ones KVM takes back.
 * @throws KvmError when a read fails (then the host gets no image).
 */
export function capturePowerOn(v: KvmVcpu, msrIndices: readonly number[], cpuidOf: (v: KvmVcpu) => Uint8Array): PowerOnImage {
  const blobs: Partial<Record<(typeof BLOBS)[number], Uint8Array>> = {};
  for (const k of ['xcrs', 'xsave', 'debugregs'] as const) {
    try { blobs[k] = v.getBlob(k); } catch { /* XSAVE/XCRs not offered: FPU below */ }
  }
  blobs.fpu = v.getBlob('fpu');
  const events = v.getBlob('events');
  const ev = new DataView(events.buffer, events.byteOffset, events.byteLength);
  ev.setUint32(VCPU_EVENTS_OFFSETS.flags, ev.getUint32(VCPU_EVENTS_OFFSETS.flags, true) | EVENTS_ALSO, true);
  const readable = readableMsrs(v, msrIndices);
  const msrs: MsrEntry[] = [];
  const fixedMsrs: MsrEntry[] = [];
  try {
    v.setMsrs(readable);
    msrs.push(...readable);
  } catch {
    for (const e of readable) {
      try { v.setMsrs([e]); msrs.push(e); } catch { fixedMsrs.push(e); }
    }
  }
  return Object.freeze({ regs: v.getRegs(), sregs: v.getSregs(), blobs: Object.freeze(blobs), events, msrs: Object.freeze(msrs), fixedMsrs: Object.freeze(fixedMsrs), cpuid: cpuidOf(v) });
}

/** `KVM_GET_MSRS` stops at the first MSR it cannot read: go on past each such one. */
function readableMsrs(v: KvmVcpu, indices: readonly number[]): MsrEntry[] {
  const out: MsrEntry[] = [];
  let rest = indices.slice();
  while (rest.length > 0) {
    const got = v.getMsrs(rest);
    out.push(...got);
    rest = rest.slice(got.length + 1); // skip the one that failed
  }
  return out;
}

/**
 * Puts `v` back to `image`. The CPUID table cannot be written back (KVM refuses
 * `KVM_SET_CPUID2` after a vCPU ran unless the table is the one it holds), so it is compared
 * instead, last, once CR4 and XCR0 are back (KVM derives some CPUID bits from them). Throws on
 * any failure or difference: the caller then destroys the VM instead of keeping it.
 */
export function wipeVcpu(v: KvmVcpu, image: PowerOnImage, cpuidOf: (v: KvmVcpu) => Uint8Array): void {
  // Registers written into kvm_run but not loaded yet must not reach the immediate-exit run.
  v.dropSynced(KVM_CONST.SYNC_X86_REGS | KVM_CONST.SYNC_X86_SREGS | KVM_CONST.SYNC_X86_EVENTS);
  // Finish what the last exit left pending (an `in`, an MMIO read) now, not in the next guest.
  v.completePendingExit();
  v.setGuestDebug(0);
  for (const k of BLOBS) { const b = image.blobs[k]; if (b) v.setBlob(k, b); }
  v.setRegs(image.regs);
  v.setSregs(image.sregs);
  v.setMsrs(image.msrs);
  if (image.fixedMsrs.length > 0) {
    const now = v.getMsrs(image.fixedMsrs.map((e) => e.index));
    image.fixedMsrs.forEach((e, i) => {
      if (now[i]?.data !== e.data) throw new KvmError('wipe', 22, `MSR 0x${e.index.toString(16)} changed and cannot be reset`);
    });
  }
  // Clears a queued exception, interrupt, NMI, SMM and the interrupt shadow.
  v.setBlob('events', image.events);
  if (!sameBytes(cpuidOf(v), image.cpuid)) throw new KvmError('wipe', 22, 'the vCPU has another CPUID table than at power-on');
}

/** Native compare: a CPUID table is ~10 KB, a JS loop over it costs more than the ioctl. */
function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}
