/**
 * `MockBackend`: a `Backend` that replays scripted exits, so the run loop, hooks and devices
 * can be tested without `/dev/kvm` (the serialport "mock binding" habit). Guest RAM is plain
 * `ArrayBuffer`s; registers are stored; completions are recorded for assertions.
 * @module
 */
import { readSync } from 'node:fs';
import type { Backend, BackendRunners, BackendVcpu, BackendVm, CoalescedEntry, CpuidEntry, HostCapabilities, MsrEntry, NmiWakeState, Regs, Sregs } from '../backend.js';
import type { HostMemory } from '../memory.js';
import type { VcpuExit } from '../exits.js';
import { RIP_ON_INSTRUCTION } from '../cpu/io-rip.js';

/** One scripted step: an exit, or a function computing it from the mock vCPU. */
export type MockStep = VcpuExit | ((vcpu: MockVcpu) => VcpuExit);

const zeroSeg = () => ({ base: 0n, limit: 0xffff, selector: 0, type: 3, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0 });

/** The mock's vCPU: scripted exits and recorded completions. */
export class MockVcpu implements BackendVcpu {
  /** vCPU index. */
  readonly id: number;
  /** Remaining scripted steps. */
  readonly steps: MockStep[] = [];
  /** Data supplied for reads, in order. */
  readonly reads: Uint8Array[] = [];
  /** Exceptions raised with `faultInstruction`, in order. */
  readonly faults: Array<{ vector: number; errorCode: number | undefined; rip: bigint }> = [];
  /** MSR completions, in order. */
  readonly msrs: Array<{ data: bigint; error: boolean }> = [];
  /** Coalesced entries returned by the next drain. */
  coalesced: CoalescedEntry[] = [];
  /** Whether the mock vCPU reports itself halted. */
  halted = false;
  /**
   * Whether the mock vCPU reports itself waiting for INIT/SIPI (as an application processor of
   * a multi-vCPU machine does until the guest starts it). Default false: scripts decide.
   */
  waitingSipi = false;
  /** What `nmiWakeState()` reports (nothing pending, nothing routed by default). */
  nmi: NmiWakeState = { pending: false, masked: false, source: undefined };
  /** Number of `run()` calls. */
  runs = 0;
  /** Slices begun. */
  slices = 0;
  /** Register file. */
  regs: Regs = { rax: 0n, rbx: 0n, rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: 0n, rbp: 0n, r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n, rip: 0xfff0n, rflags: 2n };
  /** Special registers. */
  sregs: Sregs = {
    cs: zeroSeg(), ds: zeroSeg(), es: zeroSeg(), fs: zeroSeg(), gs: zeroSeg(), ss: zeroSeg(), tr: zeroSeg(), ldt: zeroSeg(),
    gdt: { base: 0n, limit: 0xffff }, idt: { base: 0n, limit: 0xffff },
    cr0: 0x60000010n, cr2: 0n, cr3: 0n, cr4: 0n, cr8: 0n, efer: 0n, apic_base: 0xfee00900n, interrupt_bitmap: [0n, 0n, 0n, 0n],
  };
  /** What to return when the script runs out. */
  whenEmpty: VcpuExit = { kind: 'hlt' };
  #msr = new Map<number, bigint>();
  #cpuid: CpuidEntry[] = [];

  /** @param id - vCPU index. */
  constructor(id: number) {
    this.id = id;
  }

  /** Appends steps to the script. */
  script(...steps: MockStep[]): this {
    this.steps.push(...steps);
    return this;
  }

  run(): VcpuExit {
    this.runs++;
    // Like KVM's slice timer: a script that never stops (say `whenEmpty` is an `out`) still
    // hands control back, so `run({ timeout })` ends and the event loop turns. The clock is read
    // every 256 runs only, which keeps the mock's own cost per exit at a few ns.
    if ((this.runs & 255) === 0 && this.#sliceEnd !== 0 && performance.now() >= this.#sliceEnd) {
      this.#sliceEnd = 0;
      return { kind: 'intr' };
    }
    const s = this.steps.shift();
    if (s === undefined) return this.whenEmpty;
    return typeof s === 'function' ? s(this) : s;
  }

  /** When the current slice ends (performance.now() ms; 0 when none is armed). */
  #sliceEnd = 0;

  completeRead(data: Uint8Array): void { this.reads.push(data.slice()); }
  completeMsr(data: bigint, error: boolean): void { this.msrs.push({ data, error }); }
  faultInstruction(vector: number, errorCode: number | undefined, rip: bigint): void { this.faults.push({ vector, errorCode, rip }); }
  beginSlice(ns: number): void { this.slices++; this.#sliceEnd = performance.now() + ns / 1e6; }
  endSlice(): void { this.#sliceEnd = 0; }
  getRegs(): Regs { return { ...this.regs }; }
  setRegs(regs: Regs): void { this.regs = { ...regs }; }
  getSregs(): Sregs { return structuredClone(this.sregs); }
  setSregs(sregs: Sregs): void { this.sregs = structuredClone(sregs); }
  setCpuid(entries: readonly CpuidEntry[]): void { this.#cpuid = entries.slice(); }
  supportedCpuid(): CpuidEntry[] { return this.#cpuid.slice(); }
  getMsrs(indices: readonly number[]): MsrEntry[] { return indices.map((index) => ({ index, data: this.#msr.get(index) ?? 0n })); }
  setMsrs(entries: readonly MsrEntry[]): void { for (const e of entries) this.#msr.set(e.index, e.data); }
  isHalted(): boolean { return this.halted; }
  waitingForSipi(): boolean { return this.waitingSipi; }
  nmiWakeState(): NmiWakeState { return { ...this.nmi }; }
  /** `setGuestDebug` calls, in order. */
  readonly debug: Array<{ control: number; debugreg: readonly bigint[] }> = [];
  setGuestDebug(control: number, debugreg: readonly bigint[] = []): void { this.debug.push({ control, debugreg: debugreg.slice() }); }
  drainCoalesced(): CoalescedEntry[] { const c = this.coalesced; this.coalesced = []; return c; }
  /** `completePendingExit()` calls. */
  pendingCompletions = 0;
  completePendingExit(): void { this.pendingCompletions++; }
  /** What {@link msrIndexList} returns (MSRs a snapshot saves). */
  msrIndices: number[] = [0x10, 0xc0000080];
  msrIndexList(): readonly number[] { return this.msrIndices; }
  /** Opaque state blobs (tests may put any here; snapshots carry them through). */
  state: Record<string, Uint8Array> = {};
  getState(): Record<string, Uint8Array> { return Object.fromEntries(Object.entries(this.state).map(([k, v]) => [k, v.slice()])); }
  setState(state: Record<string, Uint8Array>): void { this.state = Object.fromEntries(Object.entries(state).map(([k, v]) => [k, v.slice()])); }
  close(): void { this.steps.length = 0; }
}

/** The mock's VM. */
export class MockVm implements BackendVm {
  /** vCPUs created so far. */
  readonly vcpus: MockVcpu[] = [];
  /** Memslots currently mapped. */
  readonly slots = new Map<number, { start: bigint; size: number; readonly: boolean }>();
  /** IRQ line changes, in order. */
  readonly irqs: Array<{ irq: number; level: boolean }> = [];
  /** Host memory objects still open. */
  openMemory = 0;
  /** Whether `close()` ran. */
  closed = false;
  readonly #backend: MockBackend;

  /** @internal */
  constructor(backend: MockBackend) {
    this.#backend = backend;
  }

  allocateMemory(size: number): HostMemory {
    this.openMemory++;
    let open = true;
    const mem = { bytes: new Uint8Array(size), hostAddress: 0n, fd: -1, close: () => { if (open) { open = false; this.openMemory--; } } };
    return mem;
  }
  allocateMemoryFrom(source: HostMemory, offset: number, size: number): HostMemory {
    const m = this.allocateMemory(size);
    // A file (a loaded snapshot) has no bytes in the mock: read it, as a private mapping would.
    if (source.bytes.length >= offset + size || source.fd < 0) m.bytes.set(source.bytes.subarray(offset, offset + size));
    else readSync(source.fd, m.bytes, 0, size, offset);
    return m;
  }
  /** VM-wide state blobs (irqchip, PIT, clock on KVM). */
  state: Record<string, Uint8Array> = {};
  getState(): Record<string, Uint8Array> { return Object.fromEntries(Object.entries(this.state).map(([k, v]) => [k, v.slice()])); }
  setState(state: Readonly<Record<string, Uint8Array>>): void { this.state = Object.fromEntries(Object.entries(state).map(([k, v]) => [k, v.slice()])); }
  mapMemory(slot: number, start: bigint, _host: HostMemory, size: number, flags: { readonly: boolean }): void { this.slots.set(slot, { start, size, readonly: flags.readonly }); }
  unmapMemory(slot: number): void { this.slots.delete(slot); }
  dirtyLog(_slot: number, size: number): Uint8Array { return new Uint8Array(Math.ceil(size / 4096 / 64) * 8); }
  irqLine(irq: number, level: boolean): void { this.irqs.push({ irq, level }); }
  registerCoalesced(): void { /* nothing */ }
  unregisterCoalesced(): void { /* nothing */ }
  /** The last MSR intercept set. */
  msrIntercepts: { reads: number[]; writes: number[] } | undefined;
  setMsrIntercepts(reads: readonly number[], writes: readonly number[]): void { this.msrIntercepts = { reads: reads.slice(), writes: writes.slice() }; }
  createVcpu(id: number): BackendVcpu {
    const pre = this.#backend.nextVcpus.get(id);
    this.#backend.nextVcpus.delete(id);
    const v = pre ?? (id === 0 ? this.#backend.nextVcpu : undefined) ?? new MockVcpu(id);
    if (id === 0 || v === this.#backend.nextVcpu) this.#backend.nextVcpu = undefined;
    this.vcpus.push(v);
    return v;
  }
  /** Runner sets started with {@link startRunners}. */
  readonly runners: MockRunners[] = [];
  async startRunners(vcpus: readonly BackendVcpu[]): Promise<BackendRunners> {
    const r = new MockRunners(vcpus as MockVcpu[]);
    this.runners.push(r);
    return r;
  }
  close(): void { this.closed = true; }
}

/**
 * The mock's runner threads (`vcpuThreads: 'parallel'`), without threads: a started run is
 * computed at once (the vCPU's next scripted step) and queued; `wait` returns the runs in the
 * order they were started, so tests of the parallel loop are deterministic. `order` can reorder:
 * a function picking which queued vCPU ends first.
 */
export class MockRunners implements BackendRunners {
  readonly #vcpus: readonly MockVcpu[];
  readonly #exits = new Map<number, VcpuExit>();
  readonly #queue: number[] = [];
  /** Interrupts, by vCPU (each makes that vCPU's next finished run an `intr`). */
  readonly interrupts: number[] = [];
  /** Starts by vCPU, with whether each began a new slice. */
  readonly starts: Array<{ vcpu: number; fresh: boolean; sliceNs: number }> = [];
  /** Picks which of the queued vCPUs' runs ends next (default: the first started). */
  order: (queued: readonly number[]) => number = (q) => q[0] as number;
  /** Whether `close()` ran. */
  closed = false;

  /** @internal */
  constructor(vcpus: readonly MockVcpu[]) {
    this.#vcpus = vcpus;
  }
  start(i: number, sliceNs: number): void {
    const v = this.#vcpus[i] as MockVcpu;
    if (this.#queue.includes(i) || this.#exits.has(i)) throw new Error(`mock runner ${i} started twice`);
    if (sliceNs > 0) v.beginSlice(sliceNs);
    this.starts.push({ vcpu: i, fresh: sliceNs > 0, sliceNs });
    this.#exits.set(i, v.run());
    this.#queue.push(i);
  }
  wait(): number {
    if (this.#queue.length === 0) return -1;
    const i = this.order(this.#queue);
    this.#queue.splice(this.#queue.indexOf(i), 1);
    return i;
  }
  exit(i: number): VcpuExit {
    const e = this.#exits.get(i);
    this.#exits.delete(i);
    if (e === undefined) throw new Error(`mock runner ${i} has no exit`);
    return e;
  }
  interrupt(i: number): void {
    if (!this.#queue.includes(i)) return;
    this.interrupts.push(i);
    // A real exit already computed stands (it raced the interrupt); a slice end is what it was anyway.
  }
  busy(i: number): boolean { return this.#queue.includes(i) || this.#exits.has(i); }
  close(): void { this.closed = true; }
}

/** A `Backend` for tests. */
export class MockBackend implements Backend {
  /** Always `'mock'`. */
  readonly name = 'mock';
  /**
   * Capabilities (all on by default, RIP on the instruction at I/O exits as on VMX/SVM;
   * override in the constructor, e.g. `ioExitRip` to act like PVM).
   */
  readonly capabilities: HostCapabilities;
  /** VMs created. */
  readonly vms: MockVm[] = [];
  /** A pre-scripted vCPU handed to the next `createVcpu` of vCPU 0 (so tests can script before `Machine.create`). */
  nextVcpu: MockVcpu | undefined;
  /** Pre-scripted vCPUs by index, for the next machine's `createVcpu(id)` ({@link scriptVcpu}). */
  readonly nextVcpus = new Map<number, MockVcpu>();

  /** @param caps - capabilities to override. */
  constructor(caps: Partial<HostCapabilities> = {}) {
    this.capabilities = {
      flavour: 'mock', readonlyMemory: true, coalescedMmio: true, coalescedPio: true, irqchip: true, userSpaceMsr: true,
      guestDebug: true, dirtyLogRing: false, immediateExit: true, eventfds: false, maxMemslots: 32,
      ioExitRip: RIP_ON_INSTRUCTION, ...caps,
    };
  }

  /** Scripts the vCPU the next machine will get. */
  script(...steps: MockStep[]): MockVcpu {
    this.nextVcpu = new MockVcpu(0).script(...steps);
    return this.nextVcpu;
  }

  /** Scripts vCPU `id` of the next machine (a multi-vCPU machine's others run `whenEmpty`: `hlt`). */
  scriptVcpu(id: number, ...steps: MockStep[]): MockVcpu {
    const v = new MockVcpu(id).script(...steps);
    if (id === 0) this.nextVcpu = v;
    else this.nextVcpus.set(id, v);
    return v;
  }

  createVm(): BackendVm {
    const vm = new MockVm(this);
    this.vms.push(vm);
    return vm;
  }
}

/** Builds an `out` exit (helper for scripts). */
export function outExit(port: number, value: number, size: 1 | 2 | 4 = 1): VcpuExit {
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i++) data[i] = (value >>> (8 * i)) & 0xff;
  return { kind: 'io', direction: 'out', port, size, count: 1, data };
}

/** Builds an `in` exit. */
export function inExit(port: number, size: 1 | 2 | 4 = 1): VcpuExit {
  return { kind: 'io', direction: 'in', port, size, count: 1, data: new Uint8Array(0) };
}

/** Builds an MMIO exit. */
export function mmioExit(address: bigint, size: number, write?: number): VcpuExit {
  const data = new Uint8Array(write === undefined ? 0 : size);
  if (write !== undefined) for (let i = 0; i < Math.min(size, 4); i++) data[i] = (write >>> (8 * i)) & 0xff;
  return { kind: 'mmio', address, isWrite: write !== undefined, size, data };
}
