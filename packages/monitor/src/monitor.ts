/**
 * `Monitor`: a reference monitor attached to a `Machine`. Hooks are registered by *event*
 * (`mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff] }, fn)`); the monitor picks the mechanism
 * per hook from what this host supports (capabilities + calibration), installs it, and delivers
 * events through core's exit hooks. It owns no run loop: `machine.run()` drives everything.
 * @module
 */
import { DmaGate, InvalidArgumentError, StateError, type CpuidEntry, type Machine } from '@tsvm/core';
import { dmaWatchHook } from './dma-watch.js';
import { AuditLog, type AuditSink } from './audit.js';
import type { MediateFn, ObserveFn } from './decisions.js';
import { describeSpec, normaliseSpec, specsOverlap, type EventSpec, type NormalSpec } from './events.js';
import { selectMechanism, type Selection } from './mechanisms.js';
import { assumedTable, priceOf, probePriceOf, type CalibrationTable, type Cpl, type MechanismId } from './calibration/table.js';
import { hostIdentity } from './calibration/host.js';
import { callObserve, hookContext, type HookRecord } from './records.js';
import { PatchBreakpoints } from './probe.js';
import { DebugUnit } from './debug-unit.js';
import { RegionFlags, dirtyPageAddresses } from './write-watch.js';
import { debugHook, probeHook, writeWatchHook, type InternalEnv } from './internal-hooks.js';
import { Dispatcher } from './dispatch.js';
import { whereIs } from './records.js';

/** Options of {@link Monitor}. */
export interface MonitorOptions {
  /** Name used in plans and reports. Default: the machine's name. */
  readonly name?: string;
  /** Audit every mediate decision: an `AuditLog`, or a sink (array, stream, function) to make one. */
  readonly audit?: AuditLog | AuditSink;
  /** What works here and what it costs; default: the assumed table for the host's flavour. */
  readonly calibration?: CalibrationTable;
  /**
   * Stop the machine when a late (coalesced) write reaches a mediated range, i.e. mediation
   * was bypassed by a coalesced zone registered behind the monitor's back (default true).
   */
  readonly guard?: boolean;
  /**
   * Probe `exec` hooks run the hooked instruction out of line where it can be moved (a
   * relocated copy in the trampoline page, then a jump back): one exit per hit instead of two
   * (default true). With `false` every hit takes the two-exit path, so the guest never runs an
   * instruction away from its address (RIP is never inside the trampoline between exits).
   */
  readonly outOfLine?: boolean;
}

/** Options of one registration. */
export interface HookOptions {
  /** Name in plans, reports and audit lines. Default `<mode>:<event>#<id>`. */
  readonly name?: string;
}

/** What registration returns. */
export interface HookHandle {
  /** The hook's name. */
  readonly name: string;
  /** The mechanism chosen for it (observe pio/mmio may change later: see `plan()`). */
  readonly mechanism: MechanismId;
  /** Unregisters the hook (before `seal()`). */
  remove(): void;
}

/** One line of {@link Monitor.plan}. */
export interface PlanEntry {
  /** Registration number. */
  readonly id: number;
  /** Hook name. */
  readonly name: string;
  /** Mediate or observe. */
  readonly mode: 'mediate' | 'observe';
  /** Event name. */
  readonly event: string;
  /** Human description of what it watches. */
  readonly target: string;
  /** CPL the mechanism was chosen for. */
  readonly cpl: Cpl;
  /** Chosen mechanism. */
  readonly mechanism: MechanismId;
  /** Why. */
  readonly why: string;
  /** Rejected mechanisms and why. */
  readonly rejected: Selection['rejected'];
  /** Price per event of the mechanism at this CPL (ns), from the calibration table. */
  readonly unitNs: number;
  /**
   * Exits per event, for a probe `exec` hook: 1 when the hooked instruction runs out of line,
   * 2 when it must run in place, 3 in place when it is shorter than the 2-byte trap (`unitNs` is
   * the price of that: `probe-breakpoint`, `probe-in-place`, or 1.5 × `probe-in-place`).
   */
  readonly exitsPerHit?: 1 | 2 | 3;
}

/** Per-hook counters kept by the monitor. */
export interface MonitorHookStats {
  /** Hook name. */
  readonly name: string;
  /** Events delivered to the function. */
  readonly events: number;
  /** Elements those events covered (a `rep insb`/`outsb` event counts its `count`; others 1). */
  readonly elements: number;
  /** Nanoseconds inside the function. */
  readonly handlerNs: number;
}

/** A CPUID override for {@link Monitor.emulateCpuid}. */
export interface CpuidOverride { readonly function: number; readonly index?: number; readonly eax?: number; readonly ebx?: number; readonly ecx?: number; readonly edx?: number }

/**
 * A reference monitor on one machine.
 *
 * @example Mediate the UART and the CMOS ports, observe executions of one instruction, audit
 * ```ts
 * import { Monitor, allow, deny, formatPlan, verifyAuditLog } from '@tsvm/monitor';
 *
 * const audit: string[] = [];
 * const mon = new Monitor(vm, { audit });                  // or { audit: process.stdout }
 * mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out' }, () => allow(), { name: 'uart' });
 * mon.mediate({ event: 'pio', ports: [0x70, 0x71] }, () => deny({ reason: 'no CMOS' }), { name: 'cmos' });
 * mon.observe({ event: 'exec', address: 0x1005 }, (ev) => { if (ev.event === 'exec') console.log('exec', ev.rip); });
 * console.log(formatPlan(mon.plan()));                      // the mechanism per hook, and why
 * mon.seal();
 * const stop = await vm.run({ timeout: 5000 });            // { reason: 'violation', ... } at the CMOS access
 * verifyAuditLog(audit);                                   // { ok: true, count, head }
 * ```
 *
 * @example Force the two-exit probe path (the guest never runs an instruction away from its address)
 * ```ts
 * const mon = new Monitor(vm, { outOfLine: false });
 * ```
 */
export class Monitor implements InternalEnv {
  /** The machine. */
  readonly machine: Machine;
  /** Name for plans and reports. */
  readonly name: string;
  /** The audit log (undefined when not auditing). */
  readonly audit: AuditLog | undefined;
  /** The calibration table in use. */
  readonly calibration: CalibrationTable;
  /** The guest-debug owner. */
  readonly debug: DebugUnit;
  readonly #records: HookRecord[] = [];
  readonly #flags: RegionFlags;
  readonly #dispatch: Dispatcher;
  readonly #dma: ReturnType<typeof dmaWatchHook>;
  #undma: (() => void) | undefined;
  readonly #coalesced = new Map<string, () => void>();
  readonly #protected: Array<readonly [bigint, bigint]> = [];
  #removers: Array<() => void> = [];
  #unexplain: (() => void) | undefined;
  readonly #unsample: () => void;
  #probe: PatchBreakpoints | undefined;
  /** Answers "out of line?" for the cost model before any probe is installed (never armed). */
  #planner: PatchBreakpoints | undefined;
  #int3: PatchBreakpoints | undefined;
  #cpuid: { entries: readonly CpuidOverride[] } | undefined;
  #nextId = 1;
  #sealed = false;
  #closed = false;

  /**
   * Attaches to `machine`: installs the monitor's two core hooks (one mediate, one observe
   * dispatcher) and names the instruction in core's unhandled-exit stops.
   */
  readonly #outOfLine: boolean;

  constructor(machine: Machine, options: MonitorOptions = {}) {
    if (!machine || typeof machine.addHook !== 'function') throw new InvalidArgumentError('machine', 'must be a Machine');
    this.machine = machine;
    this.name = options.name ?? machine.name;
    if (options.outOfLine !== undefined && typeof options.outOfLine !== 'boolean') throw new InvalidArgumentError('options.outOfLine', 'must be a boolean');
    this.#outOfLine = options.outOfLine ?? true;
    this.audit = options.audit === undefined ? undefined : options.audit instanceof AuditLog ? options.audit : new AuditLog(options.audit);
    this.calibration = options.calibration ?? assumedTable(hostIdentity(machine.capabilities.flavour));
    this.debug = new DebugUnit(machine.vcpu(0));
    this.#flags = new RegionFlags(machine);
    this.#dispatch = new Dispatcher(this, { probe: probeHook(this), debug: debugHook(this), watch: writeWatchHook(this) }, { guard: options.guard !== false });
    this.#removers.push(machine.addHook(this.#dispatch.mediateHook), machine.addHook(this.#dispatch.observeHook));
    try {
      this.#unexplain = machine.setExplainer((_exit, info) => whereIs(machine, info));
    } catch { /* another monitor already explains this machine's stops */ }
    this.#dma = dmaWatchHook(this);
    machine.events.on('started', this.#onStarted);
    machine.events.on('reset', this.#onReset);
    machine.events.on('snapshotting', this.#onSnapshotting);
    machine.events.on('snapshotted', this.#onSnapshotted);
    // Sampled write-watch observers run at every slice boundary; a throw stops the run.
    this.#unsample = machine.addSliceHook('monitor:write-watch-sample', () => this.sample());
    this.#rebuild();
  }

  /** @internal live records (InternalEnv). */
  records(): readonly HookRecord[] { return this.#records; }
  /** @internal (InternalEnv). */
  probe(): PatchBreakpoints | undefined { return this.#probe; }
  /** @internal The vCPU whose exit the patch engines handle now (their register access goes to it). */
  atVcpu(index: number): void { this.#cpuIndex = index; }
  #cpuIndex = 0;
  /** @internal (InternalEnv). */
  int3(): PatchBreakpoints | undefined { return this.#int3; }
  /** @internal (InternalEnv). */
  protectedPages(): ReadonlyArray<readonly [bigint, bigint]> { return this.#protected; }

  /**
   * Registers a mediate hook: it runs synchronously on the trap path and decides.
   *
   * @example Allow, deny (stop, ignore or fault) and emulate
   * ```ts
   * mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out' }, () => allow());
   * mon.mediate({ event: 'pio', ports: [0x60, 0x60], direction: 'in' }, () => emulate(0x22));     // the `in` reads 0x22
   * mon.mediate({ event: 'pio', ports: [0x40, 0x43] }, () => deny({ effect: 'ignore' }));         // reads all ones, writes dropped
   * mon.mediate({ event: 'msr', indices: [0xc0000103], direction: 'read' }, () => emulate(0));
   * mon.mediate({ event: 'write-watch', range: [0x200000, 0x200fff] }, (ev) =>
   *   ev.event === 'write-watch' && ev.source === 'dma' ? deny({ reason: 'no DMA here' }) : allow());
   * mon.mediate({ event: 'mmio', range: [0xfee00000, 0xfee00fff] }, () => deny({ effect: 'gp', reason: 'LAPIC off limits' }));
   * ```
   */
  mediate(spec: EventSpec, fn: MediateFn, options: HookOptions = {}): HookHandle {
    return this.#register('mediate', spec, fn, options);
  }

  /**
   * Registers an observe hook: it sees events (maybe late, maybe batched) and cannot change them.
   *
   * @example Cheaper than mediating: coalesced port writes, dirty-log write-watch, exec probes
   * ```ts
   * const bytes: number[] = [];
   * mon.observe({ event: 'pio', ports: [0x3f8, 0x3f8], direction: 'out' }, (ev) => { if (ev.event === 'pio') bytes.push(...ev.values); });
   * mon.observe({ event: 'write-watch', range: [0x100000, 0x1fffff] }, (ev) => console.log('page written', ev));
   * mon.observe({ event: 'exec', address: 0x1000 }, (ev, ctx) => {
   *   if (ev.event === 'exec') console.log(formatInstruction(ev.code, ev.rip, 64), 'on vCPU', ctx.vcpu);
   * });
   * ```
   */
  observe(spec: EventSpec, fn: ObserveFn, options: HookOptions = {}): HookHandle {
    return this.#register('observe', spec, fn, options);
  }

  /**
   * Installs a static CPUID table (the only way to "emulate" CPUID on KVM: it never exits).
   * Leaves not listed keep the host's values. Honoured at CPL0; on PVM a CPL3 guest sees the
   * outer hypervisor's values (see `plan()`).
   */
  emulateCpuid(entries: readonly CpuidOverride[]): void {
    this.#assertOpen();
    if (!Array.isArray(entries)) throw new InvalidArgumentError('entries', 'must be an array');
    const vcpu = this.machine.vcpu(0);
    const table: CpuidEntry[] = vcpu.supportedCpuid();
    entries.forEach((e, i) => {
      if (!Number.isInteger(e.function) || e.function < 0) throw new InvalidArgumentError(`entries[${i}].function`, 'must be a non-negative integer');
      const index = e.index ?? 0;
      let t = table.find((x) => x.function === e.function && x.index === index);
      if (!t) { t = { function: e.function, index, flags: e.index === undefined ? 0 : 1, eax: 0, ebx: 0, ecx: 0, edx: 0 }; table.push(t); }
      for (const r of ['eax', 'ebx', 'ecx', 'edx'] as const) { const v = e[r]; if (v !== undefined) t[r] = v >>> 0; }
    });
    vcpu.setCpuid(table);
    this.#cpuid = { entries: entries.slice() };
  }

  /** Freezes the hook table (and core's, and the buses): later registrations throw. */
  seal(): void {
    this.#assertOpen();
    if (this.#sealed) return;
    this.#rebuild();
    this.machine.sealHooks();
    this.#sealed = true;
  }

  /** Whether {@link seal} ran. */
  get sealed(): boolean {
    return this.#sealed;
  }

  /** Each hook with its mechanism, why it was chosen and its unit price. */
  plan(): PlanEntry[] {
    this.#reselect();
    const out: PlanEntry[] = this.#records.map((r) => {
      const unitNs = priceOf(this.calibration, r.selection.mechanism, r.cpl) ?? NaN;
      const entry: PlanEntry = {
        id: r.id, name: r.name, mode: r.mode, event: r.spec.event, target: describeSpec(r.spec), cpl: r.cpl,
        mechanism: r.selection.mechanism, why: r.selection.why, rejected: r.selection.rejected, unitNs,
      };
      if (r.selection.mechanism !== 'probe-breakpoint' || r.spec.event !== 'exec') return entry;
      const exits = this.#probeExitsPerHit(r.spec.address, r.spec.virtualAddress);
      return { ...entry, exitsPerHit: exits, unitNs: probePriceOf(this.calibration, r.cpl, exits) ?? NaN };
    });
    if (this.#cpuid) {
      const cpl3 = priceOf(this.calibration, 'cpuid-table', 3) === undefined;
      out.push({
        id: 0, name: 'cpuid-table', mode: 'mediate', event: 'cpuid', target: `${this.#cpuid.entries.length} overridden leaves`, cpl: 0, mechanism: 'cpuid-table',
        why: `KVM_SET_CPUID2 at set-up (CPUID never exits)${cpl3 ? '; NOT honoured at CPL3 on this host' : ''}`, rejected: [], unitNs: 0,
      });
    }
    return out;
  }

  /** Per-hook event counts and handler time, measured by the monitor. */
  hookStats(): MonitorHookStats[] {
    return this.#records.map((r) => ({ name: r.name, events: r.events, elements: r.elements, handlerNs: r.handlerNs }));
  }

  /** @internal the live records with their core hooks (for the cost report). */
  recordsForReport(): readonly HookRecord[] {
    return this.#records;
  }

  /**
   * Reads `length` bytes of guest RAM at guest-physical `physical` as the guest's program has
   * them: the bytes under the monitor's probe and `int3` traps are the original code, not the
   * trap (a debugger's or dumper's view of hooked code).
   * @throws GuestMemoryError when the range is not guest RAM; InvalidArgumentError for a bad length.
   */
  readOriginal(physical: number | bigint, length: number): Uint8Array {
    const bytes = this.machine.memory.read(physical, length);
    const engine = this.#probe ?? this.#int3;
    if (!engine) return bytes;
    const other = engine === this.#probe ? this.#int3 : undefined;
    const at = BigInt(physical);
    for (let i = 0; i < bytes.length; i++) {
      const a = at + BigInt(i);
      if (engine.covers(a) || other?.covers(a)) bytes[i] = engine.originalCode(a, other)[0] ?? (bytes[i] as number);
    }
    return bytes;
  }

  /** Harvests the dirty log now and delivers observe write-watch events (the run loop also does it at every slice boundary). */
  sample(): void {
    const recs = this.#records.filter((r) => r.spec.event === 'write-watch' && r.mode === 'observe');
    if (recs.length === 0) return;
    const ctx = hookContext(this.machine, undefined, undefined);
    for (const region of this.#flags.dirtyRegions()) {
      for (const page of dirtyPageAddresses(region, this.machine.dirtyPages(region.slot))) {
        if (this.#protected.some(([lo, hi]) => page >= lo && page < hi)) continue; // told synchronously
        for (const r of recs) {
          if (r.spec.event !== 'write-watch' || page > r.spec.hi || page + 4095n < r.spec.lo) continue;
          callObserve(r, { event: 'write-watch', address: page, size: 4096, value: undefined }, ctx);
        }
      }
    }
  }

  /** Detaches: restores patched code, unregisters core hooks (if not sealed), stops coalescing. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.machine.events.off('started', this.#onStarted);
    this.machine.events.off('reset', this.#onReset);
    this.machine.events.off('snapshotting', this.#onSnapshotting);
    this.machine.events.off('snapshotted', this.#onSnapshotted);
    this.#unsample();
    this.#probe?.clear();
    this.#int3?.clear();
    for (const un of this.#coalesced.values()) un();
    this.#coalesced.clear();
    if (!this.#sealed) for (const un of this.#removers) un();
    this.#removers = [];
    this.#unexplain?.();
    this.#undma?.();
    this.#undma = undefined;
  }

  /** `using mon = new Monitor(vm)`. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** 1 or 2 exits per probe hit at `physical`, judged from the guest's code and CPU mode now. */
  #probeExitsPerHit(physical: bigint, virtual: bigint): 1 | 2 | 3 {
    try {
      const sregs = this.machine.vcpu(0).getSregs();
      // Before the first probe exists (choosing the mechanism), an engine with no targets answers:
      // it only decodes and relocates, and the dispatcher never sees it.
      const engine = this.#probe ?? (this.#planner ??= new PatchBreakpoints('probe', this.#cpuAccess(), { outOfLine: this.#outOfLine }));
      return engine.exitsPerHit(physical, virtual, sregs);
    } catch {
      return this.#outOfLine ? 1 : 2;
    }
  }

  readonly #onStarted = (): void => {
    if (!this.#sealed) this.#reconcileCoalescing();
  };

  /**
   * A snapshot holds the guest's own code, not the probe traps: a machine restored from it runs
   * correctly without a monitor, and a new monitor attached to it arms its probes afresh.
   */
  readonly #onSnapshotting = (): void => {
    this.#probe?.suspend();
    this.#int3?.suspend();
  };

  readonly #onSnapshotted = (): void => {
    this.#probe?.resume();
    this.#int3?.resume();
  };

  /** `Machine.reset` put guest RAM back, probe traps and trampoline slots included: re-arm. */
  readonly #onReset = (): void => {
    this.#probe?.afterReset();
    this.#int3?.afterReset();
    this.debug.reapply();
  };

  #assertOpen(): void {
    if (this.#closed) throw new StateError(`monitor '${this.name}' is closed`);
  }

  #currentCpl(): Cpl {
    const s = this.machine.vcpu(0).getSregs();
    return (s.cr0 & 1n) === 1n && s.cs.dpl === 3 ? 3 : 0;
  }

  #select(spec: NormalSpec, mode: 'mediate' | 'observe', cpl: Cpl, self?: HookRecord): Selection {
    const others = this.#records.filter((r) => r !== self);
    return selectMechanism({
      spec, mode, cpl, caps: this.machine.capabilities, table: this.calibration,
      mediatedOverlap: others.some((r) => r.mode === 'mediate' && specsOverlap(r.spec, spec)),
      devicesCover: this.#devicesCover(spec),
      freeDebugRegs: this.debug.freeHwSlots,
      ...(spec.event === 'exec' ? { probeExitsPerHit: this.#probeExitsPerHit(spec.address, spec.virtualAddress), vcpus: this.machine.vcpus.length } : {}),
    });
  }

  #devicesCover(spec: NormalSpec): boolean {
    if (spec.event !== 'pio' && spec.event !== 'mmio') return false;
    let at = spec.lo;
    for (const e of (spec.event === 'pio' ? this.machine.io : this.machine.mmio).entries()) {
      if (e.start <= at && at < e.end) at = e.end;
      if (at > spec.hi) return true;
    }
    return at > spec.hi;
  }

  #register(mode: 'mediate' | 'observe', raw: EventSpec, fn: MediateFn | ObserveFn, options: HookOptions): HookHandle {
    this.#assertOpen();
    if (this.#sealed) throw new StateError(`monitor '${this.name}' is sealed: register hooks before seal()`);
    if (typeof fn !== 'function') throw new InvalidArgumentError('fn', 'must be a function');
    const spec = normaliseSpec(raw);
    if (options.name !== undefined && (typeof options.name !== 'string' || options.name === '')) throw new InvalidArgumentError('options.name', 'must be a non-empty string');
    const cpl: Cpl = (spec.event === 'exec' || spec.event === 'step') && spec.cpl !== undefined ? spec.cpl : this.#currentCpl();
    const selection = this.#select(spec, mode, cpl);
    const id = this.#nextId++;
    const rec: HookRecord = { id, name: options.name ?? `${mode}:${spec.event}#${id}`, mode, spec, fn, cpl, selection, events: 0, elements: 0, handlerNs: 0, timedCalls: 0, timedNs: 0, verdicts: { allow: 0, deny: 0, emulate: 0 } };
    this.#install(rec);
    this.#records.push(rec);
    this.#rebuild();
    let removed = false;
    return {
      name: rec.name, mechanism: selection.mechanism,
      remove: () => {
        if (removed) return;
        if (this.#sealed) throw new StateError(`monitor '${this.name}' is sealed: hooks cannot be removed`);
        removed = true;
        this.#records.splice(this.#records.indexOf(rec), 1);
        this.#uninstall(rec);
        this.#rebuild();
      },
    };
  }

  /** Sets the mechanism up (patches, debug registers, MSR filter, memslots) and the core hook. */
  #install(rec: HookRecord): void {
    const s = rec.spec;
    switch (s.event) {
      case 'msr': this.#applyMsrFilter(rec); break;
      case 'step': this.debug.step(1); break;
      case 'write-watch':
        if (rec.mode === 'mediate') {
          this.#flags.protect(s.lo, s.hi);
          this.#protected.push(RegionFlags.pages(s.lo, s.hi));
        } else {
          this.#flags.logDirty(s.lo, s.hi);
        }
        break;
      case 'exec': this.#installExec(rec, s.address, s.virtualAddress); break;
      default: break;
    }
  }

  #installExec(rec: HookRecord, physical: bigint, virtual: bigint): void {
    const m = rec.selection.mechanism;
    if (m === 'hw-breakpoint') { rec.hwSlot = this.debug.addHw(virtual); return; }
    const cpu = this.#cpuAccess();
    if (!this.machine.memory.contains(physical, 1)) throw new InvalidArgumentError('spec.address', `0x${physical.toString(16)} is not guest RAM`);
    if (m === 'sw-breakpoint') {
      this.#int3 ??= new PatchBreakpoints('int3', cpu);
      this.#int3.add({ physical, virtual });
      this.debug.softwareBreakpoints(true);
    } else {
      this.#probe ??= new PatchBreakpoints('probe', cpu, { outOfLine: this.#outOfLine });
      this.#probe.add({ physical, virtual });
    }
  }

  /** What a patch engine may touch of the machine: memory, and the vCPU whose trap is handled. */
  #cpuAccess(): ConstructorParameters<typeof PatchBreakpoints>[1] {
    const tramp = this.machine.layout.probeTrampoline;
    return {
      memory: this.machine.memory,
      // The vCPU whose probe exit is being handled (atVcpu): on an SMP machine any of them.
      regs: () => this.machine.vcpu(this.#cpuIndex).getRegs(),
      setRip: (rip: bigint) => this.machine.vcpu(this.#cpuIndex).setRegs({ rip }),
      sregs: () => this.machine.vcpu(this.#cpuIndex).getSregs(),
      msr: (i: number) => { try { return this.machine.vcpu(this.#cpuIndex).getMsrs([i])[0]?.data; } catch { return undefined; } },
      // Probe trampolines live in a free page of core's system area (identity-mapped, user-accessible).
      ...(tramp === undefined ? {} : { trampoline: { physical: BigInt(tramp.address), virtual: BigInt(tramp.address), size: tramp.size } }),
    };
  }

  #uninstall(rec: HookRecord): void {
    const s = rec.spec;
    if (s.event === 'msr') this.#applyMsrFilter();
    if (s.event === 'step') this.debug.step(-1);
    if (s.event === 'exec') {
      if (rec.hwSlot !== undefined) this.debug.removeHw(rec.hwSlot);
      const still = this.#records.some((r) => r.spec.event === 'exec' && r.spec.address === s.address);
      if (!still) { this.#probe?.remove(s.address); this.#int3?.remove(s.address); }
    }
    // Protected pages stay read-only after removal (writes still exit and are written through).
  }

  #applyMsrFilter(adding?: HookRecord): void {
    const reads = new Set<number>(), writes = new Set<number>();
    for (const r of adding ? [...this.#records, adding] : this.#records) {
      if (r.spec.event !== 'msr') continue;
      for (const i of r.spec.indices) {
        if (r.spec.dir !== 'write') reads.add(i);
        if (r.spec.dir !== 'read') writes.add(i);
      }
    }
    this.machine.interceptMsrs([...reads], [...writes]);
  }

  /** Rebuilds the dispatch tables (registration time, never per exit) and reconciles coalescing. */
  #rebuild(): void {
    this.#dispatch.rebuild();
    // Device DMA into watched ranges passes the same write-watch hooks (core's DMA gate).
    const watching = this.#records.some((r) => r.spec.event === 'write-watch');
    if (watching && !this.#undma) this.#undma = DmaGate.of(this.machine.memory).add(this.#dma);
    if (!watching && this.#undma) { this.#undma(); this.#undma = undefined; }
    this.#reconcileCoalescing();
  }

  #reselect(): void {
    for (const r of this.#records) {
      if (r.mode === 'observe' && (r.spec.event === 'pio' || r.spec.event === 'mmio')) r.selection = this.#select(r.spec, r.mode, r.cpl, r);
    }
  }

  /** Coalesces exactly the ranges of observe hooks whose mechanism is the ring (merged, no overlap with mediation). */
  #reconcileCoalescing(): void {
    this.#reselect();
    const want = new Map<string, { port?: number; address?: bigint; size: number }>();
    for (const kind of ['pio', 'mmio'] as const) {
      const spans = this.#records
        .filter((r) => r.spec.event === kind && r.selection.mechanism === (kind === 'pio' ? 'coalesced-pio' : 'coalesced-mmio'))
        .map((r) => (r.spec.event === kind ? [r.spec.lo, r.spec.hi] as const : [0n, 0n] as const))
        .sort((a, b) => (a[0] < b[0] ? -1 : 1));
      const merged: Array<[bigint, bigint]> = [];
      for (const [lo, hi] of spans) {
        const last = merged[merged.length - 1];
        if (last && lo <= last[1] + 1n) last[1] = hi > last[1] ? hi : last[1];
        else merged.push([lo, hi]);
      }
      for (const [lo, hi] of merged) {
        const size = Number(hi - lo + 1n);
        want.set(`${kind}:${lo}:${size}`, kind === 'pio' ? { port: Number(lo), size } : { address: lo, size });
      }
    }
    for (const [k, un] of this.#coalesced) if (!want.has(k)) { un(); this.#coalesced.delete(k); }
    for (const [k, r] of want) {
      if (this.#coalesced.has(k)) continue;
      this.#coalesced.set(k, this.machine.coalesce(r.port !== undefined ? { port: r.port, size: r.size } : { address: r.address ?? 0n, size: r.size }));
    }
  }
}

