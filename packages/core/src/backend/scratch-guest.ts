/**
 * One throw-away guest for host probes: a VM without irqchip, one page of RAM at 0 holding
 * `code`, vCPU 0 in real mode at 0, run exit by exit until `onExit` says stop, `hlt`, or
 * `maxExits`. Everything it made is closed before it returns, whatever happened. The I/O-RIP
 * probe and the CPUID-control probe are both one of these.
 * @module
 */
import type { Backend, BackendVcpu } from '../backend.js';
import type { VcpuExit } from '../exits.js';

/** What a probe does with its guest. */
export interface ScratchGuest {
  /** Name of the RAM allocation (for `/proc` and error messages). */
  readonly name: string;
  /** Real-mode code placed at guest-physical 0 (at most one page). */
  readonly code: Uint8Array;
  /** Runs on vCPU 0 after it is in real mode at 0, before the first `KVM_RUN` (e.g. set CPUID). */
  readonly setup?: (vcpu: BackendVcpu) => void;
  /** Called with every exit but `hlt`; return `false` to end the run. */
  readonly onExit: (exit: VcpuExit, vcpu: BackendVcpu) => boolean;
  /** Exits after which the run ends anyway. */
  readonly maxExits: number;
}

/** Runs `guest` on a VM of its own; throws what the backend throws. @returns whether the guest reached `hlt`. */
export function runScratchGuest(backend: Backend, guest: ScratchGuest): boolean {
  const vm = backend.createVm({ irqchip: false });
  const mem = vm.allocateMemory(4096, guest.name);
  let vcpu: BackendVcpu | undefined;
  try {
    mem.bytes.set(guest.code, 0);
    vm.mapMemory(0, 0n, mem, 4096, { readonly: false, logDirty: false });
    vcpu = vm.createVcpu(0);
    const s = vcpu.getSregs();
    for (const seg of [s.cs, s.ds, s.es, s.ss]) { seg.base = 0n; seg.selector = 0; }
    vcpu.setSregs(s);
    vcpu.setRegs({ ...vcpu.getRegs(), rip: 0n, rflags: 2n, rsp: 0xf00n });
    guest.setup?.(vcpu);
    for (let n = 0; n < guest.maxExits; n++) {
      vcpu.beginSlice(50_000_000);
      let exit: VcpuExit;
      try { exit = vcpu.run(); } finally { vcpu.endSlice(); }
      if (exit.kind === 'hlt') return true;
      if (!guest.onExit(exit, vcpu)) return false;
    }
    return false;
  } finally {
    vcpu?.close();
    try { vm.unmapMemory(0); } catch { /* closing the VM frees it too */ }
    mem.close();
    vm.close();
  }
}
