/**
 * The real backend: `Backend` implemented on `@tsvm/kvm-backend`. This is where policy that
 * the raw layer must not have lives: capability discovery, the preemption signal mask, and
 * decoding `kvm_run` into a {@link VcpuExit} (copying the data out).
 * @module
 */
import { readFileSync } from 'node:fs';
import {
  KVM_CAP, KVM_CONST, KVM_EXIT, KVM_RUN_OFFSETS as O, KvmSystem, MemfdMapping, armSlice, disarmSlice,
  consumeSliceSignal, runSignalMask, KvmError, VCPU_EVENTS_OFFSETS as EV, IOAPIC_REDIRTBL_OFFSET,
  type KvmVcpu, type KvmVm, type CpuidEntry,
} from '@tsvm/kvm-backend';
import type { Backend, BackendVcpu, BackendVm, BackendVmOptions, HostCapabilities, NmiWakeState, VirtFlavour } from '../backend.js';
import type { HostMemory } from '../memory.js';
import type { VcpuExit } from '../exits.js';

const EMPTY = new Uint8Array(0);

function detectFlavour(): VirtFlavour {
  try {
    const mods = readFileSync('/proc/modules', 'utf8');
    if (/^kvm_pvm /m.test(mods)) return 'pvm';
    if (/^kvm_intel /m.test(mods)) return 'vmx';
    if (/^kvm_amd /m.test(mods)) return 'svm';
  } catch { /* /proc/modules may be absent in containers */ }
  try {
    const dirs = ['kvm_pvm', 'kvm_intel', 'kvm_amd'] as const;
    const map: Record<(typeof dirs)[number], VirtFlavour> = { kvm_pvm: 'pvm', kvm_intel: 'vmx', kvm_amd: 'svm' };
    for (const d of dirs) {
      try { readFileSync(`/sys/module/${d}/parameters/${d === 'kvm_pvm' ? 'force' : 'nested'}`); return map[d]; } catch { /* next */ }
    }
  } catch { /* ignore */ }
  return 'unknown';
}

/** The KVM backend. Opening it opens `/dev/kvm` once; VMs share that fd. */
export class KvmBackend implements Backend {
  /** Always `'kvm'`. */
  readonly name = 'kvm';
  /** What this host's KVM offers. */
  readonly capabilities: HostCapabilities;
  /** The open `/dev/kvm`. */
  readonly system: KvmSystem;
  #cpuid: CpuidEntry[] | undefined;

  /** Opens `/dev/kvm` (throws `KvmUnavailableError` with a reason). */
  constructor(path = '/dev/kvm') {
    this.system = KvmSystem.open(path);
    const s = this.system;
    this.capabilities = {
      flavour: detectFlavour(),
      readonlyMemory: s.has('READONLY_MEM'),
      coalescedMmio: s.has('COALESCED_MMIO'),
      coalescedPio: s.has('COALESCED_PIO'),
      irqchip: s.has('IRQCHIP'),
      userSpaceMsr: s.has('X86_USER_SPACE_MSR') && s.has('X86_MSR_FILTER'),
      guestDebug: s.has('SET_GUEST_DEBUG'),
      dirtyLogRing: s.has('DIRTY_LOG_RING_ACQ_REL'),
      immediateExit: s.has('IMMEDIATE_EXIT'),
      eventfds: s.has('IOEVENTFD') && s.has('IRQFD'),
      maxMemslots: s.has('NR_MEMSLOTS') ? s.checkExtension(KVM_CAP.NR_MEMSLOTS) : 32,
    };
  }

  /**
   * The CPUID table a new vCPU gets: what this host's KVM supports, plus the "running under a
   * hypervisor" bit (leaf 1, ECX bit 31) that `KVM_GET_SUPPORTED_CPUID` leaves clear and every
   * VMM sets. Without it Linux never looks at KVM's leaves (0x40000000+), so it gets no
   * kvm-clock and must calibrate the TSC against the PIT, which fails on slow hosts. Cached.
   */
  supportedCpuid(): CpuidEntry[] {
    this.#cpuid ??= withHypervisorBit(this.system.supportedCpuid());
    return this.#cpuid;
  }

  /** Creates a VM. */
  createVm(options: BackendVmOptions): BackendVm {
    const vm = this.system.createVm();
    try {
      // Intel needs a TSS and identity map page for real mode; harmless elsewhere. Placed in
      // the 3 pages below 4 GiB that firmware traditionally reserves (never guest RAM here).
      if (this.system.has('SET_TSS_ADDR')) vm.setTssAddr(0xfffbd000);
      if (options.irqchip) {
        vm.createIrqchip();
        // Without SPEAKER_DUMMY KVM leaves port 0x61 (PIT channel 2 gate/output, which Linux
        // reads to calibrate the TSC) to userspace; with it the kernel answers like a PC.
        vm.createPit2(KVM_CONST.PIT_SPEAKER_DUMMY);
      }
    } catch (e) {
      vm.close();
      throw e;
    }
    return new KvmBackendVm(vm, this);
  }

  /** Closes `/dev/kvm`. */
  close(): void {
    this.system.close();
  }
}

class KvmBackendVm implements BackendVm {
  readonly #vm: KvmVm;
  readonly #backend: KvmBackend;
  readonly #dirtyBufs = new Map<number, MemfdMapping>();
  #msrFilterEnabled = false;

  constructor(vm: KvmVm, backend: KvmBackend) {
    this.#vm = vm;
    this.#backend = backend;
  }

  allocateMemory(size: number, name: string): HostMemory {
    return MemfdMapping.create(size, name);
  }

  mapMemory(slot: number, start: bigint, host: HostMemory, size: number, flags: { readonly: boolean; logDirty: boolean }): void {
    this.#vm.setUserMemoryRegion(slot, start, size, host.hostAddress, flags);
  }

  unmapMemory(slot: number): void {
    this.#vm.setUserMemoryRegion(slot, 0n, 0, 0n);
    this.#dirtyBufs.get(slot)?.close();
    this.#dirtyBufs.delete(slot);
  }

  dirtyLog(slot: number, size: number): Uint8Array {
    const bytes = Math.ceil(size / 4096 / 64) * 8;
    let buf = this.#dirtyBufs.get(slot);
    if (!buf || buf.size < bytes) {
      buf?.close();
      // KVM writes the bitmap through a user pointer, so it needs a stable native address.
      buf = MemfdMapping.create(Math.max(4096, Math.ceil(bytes / 4096) * 4096), 'tsvm-dirty');
      this.#dirtyBufs.set(slot, buf);
    }
    this.#vm.getDirtyLog(slot, buf.hostAddress);
    return buf.bytes.slice(0, bytes);
  }

  irqLine(irq: number, level: boolean): void {
    this.#vm.irqLine(irq, level);
  }

  registerCoalesced(address: bigint, size: number, pio: boolean): void {
    this.#vm.registerCoalesced(address, size, pio);
  }

  unregisterCoalesced(address: bigint, size: number, pio: boolean): void {
    this.#vm.unregisterCoalesced(address, size, pio);
  }

  setMsrIntercepts(reads: readonly number[], writes: readonly number[]): void {
    if (!this.#msrFilterEnabled) {
      this.#vm.enableCap(KVM_CAP.X86_USER_SPACE_MSR, [BigInt(KVM_CONST.MSR_EXIT_REASON_FILTER | KVM_CONST.MSR_EXIT_REASON_UNKNOWN)]);
      this.#msrFilterEnabled = true;
    }
    // One range per intercepted MSR: its single bitmap bit is 0 ("deny" → exit to userspace).
    const ranges: Array<{ flags: number; base: number; nmsrs: number; bitmapAddress: bigint }> = [];
    const zero = MemfdMapping.create(4096, 'tsvm-msr-bitmap');
    try {
      for (const ix of reads) ranges.push({ flags: KVM_CONST.MSR_FILTER_READ, base: ix, nmsrs: 1, bitmapAddress: zero.hostAddress });
      for (const ix of writes) ranges.push({ flags: KVM_CONST.MSR_FILTER_WRITE, base: ix, nmsrs: 1, bitmapAddress: zero.hostAddress });
      if (ranges.length > 16) throw new KvmError('KVM_X86_SET_MSR_FILTER', 7, 'at most 16 intercepted MSRs');
      this.#vm.setMsrFilter(false, ranges);
    } finally {
      zero.close();
    }
  }

  createVcpu(id: number): BackendVcpu {
    const vcpu = this.#vm.createVcpu(id);
    try {
      const cpuid = this.#backend.supportedCpuid();
      vcpu.setCpuid(cpuid);
      vcpu.setSignalMask(runSignalMask());
      return new KvmBackendVcpu(vcpu, cpuid, this.#vm);
    } catch (e) {
      vcpu.close();
      throw e;
    }
  }

  close(): void {
    for (const b of this.#dirtyBufs.values()) b.close();
    this.#dirtyBufs.clear();
    this.#vm.close();
  }
}

class KvmBackendVcpu implements BackendVcpu {
  readonly id: number;
  readonly #v: KvmVcpu;
  readonly #cpuid: CpuidEntry[];
  #pendingIo: { offset: number; length: number } | undefined;
  #pendingMmio = false;
  #pendingMsr = false;
  readonly #vm: KvmVm;

  constructor(v: KvmVcpu, cpuid: CpuidEntry[], vm: KvmVm) {
    this.#v = v;
    this.#vm = vm;
    this.id = v.id;
    this.#cpuid = cpuid;
  }

  run(): VcpuExit {
    const reason = this.#v.run();
    this.#pendingIo = undefined;
    this.#pendingMmio = false;
    this.#pendingMsr = false;
    const r = this.#v.run_;
    switch (reason) {
      case KVM_EXIT.IO: {
        const direction = r.getUint8(O.io_direction) === KVM_CONST.EXIT_IO_OUT ? 'out' : 'in';
        const size = r.getUint8(O.io_size) as 1 | 2 | 4;
        const count = r.getUint32(O.io_count, true);
        const off = Number(r.getBigUint64(O.io_data_offset, true));
        const len = size * count;
        if (direction === 'in') {
          this.#pendingIo = { offset: off, length: len };
          return { kind: 'io', direction, port: r.getUint16(O.io_port, true), size, count, data: EMPTY };
        }
        // Copy out: the exit value must not alias kvm_run.
        return { kind: 'io', direction, port: r.getUint16(O.io_port, true), size, count, data: this.#v.runBytes.slice(off, off + len) };
      }
      case KVM_EXIT.MMIO: {
        const isWrite = r.getUint8(O.mmio_is_write) !== 0;
        const size = r.getUint32(O.mmio_len, true);
        if (!isWrite) this.#pendingMmio = true;
        return {
          kind: 'mmio', address: r.getBigUint64(O.mmio_phys_addr, true), isWrite, size,
          data: isWrite ? this.#v.runBytes.slice(O.mmio_data, O.mmio_data + Math.min(size, 8)) : EMPTY,
        };
      }
      case KVM_EXIT.HLT: return { kind: 'hlt' };
      case KVM_EXIT.SHUTDOWN: return { kind: 'shutdown' };
      case KVM_EXIT.INTR: return { kind: 'intr' };
      case KVM_EXIT.DEBUG:
        return { kind: 'debug', exception: r.getUint32(O.debug_exception, true), pc: r.getBigUint64(O.debug_pc, true), dr6: r.getBigUint64(O.debug_dr6, true), dr7: r.getBigUint64(O.debug_dr7, true) };
      case KVM_EXIT.HYPERCALL:
        return { kind: 'hypercall', nr: r.getBigUint64(O.hypercall_nr, true), args: [0, 1, 2, 3, 4, 5].map((i) => r.getBigUint64(O.hypercall_args + i * 8, true)) };
      case KVM_EXIT.X86_RDMSR: case KVM_EXIT.X86_WRMSR:
        this.#pendingMsr = true;
        return { kind: 'msr', direction: reason === KVM_EXIT.X86_RDMSR ? 'read' : 'write', index: r.getUint32(O.msr_index, true), data: r.getBigUint64(O.msr_data, true), reason: r.getUint32(O.msr_reason, true) };
      case KVM_EXIT.FAIL_ENTRY:
        return { kind: 'fail-entry', reason: r.getBigUint64(O.fail_entry_reason, true), cpu: r.getUint32(O.fail_entry_cpu, true) };
      case KVM_EXIT.INTERNAL_ERROR: {
        const n = Math.min(r.getUint32(O.internal_ndata, true), 16);
        return { kind: 'internal-error', suberror: r.getUint32(O.internal_suberror, true), data: Array.from({ length: n }, (_, i) => r.getBigUint64(O.internal_data + i * 8, true)) };
      }
      case KVM_EXIT.SYSTEM_EVENT: {
        const n = Math.min(r.getUint32(O.system_event_ndata, true), 16);
        return { kind: 'system-event', type: r.getUint32(O.system_event_type, true), data: Array.from({ length: n }, (_, i) => r.getBigUint64(O.system_event_data + i * 8, true)) };
      }
      case KVM_EXIT.EXCEPTION:
        return { kind: 'exception', vector: r.getUint32(O.ex_exception, true), errorCode: r.getUint32(O.ex_error_code, true) };
      default:
        return { kind: 'unsupported', reason };
    }
  }

  completeRead(data: Uint8Array): void {
    if (this.#pendingIo) {
      const { offset, length } = this.#pendingIo;
      this.#v.runBytes.set(data.subarray(0, length), offset);
      this.#pendingIo = undefined;
    } else if (this.#pendingMmio) {
      this.#v.runBytes.set(data.subarray(0, 8), O.mmio_data);
      this.#pendingMmio = false;
    }
  }

  faultInstruction(vector: number, errorCode?: number): void {
    // At an I/O or MMIO exit RIP still points at the instruction; KVM finishes (and skips)
    // it only inside the next KVM_RUN. Let it finish without running anything else, then
    // put every register back — RIP onto the instruction, RAX as before an `in` — and queue
    // the exception, so the guest sees a fault *on* the access and the access had no effect.
    const regs = this.#v.getRegs();
    if (this.#pendingIo) this.#v.runBytes.fill(0xff, this.#pendingIo.offset, this.#pendingIo.offset + this.#pendingIo.length);
    this.#pendingIo = undefined;
    this.#pendingMmio = false;
    this.#v.completePendingExit();
    this.#v.setRegs(regs);
    this.#v.injectException(vector, errorCode);
  }

  completeMsr(data: bigint, error: boolean): void {
    if (!this.#pendingMsr) return;
    this.#v.run_.setUint8(O.msr_error, error ? 1 : 0);
    this.#v.run_.setBigUint64(O.msr_data, BigInt.asUintN(64, data), true);
    this.#pendingMsr = false;
  }

  beginSlice(ns: number): void { armSlice(ns); }
  endSlice(): void { disarmSlice(); consumeSliceSignal(); }
  getRegs() { return this.#v.getRegs(); }
  setRegs(regs: Parameters<BackendVcpu['setRegs']>[0]) { this.#v.setRegs(regs); }
  getSregs() { return this.#v.getSregs(); }
  setSregs(s: Parameters<BackendVcpu['setSregs']>[0]) { this.#v.setSregs(s); }
  setCpuid(entries: readonly CpuidEntry[]) { this.#v.setCpuid(entries); }
  supportedCpuid() { return this.#cpuid.slice(); }
  getMsrs(indices: readonly number[]) { return this.#v.getMsrs(indices); }
  setMsrs(entries: Parameters<BackendVcpu['setMsrs']>[0]) { this.#v.setMsrs(entries); }
  isHalted() { return this.#v.getMpState() === KVM_CONST.MP_STATE_HALTED; }

  nmiWakeState(): NmiWakeState {
    const ev = this.#v.getBlob('events');
    return {
      pending: ev[EV.nmi_pending] !== 0 || ev[EV.nmi_injected] !== 0,
      masked: ev[EV.nmi_masked] !== 0,
      source: this.#nmiSource(),
    };
  }

  /** The first configured NMI source (LAPIC LVT or IOAPIC entry in NMI mode, unmasked), if any. */
  #nmiSource(): string | undefined {
    const nmiMode = (lo: number): boolean => ((lo >>> 8) & 7) === 4 && (lo & 0x1_0000) === 0;
    try {
      const lapic = new DataView(this.#v.getBlob('lapic').buffer);
      for (const [name, off] of [['LAPIC LINT0', 0x350], ['LAPIC perf-counter LVT', 0x340]] as const) {
        if (nmiMode(lapic.getUint32(off, true))) return name;
      }
    } catch { /* no in-kernel LAPIC: nothing routes NMIs */ }
    try {
      const io = this.#vm.getIrqchip(2);
      const v = new DataView(io.buffer, io.byteOffset + IOAPIC_REDIRTBL_OFFSET);
      for (let pin = 0; pin < 24; pin++) if (nmiMode(v.getUint32(pin * 8, true))) return `IOAPIC pin ${pin}`;
    } catch { /* no in-kernel IOAPIC */ }
    return undefined;
  }
  setGuestDebug(control: number, debugreg: readonly bigint[] = []) { this.#v.setGuestDebug(control, debugreg); }
  drainCoalesced() { return this.#v.drainCoalesced(); }

  getState(): Record<string, Uint8Array> {
    const out: Record<string, Uint8Array> = {};
    for (const k of ['fpu', 'lapic', 'events', 'debugregs', 'xsave'] as const) {
      try { out[k] = this.#v.getBlob(k); } catch { /* lapic without irqchip, xsave on old hosts */ }
    }
    return out;
  }

  setState(state: Record<string, Uint8Array>): void {
    for (const k of ['fpu', 'xsave', 'lapic', 'events', 'debugregs'] as const) {
      const b = state[k];
      if (b) this.#v.setBlob(k, b);
    }
  }

  close(): void { this.#v.close(); }
}

/** Sets CPUID.1:ECX.HYPERVISOR (bit 31) in a copy of `entries`. */
export function withHypervisorBit(entries: readonly CpuidEntry[]): CpuidEntry[] {
  return entries.map((e) => (e.function === 1 ? { ...e, ecx: (e.ecx | 0x8000_0000) >>> 0 } : e));
}

let shared: KvmBackend | undefined;

/** The process-wide KVM backend (opened on first use). Throws `KvmUnavailableError`. */
export function kvmBackend(): KvmBackend {
  shared ??= new KvmBackend();
  return shared;
}
