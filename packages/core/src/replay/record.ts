/**
 * Recording: snapshot the machine, then log every input the guest receives from the host at
 * exit boundaries — read results, MSR results, faults, device DMA into RAM (observed at the
 * machine's DMA gate) and interrupt-line changes (held back to the next exit boundary, so the
 * point of delivery is reproducible) — plus the registers at every stop, as checkpoints.
 *
 * Cheap on purpose: no register reads per exit (17–76 µs each on PVM), only the exit's own
 * copied-out payload and the bytes the guest got.
 * @module
 */
import { Machine, type RunOptions } from '../machine.js';
import type { Backend } from '../backend.js';
import type { Stop } from '../stop.js';
import type { VcpuExit } from '../exits.js';
import { DmaGate } from '../dma.js';
import { StateError } from '../errors.js';
import type { Snapshot } from '../snapshot/snapshot.js';
import { countsAsGuestExit, slotOf, type TapSlot, type VcpuTap } from './tap.js';
import { snapshotDigest, type LoggedExit, type LoggedStop, type ReplayLog } from './log.js';

/** CR4.TSD: `rdtsc` at CPL > 0 raises #GP instead of reading the TSC. */
const CR4_TSD = 1n << 2n;

/** Options of {@link startRecording} / {@link record}. */
export interface RecordOptions {
  /**
   * Set `CR4.TSD` while recording (default `true`), so a CPL3 `rdtsc`/`rdtscp` — whose value
   * differs on every run and which causes no exit — raises `#GP` (core's exception reporter
   * stops the run) instead of silently making the recording unreplayable. CPL0 code is not
   * covered (`TSD` does not restrict ring 0).
   */
  readonly tsd?: boolean;
}

/** A recorded execution: the snapshot it starts from and the log of its inputs. */
export interface Recording {
  /** The machine's state when recording began. Owned by the recording: close it when done. */
  readonly snapshot: Snapshot;
  /** What the guest received, by exit number. */
  readonly log: ReplayLog;
  /**
   * Whether a CPL3 `rdtsc` faulted during this recording instead of reading the TSC: `CR4.TSD`
   * was set and this host honours it ({@link rdtscTrapped}). `false` on a host that ignores it
   * (PVM runs CPL3 code natively; measured): a guest that reads the TSC is not replayable there,
   * and replay reports the first exit where it shows.
   */
  readonly rdtscTrapped: boolean;
}

/** rdtsc ; mov dx, 0xf4 ; out dx, al */
const RDTSC_PROBE = Uint8Array.of(0x0f, 0x31, 0x66, 0xba, 0xf4, 0x00, 0xee);
/** Keyed by the backend's `capabilities` object, which wrappers (`tappable`, restore's) share with the backend they wrap. */
const trapped = new WeakMap<object, Promise<boolean>>();

/**
 * Whether `CR4.TSD` turns a CPL3 `rdtsc` into `#GP` on `backend`: learned once per backend by
 * running one (a 2 MiB long-mode machine, `rdtsc` at ring 3 with TSD set), never assumed from
 * the flavour — once for a backend and every wrapper of it (a fresh `tappable(kvmBackend())`
 * per recorded machine asks no second time). False when the probe cannot run.
 */
export function rdtscTrapped(backend: Backend): Promise<boolean> {
  let p = trapped.get(backend.capabilities);
  if (!p) {
    p = (async () => {
      try {
        await using m = await Machine.create({ memory: 2 * 1024 * 1024, backend, name: 'tsvm-tsd-probe' });
        m.attach({ port: 0xf4, size: 1 }, { name: 'probe', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
        m.loadFlat(RDTSC_PROBE, { at: 0x1000, mode: 'long', ring: 3 });
        const v = m.vcpu(0);
        const s = v.getSregs();
        v.setSregs({ ...s, cr4: s.cr4 | CR4_TSD });
        const stop = await m.run({ timeout: 5000 });
        return stop.reason === 'exception' && stop.vector === 13;
      } catch {
        return false;
      }
    })();
    trapped.set(backend.capabilities, p);
  }
  return p;
}

/** The log being written of one machine; {@link Recorder.stop} hands it out. */
export class Recorder {
  readonly #machine: Machine;
  readonly #slot: TapSlot;
  readonly #snapshot: Snapshot;
  readonly #log: ReplayLog;
  readonly #undo: Array<() => void> = [];
  #stopped = false;
  /** See {@link Recording.rdtscTrapped}. */
  readonly rdtscTrapped: boolean;

  /** @internal use {@link startRecording}. */
  constructor(machine: Machine, slot: TapSlot, snapshot: Snapshot, tsd: boolean, rdtscTrapped = false) {
    this.rdtscTrapped = tsd && rdtscTrapped;
    this.#machine = machine;
    this.#slot = slot;
    this.#snapshot = snapshot;
    const log: ReplayLog = { base: snapshotDigest(snapshot), tsd, exits: [], dma: [], irqs: [], stops: [] };
    this.#log = log;
    const mem = machine.memory;
    const vm = slot.vm;
    let current: LoggedExit | undefined;
    let counted = true; // the first run starts at an exit boundary
    const deferred: Array<{ irq: number; level: boolean }> = [];
    const tap: VcpuTap = {
      beforeRun() {
        // Interrupts raised since the last guest exit are delivered now, at an exit boundary
        // the replay can find again (not at a slice-timer return, whose place in the
        // instruction stream nobody can reproduce).
        if (!counted || deferred.length === 0) return;
        for (const d of deferred) {
          log.irqs.push({ after: log.exits.length, irq: d.irq, level: d.level });
          vm.irqLine(d.irq, d.level);
        }
        deferred.length = 0;
      },
      afterRun(exit) {
        counted = countsAsGuestExit(exit, mem);
        current = counted ? logged(exit) : undefined;
        if (current) log.exits.push(current);
      },
      read(data) {
        if (current) current.read = data.slice();
        return data;
      },
      msr(data, error) {
        if (current) current.msr = { data, error };
        return { data, error };
      },
      fault(vector, errorCode) {
        if (current) current.fault = { vector, errorCode };
      },
      irqLine(irq, level) {
        deferred.push({ irq, level });
        return false;
      },
    };
    slot.tap = tap;
    this.#undo.push(() => { if (slot.tap === tap) slot.tap = undefined; });
    this.#undo.push(DmaGate.of(mem).add({
      name: 'tsvm-record',
      observe: (w) => { log.dma.push({ after: log.exits.length, device: w.device, address: w.address, data: w.data.slice() }); },
    }));
    const onStop = (s: Stop): void => { log.stops.push(stopEntry(s, log.exits.length, machine)); };
    machine.events.on('stopped', onStop);
    this.#undo.push(() => machine.events.off('stopped', onStop));
  }

  /** Guest exits recorded so far. */
  get exits(): number {
    return this.#log.exits.length;
  }

  /**
   * Ends recording and returns it. Interrupts still held back for the next exit boundary are
   * delivered now (and logged at the current exit number). Idempotent: later calls return the
   * same recording.
   */
  stop(): Recording {
    if (!this.#stopped) {
      this.#stopped = true;
      this.#slot.tap?.beforeRun();
      for (const u of this.#undo.reverse()) u();
      if (this.#log.tsd) {
        const v = this.#machine.vcpu(0);
        const s = v.getSregs();
        v.setSregs({ ...s, cr4: s.cr4 & ~CR4_TSD });
      }
    }
    return { snapshot: this.#snapshot, log: this.#log, rdtscTrapped: this.rdtscTrapped };
  }
}

function logged(exit: VcpuExit): LoggedExit {
  switch (exit.kind) {
    case 'io': return exit.direction === 'out'
      ? { kind: 'io', at: BigInt(exit.port), dir: 'out', size: exit.size, count: exit.count, wrote: exit.data.slice() }
      : { kind: 'io', at: BigInt(exit.port), dir: 'in', size: exit.size, count: exit.count };
    case 'mmio': return exit.isWrite
      ? { kind: 'mmio', at: exit.address, dir: 'write', size: exit.size, count: 1, wrote: exit.data.slice() }
      : { kind: 'mmio', at: exit.address, dir: 'read', size: exit.size, count: 1 };
    case 'msr': return exit.direction === 'write'
      ? { kind: 'msr', at: BigInt(exit.index), dir: 'write', wrote: u64le(exit.data) }
      : { kind: 'msr', at: BigInt(exit.index), dir: 'read' };
    default: return { kind: exit.kind };
  }
}

/** @internal 8 little-endian bytes of a u64. */
export function u64le(v: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, v), true);
  return b;
}

function stopEntry(s: Stop, after: number, machine: Machine): LoggedStop {
  const code = s.reason === 'debug-exit' ? s.code : s.reason === 'exception' ? s.vector : undefined;
  return { after, reason: s.reason, ...(code !== undefined ? { code } : {}), regs: machine.vcpu(0).getRegs() };
}

/**
 * Starts recording `machine` (stopped, single vCPU, created on a {@link tappable} backend):
 * takes the base snapshot, then logs what the guest receives on every later `run()` until
 * {@link Recorder.stop}.
 * @throws StateError when the machine's backend is not tappable, or it is already recording.
 */
export async function startRecording(machine: Machine, options: RecordOptions = {}): Promise<Recorder> {
  if (machine.vcpus.length !== 1) throw new StateError('record/replay supports 1-vCPU machines only');
  const slot = slotOf(machine.vcpu(0).backend);
  if (!slot) throw new StateError(`machine '${machine.name}' cannot be recorded: create it with Machine.create({ backend: tappable(backend) })`);
  if (slot.tap) throw new StateError(`machine '${machine.name}' is already being recorded or replayed`);
  const tsd = options.tsd ?? true;
  if (tsd) {
    // Before the snapshot, so a replay starts with the same CR4 the recording ran with.
    const v = machine.vcpu(0);
    const s = v.getSregs();
    v.setSregs({ ...s, cr4: s.cr4 | CR4_TSD });
  }
  const honoured = tsd ? await rdtscTrapped(machine.backend) : false;
  const snapshot = await machine.snapshot();
  return new Recorder(machine, slot, snapshot, tsd, honoured);
}

/**
 * Records one `run()` of `machine`: {@link startRecording}, `machine.run(options)`,
 * {@link Recorder.stop}. The stop itself is the last entry of `log.stops`.
 */
export async function record(machine: Machine, options: RunOptions & RecordOptions = {}): Promise<Recording & { readonly stop: Stop }> {
  const { tsd, ...run } = options;
  const rec = await startRecording(machine, tsd === undefined ? {} : { tsd });
  let stop: Stop;
  try {
    stop = await machine.run(run);
  } finally {
    rec.stop();
  }
  return { ...rec.stop(), stop };
}
