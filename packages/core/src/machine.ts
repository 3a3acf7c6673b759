/**
 * `Machine`: a VM assembled from memory regions, vCPUs, buses and hooks, with a time-sliced
 * run loop that never blocks Node for longer than one slice.
 * @module
 */
import { EventEmitter } from 'eventemitter3';
import type { Backend, BackendVm, HostCapabilities, NmiWakeState } from './backend.js';
import { kvmBackend } from './backend/kvm.js';
import { Bus, type RangeSpec } from './bus.js';
import type { Device, DeviceMapping, IrqLine } from './device.js';
import { HookFailure, InvalidArgumentError, StateError, TsvmError } from './errors.js';
import { checkArray, checkBigint, checkMsrIndices, checkObject, checkOptionalBoolean, show } from './check.js';
import { REG_NAMES } from '@tsvm/kvm-backend';
import type { VcpuExit } from './exits.js';
import { handleExit, type ExitContext, type ExitOutcome } from './handle-exit.js';
import type { ExitHook, HookInfo, HookStats } from './hooks.js';
import { GuestMemory, checkRegionSize, type MemoryRegion } from './memory.js';
import { gpa, hex } from './address.js';
import { ExitCounters, type ExitStats } from './stats.js';
import type { Stop, StopRequest } from './stop.js';
import { Vcpu } from './vcpu.js';
import { EXCEPTION_PORT, SYS, SYSTEM_AREA_SIZE, VECTORS_WITH_ERROR_CODE, setupCpu, type CpuMode } from './cpu/x86.js';
import { bitnessOf, codeAt } from './cpu/paging.js';
import type { EntryState } from './loaders/bootinfo.js';
import { instructionRipOf } from './cpu/exit-rip.js';
import { Snapshot, takeSnapshot, restoreMachine, resetMachine, type RestoreOptions, type ResetResult, type ResetOptions, type MachineInternals } from './snapshot/index.js';

/** A memory region to create. */
export interface RegionOptions {
  /** Guest-physical start (4 KiB aligned). */
  readonly start: number | bigint;
  /** Size in bytes (multiple of 4 KiB). */
  readonly size: number;
  /** Guest writes exit as MMIO instead of reaching RAM. */
  readonly readonly?: boolean;
  /** Track dirty pages. */
  readonly logDirty?: boolean;
  /** Label for diagnostics. */
  readonly name?: string;
}

/** Options of {@link Machine.create}. */
export interface MachineOptions {
  /** Guest RAM: a size in bytes (one region at 0) or explicit regions. */
  readonly memory: number | readonly RegionOptions[];
  /** The hypervisor; defaults to the process-wide KVM backend. */
  readonly backend?: Backend;
  /** Create the in-kernel irqchip and PIT (needed for interrupts). Default false. */
  readonly irqchip?: boolean;
  /** Name used in diagnostics. */
  readonly name?: string;
}

/** Options of {@link Machine.loadFlat}. */
export interface LoadFlatOptions {
  /** Guest-physical load address. */
  readonly at: number;
  /** CPU mode to start in. Default `'real'`. */
  readonly mode?: CpuMode;
  /** Privilege level to start at (protected and long mode). Default 0. */
  readonly ring?: 0 | 3;
  /** Entry point; defaults to `at`. */
  readonly entry?: number;
  /** Initial stack pointer; defaults below the system area (or below `at` in real mode). */
  readonly stack?: number;
}

/** Options of {@link Machine.run}. */
export interface RunOptions {
  /** Stop with `timeout` after this many milliseconds. */
  readonly timeout?: number;
  /** Stop with `aborted` when this signal fires. */
  readonly signal?: AbortSignal;
  /** Slice length in milliseconds (default 10): the longest Node waits for the event loop. */
  readonly sliceMs?: number;
}

/** Lifecycle events (errors are returned or thrown, never emitted). */
export interface MachineEvents {
  /** `run()` started. */
  started: [];
  /** `run()` returned this stop. */
  stopped: [stop: Stop];
  /** The machine was closed. */
  closed: [];
  /** A time slice ended (the vCPU is stopped): a place for sampling work such as dirty logs. */
  slice: [];
}

/** Where the host put things in guest memory. */
export interface MachineLayout {
  /** Base of the 64 KiB area holding host-built GDT/IDT/TSS/page tables (protected/long mode). */
  readonly systemArea: number | undefined;
  /** Port the exception stubs report to. */
  readonly exceptionPort: number;
  /**
   * A free, identity-mapped, user-accessible page of the system area kept for the monitor's
   * probe trampolines (undefined without a system area, i.e. in real mode).
   */
  readonly probeTrampoline: { readonly address: number; readonly size: number } | undefined;
}

const DEFAULT_SLICE_MS = 10;
const MAX_SLOTS = 32;
type SliceResult = { kind: 'stop'; stop: StopRequest } | { kind: 'yield' } | { kind: 'async'; outcome: Promise<ExitOutcome>; exit: VcpuExit };

/** A virtual machine. Create with {@link Machine.create}; release with `close()` or `await using`. */
export class Machine {
  /** Guest RAM (bounds-checked). */
  readonly memory = new GuestMemory();
  /** Port-I/O bus. */
  readonly io = new Bus('pio');
  /** MMIO bus. */
  readonly mmio = new Bus('mmio');
  /** Lifecycle events. */
  readonly events = new EventEmitter<MachineEvents>();
  /** Name for diagnostics. */
  readonly name: string;
  /** What the host supports. */
  readonly capabilities: HostCapabilities;
  /** Whether an in-kernel irqchip exists. */
  readonly irqchip: boolean;

  readonly #backend: Backend;
  readonly #vm: BackendVm;
  readonly #vcpus: Vcpu[] = [];
  readonly #counters = new ExitCounters();
  readonly #hooks: ExitHook[] = [];
  readonly #hookStats = new Map<ExitHook, HookStats>();
  readonly #slots = new Set<number>();
  readonly #logDirty = new Set<number>();
  readonly #devices = new Set<Device>();
  #coalesced: Array<{ start: bigint; size: number; pio: boolean }> = [];
  #hooksSealed = false;
  #running = false;
  #closed = false;
  #seq = 0;
  /** The exit being handled (undefined between exits): what `instructionRip()` explains. */
  #exit: VcpuExit | undefined;
  #explainer: ((exit: VcpuExit, info: HookInfo) => string | undefined) | undefined;
  readonly #sliceHooks: Array<{ readonly name: string; readonly fn: () => void }> = [];
  #systemArea: number | undefined;
  #mode: CpuMode = 'real';

  private constructor(backend: Backend, vm: BackendVm, opts: MachineOptions) {
    this.#backend = backend;
    this.#vm = vm;
    this.name = opts.name ?? 'machine';
    this.capabilities = backend.capabilities;
    this.irqchip = opts.irqchip ?? false;
  }

  /**
   * Creates a machine with guest RAM and one vCPU. Validates every option before touching KVM.
   * @throws InvalidArgumentError for bad options; KvmUnavailableError when KVM is missing.
   */
  static async create(options: MachineOptions): Promise<Machine> {
    if (!options || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    const regions = normaliseRegions(options.memory);
    if (options.irqchip !== undefined && typeof options.irqchip !== 'boolean') throw new InvalidArgumentError('irqchip', 'must be a boolean');
    if (options.name !== undefined && typeof options.name !== 'string') throw new InvalidArgumentError('name', `must be a string, got ${show(options.name)}`);
    if (options.backend !== undefined && (options.backend === null || typeof options.backend !== 'object' || typeof options.backend.createVm !== 'function')) throw new InvalidArgumentError('backend', 'must be a Backend');
    const backend = options.backend ?? kvmBackend();
    const vm = backend.createVm({ irqchip: options.irqchip ?? false });
    const m = new Machine(backend, vm, options);
    try {
      for (const r of regions) m.addRegion(r);
      m.#vcpus.push(new Vcpu(vm.createVcpu(0)));
    } catch (e) {
      m.#teardown();
      throw e;
    }
    return m;
  }

  /** The vCPUs. */
  get vcpus(): readonly Vcpu[] {
    return this.#vcpus;
  }

  /** vCPU `id`. */
  vcpu(id = 0): Vcpu {
    const v = Number.isInteger(id) ? this.#vcpus[id] : undefined;
    if (!v) throw new InvalidArgumentError('id', `no vCPU ${show(id)}`);
    return v;
  }

  /** Where the host placed its tables. */
  get layout(): MachineLayout {
    const sys = this.#systemArea;
    return {
      systemArea: sys, exceptionPort: EXCEPTION_PORT,
      probeTrampoline: sys === undefined ? undefined : { address: sys + SYS.PROBE_TRAMPOLINE, size: 0x1000 },
    };
  }

  /**
   * Adds a RAM region backed by a new memfd.
   * @returns the region (with its slot number).
   */
  addRegion(options: RegionOptions): MemoryRegion {
    this.#assertOpen();
    checkObject(options, 'options');
    checkOptionalBoolean(options.readonly, 'readonly');
    checkOptionalBoolean(options.logDirty, 'logDirty');
    if (options.name !== undefined && typeof options.name !== 'string') throw new InvalidArgumentError('name', `must be a string, got ${show(options.name)}`);
    const size = checkRegionSize(options.size, 'size');
    const start = gpa(options.start, 'start');
    if (start % 4096n !== 0n) throw new InvalidArgumentError('start', `${hex(start)} is not 4 KiB aligned`);
    if (options.readonly && !this.capabilities.readonlyMemory) throw new InvalidArgumentError('readonly', 'this host does not support read-only memslots');
    let slot = 0;
    while (this.#slots.has(slot)) slot++;
    if (slot >= Math.min(MAX_SLOTS, this.capabilities.maxMemslots)) throw new InvalidArgumentError('regions', 'too many memory regions');
    const region: MemoryRegion = { slot, start, size, readonly: options.readonly ?? false, name: options.name ?? `ram${slot}` };
    // Check overlap before allocating anything.
    for (const r of this.memory.regions()) {
      if (start < BigInt(r.start) + BigInt(r.size) && BigInt(r.start) < start + BigInt(size)) {
        throw new InvalidArgumentError('start', `[${hex(start)}, +${size}) overlaps region '${r.name}' at ${hex(r.start)}`);
      }
    }
    const host = this.#vm.allocateMemory(size, `tsvm-${region.name}`);
    try {
      this.memory.addRegion(region, host);
      this.#vm.mapMemory(slot, start, host, size, { readonly: region.readonly, logDirty: options.logDirty ?? false });
    } catch (e) {
      this.memory.removeRegion(slot);
      host.close();
      throw e;
    }
    this.#slots.add(slot);
    if (options.logDirty) this.#logDirty.add(slot);
    return region;
  }

  /** Removes a region by slot and releases its memory. */
  removeRegion(slot: number): void {
    this.#assertOpen();
    if (this.#running) throw new StateError('cannot remove memory while the machine runs');
    if (!this.#slots.has(slot)) throw new InvalidArgumentError('slot', `no region in slot ${show(slot)}`);
    this.#vm.unmapMemory(slot);
    this.memory.removeRegion(slot)?.close();
    this.#slots.delete(slot);
    this.#logDirty.delete(slot);
  }

  /** Dirty-page bitmap of a region since the last call (bit per 4 KiB page). */
  dirtyPages(slot: number): Uint8Array {
    this.#assertOpen();
    const r = this.memory.regions().find((x) => x.slot === slot);
    if (!r) throw new InvalidArgumentError('slot', `no region in slot ${show(slot)}`);
    return this.#vm.dirtyLog(slot, r.size);
  }

  /**
   * Copies `image` to `at` and sets the vCPU up to execute it in `mode` at `ring`.
   * @throws InvalidArgumentError when the image does not fit in RAM or collides with the system area.
   */
  loadFlat(image: Uint8Array, options: LoadFlatOptions): void {
    this.#assertOpen();
    if (!(image instanceof Uint8Array) || image.length === 0) throw new InvalidArgumentError('image', 'must be a non-empty Uint8Array');
    if (!options || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    const mode = options.mode ?? 'real';
    if (!['real', 'protected', 'long'].includes(mode)) throw new InvalidArgumentError('mode', `must be 'real', 'protected' or 'long', got ${show(mode)}`);
    const ring = options.ring ?? 0;
    if (ring !== 0 && ring !== 3) throw new InvalidArgumentError('ring', `must be 0 or 3, got ${show(ring)}`);
    if (mode === 'real' && ring !== 0) throw new InvalidArgumentError('ring', 'real mode has no rings; use protected or long mode for ring 3');
    const at = checkAddr(options.at, 'at');
    const entry = options.entry === undefined ? at : checkAddr(options.entry, 'entry');
    if (!this.memory.contains(at, image.length)) throw new InvalidArgumentError('at', `image [${hex(at)}, +${image.length}) is not inside guest RAM`);
    if (mode === 'real' && at + image.length > 0x100000) throw new InvalidArgumentError('at', 'real-mode code must lie below 1 MiB');
    let systemArea: number | undefined;
    if (mode !== 'real') {
      const first = this.memory.regions()[0];
      if (!first || Number(first.start) !== 0 || first.size < 2 * SYSTEM_AREA_SIZE) throw new InvalidArgumentError('memory', `protected and long mode need a RAM region at 0 of at least ${2 * SYSTEM_AREA_SIZE} bytes`);
      systemArea = Math.min(first.size, 0x100000000) - SYSTEM_AREA_SIZE;
      if (at < systemArea + SYSTEM_AREA_SIZE && at + image.length > systemArea) throw new InvalidArgumentError('at', `image overlaps the system area at ${hex(systemArea)}`);
    }
    const stack = options.stack === undefined ? (systemArea ?? Math.min(at, 0x10000) & ~0xf) : checkAddr(options.stack, 'stack');
    if (!this.memory.contains(entry, 1)) throw new InvalidArgumentError('entry', `${hex(entry)} is not inside guest RAM`);
    this.memory.write(at, image);
    const vcpu = this.vcpu(0).backend;
    const state = setupCpu(this.memory, { regs: vcpu.getRegs(), sregs: vcpu.getSregs() }, { mode, ring, entry, stack, systemArea: systemArea ?? 0, tssBusy: this.capabilities.flavour !== 'svm' });
    vcpu.setSregs(state.sregs);
    vcpu.setRegs(state.regs);
    this.#systemArea = systemArea;
    this.#mode = mode;
    if (mode !== 'real') this.#registerExceptionReporter();
  }

  /**
   * Ranges the host needs for its own tables when a loader's entry state is applied with
   * {@link enter}: pass them as the loaders' `avoid` option so no image lands there.
   */
  hostReserved(): Array<{ start: number; size: number }> {
    const first = this.memory.regions()[0];
    if (!first || Number(first.start) !== 0 || first.size < 2 * SYSTEM_AREA_SIZE) return [];
    return [{ start: Math.min(first.size, 0x100000000) - SYSTEM_AREA_SIZE, size: SYSTEM_AREA_SIZE }];
  }

  /**
   * Establishes the CPU state a loader asked for (`result.entryState` of `loadElf`-style
   * loaders): 32-bit protected mode with paging off, or 64-bit long mode with the host's
   * identity map of the low 4 GiB, both at ring 0, then the loader's registers.
   */
  enter(entry: EntryState): void {
    this.#assertOpen();
    if (!entry || (entry.mode !== 'protected32' && entry.mode !== 'long64')) throw new InvalidArgumentError('entry', "must be a loader EntryState ('protected32' or 'long64')");
    checkBigint(entry.rip, 'entry.rip', 0n, (1n << 64n) - 1n);
    const registers = checkObject(entry.registers, 'entry.registers');
    for (const [k, v] of Object.entries(registers)) {
      if (!(REG_NAMES as readonly string[]).includes(k)) throw new InvalidArgumentError(`entry.registers.${k}`, 'unknown register');
      if (v !== undefined) checkBigint(v, `entry.registers.${k}`, 0n, (1n << 64n) - 1n);
    }
    const reserved = this.hostReserved()[0];
    if (!reserved) throw new InvalidArgumentError('memory', `entering an image needs a RAM region at 0 of at least ${2 * SYSTEM_AREA_SIZE} bytes`);
    if (entry.rip >= BigInt(reserved.start) && entry.rip < BigInt(reserved.start + reserved.size)) throw new InvalidArgumentError('entry.rip', 'lies in the host-reserved system area');
    const vcpu = this.vcpu(0).backend;
    const mode: CpuMode = entry.mode === 'long64' ? 'long' : 'protected';
    // A stack below the system area until the guest sets its own: with RSP=0 the first
    // exception would push into unmapped memory and triple-fault instead of being reported.
    const state = setupCpu(this.memory, { regs: vcpu.getRegs(), sregs: vcpu.getSregs() }, { mode, ring: 0, entry: Number(entry.rip), stack: reserved.start, systemArea: reserved.start, tssBusy: this.capabilities.flavour !== 'svm' });
    if (mode === 'protected') { state.sregs.cr4 = 0n; }
    for (const [k, v] of Object.entries(entry.registers)) if (v !== undefined) state.regs[k as 'rax' | 'rbx' | 'rsi'] = v;
    vcpu.setSregs(state.sregs);
    vcpu.setRegs(state.regs);
    this.#systemArea = reserved.start;
    this.#mode = mode;
    this.#registerExceptionReporter();
  }

  #registerExceptionReporter(): void {
    if (this.io.find(BigInt(EXCEPTION_PORT))) return;
    this.io.register({ port: EXCEPTION_PORT, size: 1 }, {
      name: 'tsvm-exception-reporter',
      write: (_o, value, _s, access) => access.requestStop({ reason: 'exception', vector: value }),
    }, { claim: 'exception' });
  }

  /** An interrupt line of the in-kernel irqchip (requires `irqchip: true`). */
  irqLine(irq: number): IrqLine {
    this.#assertOpen();
    if (!this.irqchip) throw new StateError('interrupt lines need Machine.create({ irqchip: true })');
    if (!Number.isInteger(irq) || irq < 0 || irq > 23) throw new InvalidArgumentError('irq', `must be 0..23, got ${show(irq)}`);
    const vm = this.#vm;
    return {
      irq,
      set: (level: boolean) => { if (!this.#closed) vm.irqLine(irq, level); },
      pulse: () => { if (!this.#closed) { vm.irqLine(irq, true); vm.irqLine(irq, false); } },
    };
  }

  /** Attaches `device` at `range` (`{ port, size }` or `{ address, size }`): `attachDevice([{ range, device }])`. */
  attach(range: RangeSpec, device: Device): () => void {
    checkObject(range, 'range');
    return this.attachDevice([{ range, device }]);
  }

  /**
   * The one way devices join a machine: at every range a device asks for (`device.mappings()`)
   * or a list of mappings, all or nothing. The machine closes attached devices on close.
   * @returns a function that detaches them again.
   */
  attachDevice(source: { mappings(): DeviceMapping[] } | readonly DeviceMapping[]): () => void {
    this.#assertOpen();
    const list = Array.isArray(source) ? source : typeof (source as { mappings?: unknown })?.mappings === 'function' ? (source as { mappings(): DeviceMapping[] }).mappings() : undefined;
    if (!Array.isArray(list)) throw new InvalidArgumentError('source', 'must be a device with mappings() or an array of { range, device }');
    const undo: Array<() => void> = [];
    try {
      list.forEach((m: DeviceMapping, i: number) => {
        if (!m || typeof m !== 'object' || !m.range || typeof m.range !== 'object') throw new InvalidArgumentError(`mappings[${i}].range`, 'must be { port, size } or { address, size }');
        undo.push(('port' in m.range ? this.io : this.mmio).register(m.range, m.device));
      });
    } catch (e) {
      for (const u of undo) u();
      throw e;
    }
    for (const m of list as readonly DeviceMapping[]) this.#devices.add(m.device);
    return () => { for (const u of undo) u(); };
  }

  /** Adds a hook on the exit path. Throws after {@link sealHooks}. */
  addHook(hook: ExitHook): () => void {
    this.#assertOpen();
    if (this.#hooksSealed) throw new StateError('the hook table is sealed');
    if (!hook || typeof hook !== 'object' || typeof hook.name !== 'string' || typeof hook.matches !== 'function' || typeof hook.handle !== 'function' || (hook.mode !== 'mediate' && hook.mode !== 'observe')) {
      throw new InvalidArgumentError('hook', 'must be an ExitHook with name, mode, matches() and handle()');
    }
    this.#hooks.push(hook);
    return () => {
      if (this.#hooksSealed) throw new StateError('the hook table is sealed');
      const i = this.#hooks.indexOf(hook);
      if (i >= 0) this.#hooks.splice(i, 1);
    };
  }

  /**
   * Adds words to core's unhandled-exit stops (deny by default is core's, with or without a
   * monitor): the monitor uses it to name the instruction at RIP. One explainer per machine.
   * @returns a function that removes it again.
   */
  setExplainer(explain: (exit: VcpuExit, info: HookInfo) => string | undefined): () => void {
    this.#assertOpen();
    if (typeof explain !== 'function') throw new InvalidArgumentError('explain', 'must be a function');
    if (this.#explainer) throw new StateError('this machine already has an explainer');
    this.#explainer = explain;
    return () => { if (this.#explainer === explain) this.#explainer = undefined; };
  }

  /**
   * Runs `fn` at every slice boundary, while the vCPU is stopped (for sampling work such as
   * harvesting the dirty log for observers). A throw stops the run with a `hook-error` naming
   * `name` (or the user hook a `HookFailure` names): errors are never parked where nobody reads them.
   * @returns a function that removes it again.
   */
  addSliceHook(name: string, fn: () => void): () => void {
    this.#assertOpen();
    if (typeof name !== 'string' || name === '') throw new InvalidArgumentError('name', 'must be a non-empty string');
    if (typeof fn !== 'function') throw new InvalidArgumentError('fn', 'must be a function');
    const entry = { name, fn };
    this.#sliceHooks.push(entry);
    return () => { const i = this.#sliceHooks.indexOf(entry); if (i >= 0) this.#sliceHooks.splice(i, 1); };
  }

  #runSliceHooks(): StopRequest | undefined {
    for (const h of this.#sliceHooks) {
      try {
        h.fn();
      } catch (error) {
        return error instanceof HookFailure ? { reason: 'hook-error', hook: error.hook, error: error.cause } : { reason: 'hook-error', hook: h.name, error };
      }
    }
    return undefined;
  }

  /** Freezes the hook table and the buses (Solo5's "seal"). */
  sealHooks(): void {
    this.#hooksSealed = true;
    this.io.seal();
    this.mmio.seal();
  }

  /** Per-hook call counts and time. */
  hookStats(): ReadonlyMap<ExitHook, HookStats> {
    return new Map([...this.#hookStats].map(([k, v]) => [k, { ...v }]));
  }

  /**
   * Lets guest writes to a range land in the coalesced ring instead of exiting (far cheaper).
   * They are delivered to devices and observe hooks at the next exit or slice end. Mediate
   * hooks therefore see them late: the monitor never coalesces a range it mediates.
   */
  coalesce(range: RangeSpec): () => void {
    this.#assertOpen();
    if (this.#hooksSealed) throw new StateError('the machine is sealed: a new coalesced range could bypass mediation');
    checkObject(range, 'range');
    const pio = 'port' in range;
    if (pio ? !this.capabilities.coalescedPio : !this.capabilities.coalescedMmio) throw new StateError(`this host has no coalesced ${pio ? 'PIO' : 'MMIO'}`);
    const raw: unknown = pio ? range.port : range.address;
    if (typeof raw === 'number' ? !Number.isSafeInteger(raw) || raw < 0 : typeof raw !== 'bigint' || raw < 0n) throw new InvalidArgumentError('range.start', `must be a non-negative integer, got ${show(raw)}`);
    const start = BigInt(raw as number | bigint);
    if (!Number.isSafeInteger(range.size) || range.size <= 0) throw new InvalidArgumentError('range.size', 'must be positive');
    this.#vm.registerCoalesced(start, range.size, pio);
    const z = { start, size: range.size, pio };
    this.#coalesced.push(z);
    return () => {
      if (this.#closed) return;
      this.#vm.unregisterCoalesced(start, range.size, pio);
      this.#coalesced = this.#coalesced.filter((x) => x !== z);
    };
  }

  /** Ranges currently routed to the coalesced ring (for mediation checks). */
  coalescedRanges(): RangeSpec[] {
    return this.#coalesced.map((z) => (z.pio ? { port: Number(z.start), size: z.size } : { address: z.start, size: z.size }));
  }

  /**
   * Changes a region's memslot flags in place (same host memory, no copy). KVM cannot flip
   * `readonly` on a live slot, so the slot is deleted and re-created; only while stopped.
   */
  setRegionFlags(slot: number, flags: { readonly?: boolean; logDirty?: boolean }): MemoryRegion {
    this.#assertOpen();
    if (this.#running) throw new StateError('cannot change memslot flags while the machine runs');
    checkObject(flags, 'flags');
    checkOptionalBoolean(flags.readonly, 'flags.readonly');
    checkOptionalBoolean(flags.logDirty, 'flags.logDirty');
    const r = this.memory.regions().find((x) => x.slot === slot);
    if (!r) throw new InvalidArgumentError('slot', `no region in slot ${show(slot)}`);
    if (flags.readonly && !this.capabilities.readonlyMemory) throw new InvalidArgumentError('readonly', 'this host does not support read-only memslots');
    const host = this.memory.removeRegion(slot);
    if (!host) throw new InvalidArgumentError('slot', `no region in slot ${slot}`);
    const next: MemoryRegion = { ...r, readonly: flags.readonly ?? r.readonly };
    const logDirty = flags.logDirty ?? this.#logDirty.has(slot);
    this.#vm.unmapMemory(slot);
    this.#vm.mapMemory(slot, BigInt(r.start), host, r.size, { readonly: next.readonly, logDirty });
    this.memory.addRegion(next, host);
    if (logDirty) this.#logDirty.add(slot); else this.#logDirty.delete(slot);
    return next;
  }

  /** Makes `rdmsr`/`wrmsr` of these MSRs exit to userspace (as `msr` exits). */
  interceptMsrs(reads: readonly number[], writes: readonly number[]): void {
    this.#assertOpen();
    if (!this.capabilities.userSpaceMsr) throw new StateError('this host has no user-space MSR exits');
    this.#vm.setMsrIntercepts(checkMsrIndices(reads, 'reads'), checkMsrIndices(writes, 'writes'));
  }

  /** Exit counters since creation (or the last `resetStats()`). */
  stats(): ExitStats {
    return this.#counters.snapshot();
  }

  /** Zeroes the exit counters. */
  resetStats(): void {
    this.#counters.reset();
    this.#hookStats.clear();
  }

  /**
   * Runs the guest until it stops, the timeout passes or the signal aborts. Returns why it
   * stopped; throws only for misuse (already running, closed).
   */
  async run(options: RunOptions = {}): Promise<Stop> {
    this.#assertOpen();
    if (this.#running) throw new StateError('the machine is already running');
    checkObject(options, 'options');
    if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw new InvalidArgumentError('signal', `must be an AbortSignal, got ${show(options.signal)}`);
    const timeout = options.timeout;
    if (timeout !== undefined && (typeof timeout !== 'number' || !(timeout >= 0))) throw new InvalidArgumentError('timeout', 'must be a non-negative number of milliseconds');
    const sliceMs = options.sliceMs ?? DEFAULT_SLICE_MS;
    if (typeof sliceMs !== 'number' || !(sliceMs > 0) || sliceMs > 1000) throw new InvalidArgumentError('sliceMs', 'must be in (0, 1000]');
    const signal = options.signal;
    this.#running = true;
    const t0 = performance.now();
    const deadline = timeout === undefined ? Infinity : t0 + timeout;
    const exits0 = this.#counters.total;
    this.events.emit('started');
    const vcpu = this.vcpu(0);
    let stop: StopRequest | undefined;
    try {
      while (!stop) {
        if (signal?.aborted) { stop = { reason: 'aborted' }; break; }
        const left = deadline - performance.now();
        if (left <= 0) { stop = { reason: 'timeout' }; break; }
        vcpu.backend.beginSlice(Math.max(50_000, Math.min(sliceMs, left) * 1e6));
        let r: SliceResult;
        try {
          r = this.#slice(vcpu);
        } finally {
          vcpu.backend.endSlice();
        }
        this.events.emit('slice');
        const failed = this.#runSliceHooks();
        if (failed) { stop = failed; break; }
        if (r.kind === 'stop') { stop = r.stop; break; }
        if (r.kind === 'async') {
          const out = await raceDeadline(r.outcome, deadline, signal);
          if (out === 'timeout' || out === 'aborted') { stop = { reason: out }; break; }
          const next = this.#apply(vcpu, out);
          if (next) { stop = next; break; }
          continue;
        }
        // Let timers, I/O and other machines run between slices.
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
      const final = this.#finish(vcpu, stop as StopRequest, t0, exits0);
      this.events.emit('stopped', final);
      return final;
    } finally {
      this.#running = false;
    }
  }

  #hookContext(vcpu: Vcpu): ExitContext {
    const info: HookInfo = {
      vcpu: vcpu.id, seq: this.#seq,
      rip: () => vcpu.backend.getRegs().rip,
      instructionRip: () => this.#instructionRip(vcpu),
    };
    const b = vcpu.backend;
    return {
      pio: this.io, mmio: this.mmio,
      mediate: this.#hooks.filter((h) => h.mode === 'mediate'),
      observe: this.#hooks.filter((h) => h.mode === 'observe'),
      hookStats: this.#hookStats,
      get info() { return info; },
      memory: this.memory,
      msrs: { read: (index) => b.getMsrs([index])[0]?.data ?? 0n, write: (index, data) => b.setMsrs([{ index, data }]) },
      ...(this.#explainer ? { explain: this.#explainer } : {}),
    };
  }

  /** The instruction that caused the exit being handled (see `HookInfo.instructionRip`). */
  #instructionRip(vcpu: Vcpu): bigint {
    return instructionRipOf(this.#exit, vcpu.backend, this.memory, this.capabilities.ioExitRip);
  }

  /** One time slice: a synchronous exit loop (no awaits, so the slice timer stays ours). */
  #slice(vcpu: Vcpu): SliceResult {
    const b = vcpu.backend;
    const c = this.#counters;
    const ctx = this.#hookContext(vcpu);
    const info = ctx.info as { seq: number };
    // One clock read per phase: the end of handling one exit is the start of the next run.
    let t0 = performance.now();
    for (;;) {
      let exit: VcpuExit;
      this.#exit = undefined;
      try {
        exit = b.run();
      } catch (e) {
        return { kind: 'stop', stop: backendError(e) };
      }
      const t1 = performance.now();
      const k = c.byKind[exit.kind];
      k.count++;
      k.runNs += (t1 - t0) * 1e6;
      c.total++;
      this.#seq++;
      info.seq = this.#seq;
      if (this.#coalesced.length > 0) {
        const s = this.#drainCoalesced(vcpu, ctx);
        if (s) return { kind: 'stop', stop: s };
      }
      this.#exit = exit;
      if (exit.kind === 'intr') {
        t0 = performance.now();
        k.handleNs += (t0 - t1) * 1e6;
        // With an in-kernel irqchip `hlt` never exits. Halted with IF=0, only an NMI can wake the
        // vCPU: report `halt` at once unless one is pending or some source is routed to deliver one.
        if (this.irqchip && b.isHalted() && (b.getRegs().rflags & 0x200n) === 0n && !nmiCanWake(b.nmiWakeState())) return { kind: 'stop', stop: { reason: 'halt' } };
        return { kind: 'yield' };
      }
      if (exit.kind === 'io') c.countPort(exit.port);
      const out = handleExit(exit, ctx);
      t0 = performance.now();
      k.handleNs += (t0 - t1) * 1e6;
      if (out.action === 'async') return { kind: 'async', outcome: out.outcome, exit };
      const s = this.#apply(vcpu, out);
      if (s) return { kind: 'stop', stop: s };
    }
  }

  #apply(vcpu: Vcpu, out: ExitOutcome): StopRequest | undefined {
    if (out.action === 'stop') return out.stop;
    if (out.action === 'fault') {
      try {
        vcpu.backend.faultInstruction(out.vector, out.errorCode, this.#instructionRip(vcpu));
      } catch (e) {
        return backendError(e);
      }
      return undefined;
    }
    if (out.action === 'resume') {
      if (out.read) vcpu.backend.completeRead(out.read);
      if (out.msr) vcpu.backend.completeMsr(out.msr.data, out.msr.error);
    }
    return undefined;
  }

  #drainCoalesced(vcpu: Vcpu, ctx: ExitContext): StopRequest | undefined {
    for (const e of vcpu.backend.drainCoalesced()) {
      const exit: VcpuExit = e.pio
        ? { kind: 'io', direction: 'out', port: Number(e.address), size: e.length as 1 | 2 | 4, count: 1, data: e.data, late: true }
        : { kind: 'mmio', address: e.address, isWrite: true, size: e.length, data: e.data, late: true };
      // Coalesced writes already happened; only devices and observers see them.
      const out = handleExit(exit, { ...ctx, mediate: [] });
      if (out.action === 'stop') return out.stop;
    }
    return undefined;
  }

  #finish(vcpu: Vcpu, stop: StopRequest, t0: number, exits0: number): Stop {
    let rip = 0n;
    let req = stop;
    try {
      const regs = vcpu.backend.getRegs();
      // A stop an exit caused names the instruction behind it, the same on every flavour.
      rip = req.reason === 'timeout' || req.reason === 'aborted' ? regs.rip : this.#instructionRip(vcpu);
      if (req.reason === 'timeout' || req.reason === 'aborted') {
        req = { ...req, halted: this.irqchip && vcpu.backend.isHalted() };
      }
      if (req.reason === 'exception') {
        // The stub's `out` ran on the exception frame: [error code] RIP CS RFLAGS RSP SS.
        const w = this.#mode === 'long' ? 8 : 4;
        const hasCode = VECTORS_WITH_ERROR_CODE.has(req.vector);
        const sp = regs.rsp;
        const errorCode = hasCode ? this.memory.readUint(sp, 4) : undefined;
        const ripAt = sp + BigInt(hasCode ? w : 0);
        const faultRip = w === 8 ? this.memory.readU64(ripAt) : BigInt(this.memory.readUint(ripAt, 4));
        req = { ...req, errorCode, faultRip, cr2: vcpu.backend.getSregs().cr2 };
      }
      if (req.reason === 'internal-error') {
        const sregs = vcpu.backend.getSregs();
        req = { ...req, code: codeAt(this.memory, sregs, rip), bitness: bitnessOf(sregs) };
      }
    } catch { /* registers unavailable (backend failed): report what we have */ }
    return { ...req, rip, vcpu: vcpu.id, exits: this.#counters.total - exits0, elapsedMs: performance.now() - t0 } as Stop;
  }

  #assertOpen(): void {
    if (this.#closed) throw new StateError(`machine '${this.name}' is closed`);
  }

  #teardown(): void {
    for (const v of this.#vcpus) { try { v.backend.close(); } catch { /* keep going */ } }
    this.#vcpus.length = 0;
    // No memslot deletes (~150 µs each on PVM): destroying the VM drops its memslots, and the
    // vCPUs that could touch guest RAM are gone already. Guest RAM is unmapped after the VM.
    this.#slots.clear();
    try { this.#vm.close(); } catch { /* keep going */ }
    for (const h of this.memory.clear()) h.close();
  }

  /**
   * Releases everything: vCPUs, memslots and memory, the VM, and attached devices. Idempotent.
   * Refuses while `run()` is in progress (abort it first).
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (this.#running) throw new StateError('cannot close a running machine; abort run() first');
    this.#closed = true;
    this.#teardown();
    for (const d of this.#devices) await d.close?.();
    this.#devices.clear();
    this.events.emit('closed');
    this.events.removeAllListeners();
  }

  /** `await using vm = await Machine.create(...)`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The backend this machine runs on. */
  get backend(): Backend {
    return this.#backend;
  }

  /**
   * Captures this (stopped) machine: vCPU, VM and device state plus a sparse copy of RAM.
   * With `path`, the snapshot is also written there ({@link Snapshot.save}).
   */
  async snapshot(path?: string): Promise<Snapshot> {
    this.#assertOpen();
    const snap = takeSnapshot(this, this.#internals());
    if (path !== undefined) {
      try { snap.save(path); } catch (e) { snap.close(); throw e; }
    }
    return snap;
  }

  /**
   * A new machine in the state of `snapshot`, its RAM mapped copy-on-write from the snapshot.
   * @throws SnapshotFormatError naming the field when the snapshot cannot be restored here.
   */
  static async restore(snapshot: Snapshot, options: RestoreOptions = {}): Promise<Machine> {
    return restoreMachine(snapshot, options, (o) => Machine.create(o), (m) => m.#internals());
  }

  /**
   * A child of `snapshot` sharing its pages copy-on-write: its writes are invisible to the
   * snapshot and to siblings. The same operation as {@link restore}, named for intent.
   */
  static async fork(snapshot: Snapshot, options: RestoreOptions = {}): Promise<Machine> {
    return Machine.restore(snapshot, options);
  }

  /**
   * Puts a restored or forked machine back into its snapshot's state, re-copying only the pages
   * dirtied since (the dirty log, plus device DMA), plus vCPU, VM and device state.
   */
  reset(options: ResetOptions = {}): ResetResult {
    this.#assertOpen();
    return resetMachine(this, this.#internals(), options);
  }

  #internals(): MachineInternals {
    const self = this;
    return {
      vm: this.#vm,
      get running() { return self.#running; },
      devices: () => [...this.#devices],
      cpu: () => ({ mode: this.#mode, systemArea: this.#systemArea }),
      setCpu: (mode, systemArea) => {
        this.#mode = mode;
        this.#systemArea = systemArea;
        if (mode !== 'real') this.#registerExceptionReporter();
      },
      logsDirty: (slot) => this.#logDirty.has(slot),
    };
  }
}

/** Whether an NMI can still wake a halted vCPU (a masked NMI waits for an `iret` that never comes). */
function nmiCanWake(s: NmiWakeState): boolean {
  return !s.masked && (s.pending || s.source !== undefined);
}

/** A `backend-error` stop for something the backend threw. */
function backendError(e: unknown): StopRequest {
  return { reason: 'backend-error', error: e instanceof TsvmError ? e : new TsvmError('TSVM_BACKEND', String(e), { cause: e }) };
}

function checkAddr(v: unknown, name: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new InvalidArgumentError(name, `must be a non-negative integer address, got ${show(v)}`);
  return v;
}

function normaliseRegions(memory: MachineOptions['memory']): RegionOptions[] {
  if (typeof memory === 'number') {
    checkRegionSize(memory, 'memory');
    return [{ start: 0, size: memory, name: 'ram' }];
  }
  if (!Array.isArray(memory) || memory.length === 0) throw new InvalidArgumentError('memory', 'must be a size in bytes or a non-empty array of regions');
  memory.forEach((r, i) => {
    if (!r || typeof r !== 'object') throw new InvalidArgumentError(`memory[${i}]`, 'must be an object');
    checkRegionSize(r.size, `memory[${i}].size`);
    gpa(r.start, `memory[${i}].start`);
  });
  const sorted = [...memory].sort((a, b) => (BigInt(a.start) < BigInt(b.start) ? -1 : 1));
  for (let i = 1; i < sorted.length; i++) {
    const p = sorted[i - 1] as RegionOptions, c = sorted[i] as RegionOptions;
    if (BigInt(c.start) < BigInt(p.start) + BigInt(p.size)) throw new InvalidArgumentError('memory', `region at ${hex(BigInt(c.start))} overlaps region at ${hex(BigInt(p.start))}`);
  }
  return memory.slice();
}

async function raceDeadline<T>(p: Promise<T>, deadline: number, signal: AbortSignal | undefined): Promise<T | 'timeout' | 'aborted'> {
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<'timeout'>((resolve) => { if (deadline !== Infinity) timer = setTimeout(() => resolve('timeout'), Math.max(0, deadline - performance.now())); }),
      new Promise<'aborted'>((resolve) => {
        if (!signal) return;
        if (signal.aborted) resolve('aborted');
        onAbort = () => resolve('aborted');
        signal.addEventListener('abort', onAbort, { once: true });
      }),
    ]);
  } finally {
    if (timer) clearTimeout(timer);
    if (onAbort) signal?.removeEventListener('abort', onAbort);
  }
}
