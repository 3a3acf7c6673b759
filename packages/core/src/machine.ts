/**
 * `Machine`: a VM assembled from memory regions, vCPUs, buses and hooks, with a time-sliced
 * run loop that never blocks Node for longer than one slice.
 *
 * This file is the facade and the table of contents: each group of methods below delegates
 * to one module of `machine/`; the modules share one private `MachineState` (`machine/state.ts`):
 *
 * | concern | module |
 * |---|---|
 * | guest RAM as memslots: regions, flags, dirty logs | `machine/memory-map.ts` |
 * | starting the vCPU: `loadFlat`, `enter`, the system area, the exception reporter | `machine/cpu-entry.ts` |
 * | devices, interrupt lines, coalesced ranges, MSR intercepts | `machine/attachments.ts` |
 * | exit hooks, the explainer, slice hooks, sealing | `machine/hook-table.ts` |
 * | `run()`: slices, the exit loop, outcomes, the final `Stop` (the hot path) | `machine/run-loop.ts` |
 * | `close()`: release in reverse order of creation | `machine/teardown.ts` |
 * | snapshot, restore, fork, reset | `snapshot/` (through `#internals()`) |
 * @module
 */
import { EventEmitter } from 'eventemitter3';
import type { Backend, CpuidEntry, HostCapabilities } from './backend.js';
import { KvmBackend, kvmBackend } from './backend/kvm.js';
import type { Bus, RangeSpec } from './bus.js';
import { show } from './check.js';
import type { Device, DeviceMapping, IrqLine } from './device.js';
import { InvalidArgumentError, StateError } from './errors.js';
import type { VcpuExit } from './exits.js';
import type { ExitHook, HookInfo, HookStats } from './hooks.js';
import type { EntryState } from './loaders/bootinfo.js';
import type { GuestMemory, MemoryRegion } from './memory.js';
import type { ExitStats } from './stats.js';
import type { Stop } from './stop.js';
import { Vcpu } from './vcpu.js';
import { applyCpuModel, CpuModelError, recordedCpuModel, resolveCpuModel, type CpuModel, type CpuModelSpec } from './cpu/models.js';
import { Snapshot, takeSnapshot, restoreMachine, resetMachine, schedulePrebuild, prebuilding, type MachineMaker, type RestoreOptions, type ResetResult, type ResetOptions, type MachineInternals } from './snapshot/index.js';
import { MachineState, MAX_VCPUS } from './machine/state.js';

export { MAX_VCPUS };
import * as memoryMap from './machine/memory-map.js';
import * as cpuEntry from './machine/cpu-entry.js';
import * as attachments from './machine/attachments.js';
import * as hookTable from './machine/hook-table.js';
import * as runLoop from './machine/run-loop.js';
import * as teardown from './machine/teardown.js';

export type { RegionOptions } from './machine/memory-map.js';
export type { LoadFlatOptions, MachineLayout } from './machine/cpu-entry.js';
export type { RunOptions } from './machine/run-loop.js';

/** Options of {@link Machine.create}. */
export interface MachineOptions {
  /** Guest RAM: a size in bytes (one region at 0) or explicit regions. */
  readonly memory: number | readonly memoryMap.RegionOptions[];
  /** The hypervisor; defaults to the process-wide KVM backend. */
  readonly backend?: Backend;
  /** Create the in-kernel irqchip and PIT (needed for interrupts). Default false. */
  readonly irqchip?: boolean;
  /** Name used in diagnostics. */
  readonly name?: string;
  /**
   * Number of vCPUs (default 1, at most {@link MAX_VCPUS}). vCPU 0 is the bootstrap processor
   * that `loadFlat` and `enter` set up; with more than one, `irqchip: true` is required: each
   * vCPU gets an in-kernel LAPIC and the others (application processors) wait for INIT/SIPI
   * from the guest, as on hardware. `run()` runs them round-robin, one slice each, on the
   * calling thread (see {@link vcpuThreads} for running them in parallel); every exit of every
   * vCPU passes through the same hooks and devices.
   */
  readonly vcpus?: number;
  /**
   * Where the vCPUs execute guest code. `'shared'` (default): all take turns, one time slice
   * each, on the thread that calls `run()`. `'parallel'`: each vCPU gets its own runner thread
   * (started once with the machine, ended by `close()`), so N vCPUs compute on up to N cores at
   * once; every exit is still handled on the calling thread, one at a time, by the same hooks and
   * devices (mediate hooks before the device), so they stay single-threaded, but guest RAM may
   * change while a hook runs (another vCPU writes it). A machine option, not a run option: the
   * threads are the machine's, and whether guest code runs concurrently with handlers is a
   * property code attaching hooks should be able to rely on for the machine's lifetime.
   * Needs a backend that offers runners (KVM does; `MockBackend` models them).
   */
  readonly vcpuThreads?: 'shared' | 'parallel';
  /**
   * The CPU model the guest sees (`'host'`, `'qemu64'`, `'minimal'` or a {@link CpuModel}):
   * the host's supported CPUID filtered through it, never showing a feature the host lacks.
   * Default `'host'`. On PVM, ring-3 code sees the host's CPU whatever the model, and ring-0
   * code the model only for the bits KVM controls there ({@link Machine.uncontrolledFeatures}).
   * `create` throws `CpuModelError` when the model has `enforce` and the host lacks some of its
   * features, or `strict` and the host cannot hide some it hides.
   */
  readonly cpu?: CpuModelSpec;
}


/** Lifecycle events (errors are returned or thrown, never emitted). */
export interface MachineEvents {
  /** `run()` started. */
  started: [];
  /** `run()` returned this stop. */
  stopped: [stop: Stop];
  /** The machine was closed. */
  closed: [];
  /**
   * A time slice of one vCPU ended: a place for sampling work such as dirty logs. That vCPU is
   * out of the guest; with `vcpuThreads: 'shared'` no vCPU is running, with `'parallel'` others may be.
   */
  slice: [];
  /** `reset()` put guest RAM and CPU state back to the snapshot (host-made changes to RAM are gone too). */
  reset: [];
  /** `snapshot()` is about to capture guest RAM: take host-made changes (probe traps) out of it now. */
  snapshotting: [];
  /** `snapshot()` has captured guest RAM (or failed): put them back. */
  snapshotted: [];
}

/**
 * A virtual machine. Create with {@link Machine.create}; release with `close()` or `await using`.
 *
 * @example A ring-3 guest that prints through a 16550 UART and ends with a debug-exit write
 * ```ts
 * import { Machine } from '@tsvm/core';
 * import { asm } from '@tsvm/core/asm';
 * import { DebugExit, Uart16550 } from '@tsvm/devices';
 *
 * await using vm = await Machine.create({ memory: 2 * 1024 * 1024 });
 * const uart = new Uart16550();
 * uart.pipe(process.stdout);
 * vm.attachDevice(uart);
 * vm.attachDevice(new DebugExit());
 * vm.loadFlat(await asm('mov dx, 0x3f8; mov al, 0x41; out dx, al; mov dx, 0xf4; out dx, al'), { at: 0x1000, mode: 'long', ring: 3 });
 * const stop = await vm.run({ timeout: 1000 });   // { reason: 'debug-exit', code: 0x83, rip, exits, elapsedMs }
 * ```
 */
export class Machine {
  /** Guest RAM (bounds-checked). */
  readonly memory: GuestMemory;
  /** Port-I/O bus. */
  readonly io: Bus;
  /** MMIO bus. */
  readonly mmio: Bus;
  /** Lifecycle events. */
  readonly events = new EventEmitter<MachineEvents>();
  /** Name for diagnostics. */
  get name(): string {
    return this.#s.name;
  }

  /** What the host supports. */
  readonly capabilities: HostCapabilities;
  /** Whether an in-kernel irqchip exists. */
  readonly irqchip: boolean;

  /**
   * The CPU model applied at create, as a snapshot records it: its name, the features the guest
   * actually sees (the model's masks ANDed with this host's), its leaf limits, `enforce: true`.
   * `undefined` for `'host'` (the host's supported CPUID, unfiltered).
   */
  get cpuModel(): CpuModel | undefined {
    return this.#s.cpuModel;
  }

  /**
   * Host features the CPU model hides that ring-0 code on this host sees anyway (names as in
   * `CPU_FEATURES`, else `1.ecx[n]`): on PVM, CPUID answers only the bits KVM itself supports
   * from the table. Empty for `'host'` and where every bit is controlled; `strict` models refuse such hosts.
   */
  get uncontrolledFeatures(): readonly string[] {
    return this.#s.uncontrolledFeatures;
  }

  readonly #s: MachineState;

  private constructor(s: MachineState) {
    this.#s = s;
    this.memory = s.memory;
    this.io = s.io;
    this.mmio = s.mmio;
    this.capabilities = s.capabilities;
    this.irqchip = s.irqchip;
  }

  // ── Lifecycle ───────────────────────────────────────────────────────────────────────────

  /**
   * Creates a machine with guest RAM and `options.vcpus` vCPUs (default one). Validates every option before touching KVM.
   * @throws InvalidArgumentError for bad options; KvmUnavailableError when KVM is missing.
   *
   * @example RAM as one region at 0, or as explicit regions; a mock backend for unit tests
   * ```ts
   * import { Machine } from '@tsvm/core';
   * import { MockBackend, outExit } from '@tsvm/core/testing';
   *
   * await using small = await Machine.create({ memory: 2 * 1024 * 1024, name: 'small' });
   * await using split = await Machine.create({ memory: [{ start: 0, size: 0x100000 }, { start: 0x200000, size: 0x100000 }] });
   * await using withIrqs = await Machine.create({ memory: 64 * 1024 * 1024, irqchip: true });   // in-kernel PIC/IOAPIC/PIT
   * await using smp = await Machine.create({ memory: 64 * 1024 * 1024, irqchip: true, vcpus: 4 }); // APs wait for INIT/SIPI
   *
   * const backend = new MockBackend();
   * backend.script(outExit(0x80, 1), { kind: 'hlt' });              // the exits the vCPU will report
   * await using mocked = await Machine.create({ memory: 2 * 1024 * 1024, backend });
   * ```
   */
  static async create(options: MachineOptions): Promise<Machine> {
    if (!options || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
    const regions = memoryMap.normaliseRegions(options.memory);
    if (options.irqchip !== undefined && typeof options.irqchip !== 'boolean') throw new InvalidArgumentError('irqchip', 'must be a boolean');
    if (options.name !== undefined && typeof options.name !== 'string') throw new InvalidArgumentError('name', `must be a string, got ${show(options.name)}`);
    if (options.backend !== undefined && (options.backend === null || typeof options.backend !== 'object' || typeof options.backend.createVm !== 'function')) throw new InvalidArgumentError('backend', 'must be a Backend');
    const nVcpus = options.vcpus ?? 1;
    if (typeof nVcpus !== 'number' || !Number.isInteger(nVcpus) || nVcpus < 1 || nVcpus > MAX_VCPUS) throw new InvalidArgumentError('vcpus', `must be an integer in [1, ${MAX_VCPUS}], got ${show(options.vcpus)}`);
    const irqchip = options.irqchip ?? false;
    if (nVcpus > 1 && !irqchip) throw new InvalidArgumentError('vcpus', `${nVcpus} vCPUs need irqchip: true (each vCPU's LAPIC delivers the INIT/SIPI that starts it)`);
    const threads = options.vcpuThreads ?? 'shared';
    if (threads !== 'shared' && threads !== 'parallel') throw new InvalidArgumentError('vcpuThreads', `must be 'shared' or 'parallel', got ${show(options.vcpuThreads)}`);
    const model = resolveCpuModel(options.cpu);
    const backend = options.backend ?? kvmBackend();
    // Before this machine's VM: the probe makes (and closes) one of its own.
    const control = model ? backend.cpuidControl?.() : undefined;
    // One vCPU on this thread with the default CPUID and no irqchip: a closed machine's VM, wiped,
    // serves. Only where `createVm` is KvmBackend's own: a wrapper that overrides it (a restore's
    // image-backed VM) must get its VM from its override.
    const plain = !model && nVcpus === 1 && threads === 'shared' && !irqchip;
    const vm = plain && backend instanceof KvmBackend && backend.createVm === KvmBackend.prototype.createVm ? backend.createPlainVm() : backend.createVm({ irqchip });
    const s = new MachineState(options.name ?? 'machine', backend, vm, irqchip);
    try {
      for (const r of regions) memoryMap.addRegion(s, r);
      for (let id = 0; id < nVcpus; id++) {
        const b = vm.createVcpu(id);
        s.vcpus.push(new Vcpu(b, () => s.runners?.busy(id) ?? false));
        let table = b.supportedCpuid();
        if (model) {
          const applied = applyCpuModel(model, table, control?.uncontrolled);
          const missing = model.enforce ? applied.missing : [];
          const leaks = model.strict ? applied.uncontrolled : [];
          if (missing.length > 0 || leaks.length > 0) throw new CpuModelError(model.name, missing, leaks);
          table = applied.cpuid;
          if (id === 0) {
            s.cpuModel = recordedCpuModel(model, table);
            s.uncontrolledFeatures = Object.freeze([...applied.uncontrolled]);
          }
        }
        if (nVcpus > 1) table = withApicId(table, id);
        if (model || nVcpus > 1) b.setCpuid(table);
      }
      if (threads === 'parallel') {
        if (typeof vm.startRunners !== 'function') throw new InvalidArgumentError('vcpuThreads', `the '${backend.name}' backend cannot run vCPUs in parallel`);
        s.runners = await vm.startRunners(s.vcpus.map((v) => v.backend));
      }
    } catch (e) {
      teardown.teardown(s);
      throw e;
    }
    return new Machine(s);
  }

  /**
   * Releases everything: vCPUs, memslots and memory, the VM, and attached devices. Idempotent.
   * Refuses while `run()` is in progress (abort it first). The kernel finishes destroying the
   * VM in the background (see {@link Machine.released}); a plain machine's VM (one vCPU on this
   * thread, no irqchip, no CPU model, one flagless region at 0) is instead kept by the KVM
   * backend, wiped (vCPU at power-on, zeroed RAM), for the next plain `create`: this machine's
   * handles reach nothing of it either way (`KvmBackend.dropKeptVms` destroys kept VMs).
   */
  async close(): Promise<void> {
    return teardown.close(this.#s, this.events);
  }

  /**
   * Resolves when the kernel has released every machine closed so far. `close()` returns once
   * the machine is unusable and its guest RAM is unmapped; on KVM the VM's final teardown
   * (~0.1–1 ms of kernel work on PVM) then runs on a libuv thread-pool thread, off the event
   * loop (at most 4 at a time: a fifth `close()` waits for the oldest). It also waits for the
   * spare VM the KVM backend keeps ready for the next `create` (made on the thread pool after
   * each create; `TSVM_SPARE_VM=0` turns that off). Await this before counting a process's fds.
   * VMs the KVM backend keeps for plain machines (see {@link Machine.close}) are not released
   * here: `await kvmBackend().dropKeptVms()` does that.
   */
  static released(): Promise<void> {
    return teardown.released();
  }

  /** `await using vm = await Machine.create(...)`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The backend this machine runs on. */
  get backend(): Backend {
    return this.#s.backend;
  }

  /** The vCPUs, by index (vCPU 0 is the bootstrap processor). */
  get vcpus(): readonly Vcpu[] {
    return this.#s.vcpus;
  }

  /**
   * vCPU `id` (default 0, the bootstrap processor).
   * @throws InvalidArgumentError when there is no such vCPU.
   */
  vcpu(id = 0): Vcpu {
    return this.#s.vcpu(id);
  }

  // ── Memory (machine/memory-map.ts) ──────────────────────────────────────────────────────

  /**
   * Adds a RAM region backed by a new memfd.
   * @returns the region (with its slot number).
   */
  addRegion(options: memoryMap.RegionOptions): MemoryRegion {
    return memoryMap.addRegion(this.#s, options);
  }

  /** Removes a region by slot and releases its memory. */
  removeRegion(slot: number): void {
    memoryMap.removeRegion(this.#s, slot);
  }

  /**
   * Changes a region's memslot flags in place (same host memory, no copy). KVM cannot flip
   * `readonly` on a live slot, so the slot is deleted and re-created; only while stopped.
   */
  setRegionFlags(slot: number, flags: { readonly?: boolean; logDirty?: boolean }): MemoryRegion {
    return memoryMap.setRegionFlags(this.#s, slot, flags);
  }

  /** Dirty-page bitmap of a region since the last call (bit per 4 KiB page). */
  dirtyPages(slot: number): Uint8Array {
    return memoryMap.dirtyPages(this.#s, slot);
  }

  // ── CPU entry (machine/cpu-entry.ts) ────────────────────────────────────────────────────

  /**
   * Copies `image` to `at` and sets vCPU 0 (the bootstrap processor) up to execute it in `mode`
   * at `ring`; other vCPUs wait for the guest to start them with INIT/SIPI.
   * @throws InvalidArgumentError when the image does not fit in RAM or collides with the system area.
   */
  loadFlat(image: Uint8Array, options: cpuEntry.LoadFlatOptions): void {
    cpuEntry.loadFlat(this.#s, image, options);
  }

  /**
   * Ranges the host needs for its own tables when a loader's entry state is applied with
   * {@link enter}: pass them as the loaders' `avoid` option so no image lands there.
   */
  hostReserved(): Array<{ start: number; size: number }> {
    return cpuEntry.hostReserved(this.#s);
  }

  /**
   * Establishes the CPU state a loader asked for (`result.entryState` of `loadElf`-style
   * loaders): 32-bit protected mode with paging off, or 64-bit long mode with the host's
   * identity map of the low 4 GiB, both at ring 0, then the loader's registers (on vCPU 0).
   */
  enter(entry: EntryState): void {
    cpuEntry.enter(this.#s, entry);
  }

  /** Where the host placed its tables. */
  get layout(): cpuEntry.MachineLayout {
    return cpuEntry.layoutOf(this.#s);
  }

  // ── Devices and what else reaches the host (machine/attachments.ts) ─────────────────────

  /** Attaches `device` at `range` (`{ port, size }` or `{ address, size }`): `attachDevice([{ range, device }])`. */
  attach(range: RangeSpec, device: Device): () => void {
    return attachments.attach(this.#s, range, device);
  }

  /**
   * The one way devices join a machine: at every range a device asks for (`device.mappings()`)
   * or a list of mappings, all or nothing. The machine closes attached devices on close.
   * @returns a function that detaches them again.
   */
  attachDevice(source: { mappings(): DeviceMapping[] } | readonly DeviceMapping[]): () => void {
    return attachments.attachDevice(this.#s, source);
  }

  /** An interrupt line of the in-kernel irqchip (requires `irqchip: true`). */
  irqLine(irq: number): IrqLine {
    return attachments.irqLine(this.#s, irq);
  }

  /**
   * Lets guest writes to a range land in the coalesced ring instead of exiting (far cheaper).
   * They are delivered to devices and observe hooks at the next exit or slice end. Mediate
   * hooks therefore see them late: the monitor never coalesces a range it mediates.
   */
  coalesce(range: RangeSpec): () => void {
    return attachments.coalesce(this.#s, range);
  }

  /** Ranges currently routed to the coalesced ring (for mediation checks). */
  coalescedRanges(): RangeSpec[] {
    return attachments.coalescedRanges(this.#s);
  }

  /** Makes `rdmsr`/`wrmsr` of these MSRs exit to userspace (as `msr` exits). */
  interceptMsrs(reads: readonly number[], writes: readonly number[]): void {
    attachments.interceptMsrs(this.#s, reads, writes);
  }

  // ── Hooks (machine/hook-table.ts) ───────────────────────────────────────────────────────

  /** Adds a hook on the exit path. Throws after {@link sealHooks}. */
  addHook(hook: ExitHook): () => void {
    return hookTable.addHook(this.#s, hook);
  }

  /**
   * Adds words to core's unhandled-exit stops (deny by default is core's, with or without a
   * monitor): the monitor uses it to name the instruction at RIP. One explainer per machine.
   * @returns a function that removes it again.
   */
  setExplainer(explain: (exit: VcpuExit, info: HookInfo) => string | undefined): () => void {
    return hookTable.setExplainer(this.#s, explain);
  }

  /**
   * Runs `fn` at every slice boundary, while the vCPU is stopped (for sampling work such as
   * harvesting the dirty log for observers). A throw stops the run with a `hook-error` naming
   * `name` (or the user hook a `HookFailure` names): errors are never parked where nobody reads them.
   * @returns a function that removes it again.
   */
  addSliceHook(name: string, fn: () => void): () => void {
    return hookTable.addSliceHook(this.#s, name, fn);
  }

  /** Freezes the hook table and the buses (Solo5's "seal"). */
  sealHooks(): void {
    hookTable.sealHooks(this.#s);
  }

  /** Per-hook call counts and time. */
  hookStats(): ReadonlyMap<ExitHook, HookStats> {
    return hookTable.copyHookStats(this.#s);
  }

  // ── Running (machine/run-loop.ts) ───────────────────────────────────────────────────────

  /**
   * Runs the guest until it stops, the timeout passes or the signal aborts. Returns why it
   * stopped; throws only for misuse (already running, closed). Several vCPUs take turns on
   * the calling thread, one slice each (or run at once, `vcpuThreads: 'parallel'`); a stop of
   * any of them stops every vCPU and names the one that caused it (vCPU 0 for a timeout or abort).
   *
   * @example Bound a run by time and by a signal, then switch on the reason
   * ```ts
   * const stop = await vm.run({ timeout: 5000, signal: AbortSignal.timeout(10_000) });
   * switch (stop.reason) {
   *   case 'debug-exit': console.log('guest exit code', stop.code); break;
   *   case 'violation': console.log('monitor stopped it:', stop.violation.message); break;
   *   case 'unhandled-exit': console.log(stop.message, 'at', stop.rip.toString(16)); break;
   *   case 'timeout': console.log('still running after 5 s', stop.halted ? '(halted)' : ''); break;
   *   default: console.log(stop.reason, 'after', stop.exits, 'exits in', stop.elapsedMs, 'ms');
   * }
   * ```
   */
  async run(options: runLoop.RunOptions = {}): Promise<Stop> {
    return runLoop.run(this.#s, this.events, options);
  }

  /** Exit counters since creation (or the last `resetStats()`). */
  stats(): ExitStats {
    return this.#s.counters.snapshot();
  }

  /** Zeroes the exit counters. */
  resetStats(): void {
    this.#s.counters.reset();
    this.#s.hookStats.clear();
  }

  // ── Snapshots (snapshot/) ───────────────────────────────────────────────────────────────

  /**
   * Captures this (stopped) machine: vCPU, VM and device state plus a sparse copy of RAM.
   * With `path`, the snapshot is also written there ({@link Snapshot.save}).
   *
   * @example Snapshot once a guest is set up, fork per task, reset between tasks
   * ```ts
   * await vm.run({ timeout: 1000 });                    // run to the point to start from
   * using snap = await vm.snapshot();                    // or vm.snapshot('/tmp/guest.snap')
   * await using child = await Machine.fork(snap, { devices: new DebugExit().mappings() });
   * await child.run({ timeout: 1000 });
   * const { pagesCopied } = child.reset();               // back to the snapshot's state
   * ```
   */
  async snapshot(path?: string): Promise<Snapshot> {
    this.#s.assertOpen();
    if (this.#s.running) throw new StateError('cannot snapshot a running machine; let run() return first');
    // Attachments that keep state in guest RAM (a monitor's probe traps) take it out for the
    // capture, so the image holds the guest's own bytes, and put it back after (synchronously:
    // nothing runs in between).
    this.events.emit('snapshotting');
    let snap: Snapshot;
    try {
      snap = takeSnapshot(this, this.#internals());
    } finally {
      this.events.emit('snapshotted');
    }
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
    return restoreMachine(snapshot, options, Machine.#maker);
  }

  /**
   * A child of `snapshot` sharing its pages copy-on-write: its writes are invisible to the
   * snapshot and to siblings. The same operation as {@link restore}, named for intent.
   *
   * @example Two isolated children of one snapshot, each with its own devices
   * ```ts
   * using snap = await vm.snapshot();
   * snap.prewarm(2);                                     // optional: VMs created ahead of the forks
   * await using a = await Machine.fork(snap, { devices: new DebugExit().mappings() });
   * await using b = await Machine.fork(snap, { setup: (m) => { m.attachDevice(new DebugExit()); } });
   * const first = await a.run({ timeout: 1000 });
   * const second = await b.run({ timeout: 1000 });      // starts from the snapshot, not from where `a` got to
   * ```
   */
  static async fork(snapshot: Snapshot, options: RestoreOptions = {}): Promise<Machine> {
    return Machine.restore(snapshot, options);
  }

  /**
   * Puts a restored or forked machine back into its snapshot's state, re-copying only the pages
   * dirtied since (the guest's stores from the dirty log, plus every host write: device DMA, a
   * monitor's write-through or traps), plus vCPU, VM and device state. Emits `reset` after, so
   * attachments that keep state in guest RAM (a monitor's probe traps) can put it back.
   */
  reset(options: ResetOptions = {}): ResetResult {
    this.#s.assertOpen();
    const r = resetMachine(this, this.#internals(), options);
    this.events.emit('reset');
    return r;
  }

  /** How `snapshot/` makes machines and sees their private state. */
  static readonly #maker: MachineMaker = { create: (o) => Machine.create(o), internals: (m) => m.#internals() };

  static {
    // `Snapshot.prewarm` builds machines ahead through this (snapshot.ts does not import Machine).
    prebuilding.schedule = (snap, backend) => schedulePrebuild(snap, backend, Machine.#maker);
  }

  #internalsView: MachineInternals | undefined;

  /** What `snapshot/` may see of the private state: a narrower view than `MachineState` (made once: resets and forks ask for it each time). */
  #internals(): MachineInternals {
    const s = this.#s;
    return this.#internalsView ??= {
      vm: s.vm,
      get running() { return s.running; },
      devices: () => [...s.devices],
      cpu: () => ({ mode: s.mode, systemArea: s.systemArea }),
      setCpu: (mode, systemArea) => cpuEntry.adoptCpu(s, mode, systemArea),
      debugTraps: () => s.debugTraps,
      logsDirty: (slot) => s.logDirty.has(slot),
      rename: (name) => { s.name = name; },
      setRecycler: (recycle) => { s.recycle = recycle; },
    };
  }
}

/**
 * `cpuid` as vCPU `id` should see it: its initial APIC id in leaf 1 EBX[31:24] and its x2APIC id
 * in leaves 0xB and 0x1F EDX. KVM gives every vCPU the same table and does not patch these (a
 * VMM does, as QEMU), while KVM's LAPIC ids are the vCPU index: a guest that matches one
 * against the other (Linux when it brings up APs) must find them equal.
 */
function withApicId(entries: readonly CpuidEntry[], id: number): CpuidEntry[] {
  return entries.map((e) => {
    if (e.function === 1) return { ...e, ebx: ((e.ebx & 0x00ff_ffff) | (id << 24)) >>> 0 };
    if (e.function === 0xb || e.function === 0x1f) return { ...e, edx: id };
    return e;
  });
}
