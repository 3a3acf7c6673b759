/**
 * Replay: restore the recording's base snapshot on a tapped backend and run it with the log
 * standing in for the host. Each guest exit is checked against the log (first difference →
 * {@link ReplayDivergence} naming the exit number, the instruction and what differed); reads
 * and MSR results are the recorded bytes, whatever a device (if any is attached) would say;
 * recorded DMA goes back into RAM through the DMA gate (so a monitor's write-watch sees it) and
 * recorded interrupts reach the irqchip at the same exit number; devices' own interrupts are
 * dropped. Exits with no device behind them are answered by the `tsvm-replay` mediate hook,
 * which runs after the monitor's hooks, so the guest needs none of its devices.
 *
 * The monitor (any `Machine` set-up: a `Monitor`, exec hooks, write-watches) may differ from
 * the recording's: its probe, debug and write-watch exits are not guest exits
 * (`countsAsGuestExit`) and do not count. A monitor *decision* that changes the guest (a deny)
 * is a divergence, reported like any other.
 * @module
 */
import type { Backend } from '../backend.js';
import type { DeviceMapping } from '../device.js';
import type { VcpuExit } from '../exits.js';
import { describeExit } from '../exits.js';
import type { ExitHook, HookDecision } from '../hooks.js';
import { Machine } from '../machine.js';
import { DmaGate } from '../dma.js';
import { InvalidArgumentError, SnapshotFormatError, TsvmError } from '../errors.js';
import { kvmBackend } from '../backend/kvm.js';
import { instructionRipOf } from '../cpu/exit-rip.js';
import { Snapshot } from '../snapshot/snapshot.js';
import { REG_NAMES } from '@tsvm/kvm-backend';
import { countsAsGuestExit, slotOf, tappable, type VcpuTap } from './tap.js';
import { snapshotDigest, type LoggedExit, type LoggedStop, type ReplayLog } from './log.js';
import { u64le } from './record.js';

/** The replayed guest did something other than the recording did. */
export class ReplayDivergence extends TsvmError {
  /** Guest exit number (1-based) at which it diverged; for a stop, the exits made so far. */
  readonly exit: number;
  /** The instruction behind that exit (or RIP at the stop), when registers could be read. */
  readonly rip: bigint | undefined;
  /** What differed: `kind`, `at`, `dir`, `size`, `count`, `wrote`, `end-of-log`, `stop`, `regs.rax`, `dma`, ... */
  readonly field: string;
  /** What the log says. */
  readonly expected: string;
  /** What the replay did. */
  readonly got: string;

  /**
   * @param exit - guest exit number.
   * @param rip - instruction address, if known.
   * @param field - what differed.
   * @param expected - the log's value.
   * @param got - the replay's value.
   * @param options - `cause` chaining.
   */
  constructor(exit: number, rip: bigint | undefined, field: string, expected: string, got: string, options?: { cause?: unknown }) {
    super('TSVM_REPLAY_DIVERGENCE', `replay diverged at exit ${exit}${rip !== undefined ? ` (rip 0x${rip.toString(16)})` : ''}: ${field}: expected ${expected}, got ${got}`, options);
    this.exit = exit;
    this.rip = rip;
    this.field = field;
    this.expected = expected;
    this.got = got;
  }
}

/** Options of {@link replay}. */
export interface ReplayOptions {
  /** The hypervisor (wrapped with `tappable`); defaults to the process-wide KVM backend. */
  readonly backend?: Backend;
  /**
   * Sets up the analysis on the restored machine before it runs (attach a `Monitor`, add hooks).
   * Do not seal the machine's hooks here: the replay adds its own afterwards.
   */
  readonly monitor?: (machine: Machine) => void | Promise<void>;
  /**
   * Devices to attach (optional: the log answers every read). Their state comes from the
   * snapshot; without them the snapshot's device state is skipped.
   */
  readonly devices?: readonly DeviceMapping[];
  /** Timeout per recorded run in ms (default 30 000). */
  readonly timeout?: number;
  /** Name of the replay machine. */
  readonly name?: string;
}

/** How a replay went. The machine stays open for inspection: close it. */
export interface ReplayResult {
  /** The replayed machine, stopped where the recording stopped (or at the divergence). */
  readonly machine: Machine;
  /** Guest exits replayed. */
  readonly exits: number;
  /** Runs replayed to their recorded stop. */
  readonly runs: number;
  /** The first divergence, if any. */
  readonly divergence: ReplayDivergence | undefined;
  /** The recorded stops, for comparison with what the replay saw. */
  readonly stops: readonly LoggedStop[];
}

const deviceless = new WeakMap<Snapshot, Snapshot>();

/** `snap` without its device state: a replay needs no devices, restore would demand them. */
function withoutDevices(snap: Snapshot): Snapshot {
  let d = deviceless.get(snap);
  if (d === undefined) {
    // Shares the image (never closed through this object): it lives as long as `snap`.
    d = new Snapshot({ ...snap.manifest, devices: {} }, snap.image(), snap.mapSource());
    deviceless.set(snap, d);
  }
  return d;
}

const hexs = (b: Uint8Array | undefined): string => (b === undefined ? 'nothing' : `[${Buffer.from(b).toString('hex')}]`);

/** The first field of `got` that differs from the logged exit, or undefined. */
function difference(want: LoggedExit, got: VcpuExit): [field: string, expected: string, got: string] | undefined {
  if (want.kind !== got.kind) return ['kind', want.kind, describeExit(got)];
  const hex = (v: bigint | undefined): string => `0x${(v ?? 0n).toString(16)}`;
  switch (got.kind) {
    case 'io':
      if (want.at !== BigInt(got.port)) return ['at', `port ${hex(want.at)}`, `port 0x${got.port.toString(16)}`];
      if (want.dir !== got.direction) return ['dir', String(want.dir), got.direction];
      if (want.size !== got.size) return ['size', String(want.size), String(got.size)];
      if ((want.count ?? 1) !== got.count) return ['count', String(want.count), String(got.count)];
      if (got.direction === 'out' && !same(want.wrote, got.data)) return ['wrote', hexs(want.wrote), hexs(got.data)];
      return undefined;
    case 'mmio':
      if (want.at !== got.address) return ['at', hex(want.at), hex(got.address)];
      if (want.dir !== (got.isWrite ? 'write' : 'read')) return ['dir', String(want.dir), got.isWrite ? 'write' : 'read'];
      if (want.size !== got.size) return ['size', String(want.size), String(got.size)];
      if (got.isWrite && !same(want.wrote, got.data)) return ['wrote', hexs(want.wrote), hexs(got.data)];
      return undefined;
    case 'msr':
      if (want.at !== BigInt(got.index)) return ['at', `msr ${hex(want.at)}`, `msr 0x${got.index.toString(16)}`];
      if (want.dir !== got.direction) return ['dir', String(want.dir), got.direction];
      if (got.direction === 'write' && !same(want.wrote, u64le(got.data))) return ['wrote', hexs(want.wrote), hexs(u64le(got.data))];
      return undefined;
    default:
      return undefined;
  }
}

function same(a: Uint8Array | undefined, b: Uint8Array): boolean {
  return a !== undefined && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

/** Stops that end a run wherever the guest happened to be: not tied to an exit, not reproducible exactly. */
const UNTIED = new Set(['timeout', 'aborted']);

/**
 * Replays `recording` (its base snapshot and log) on a new machine, optionally under another
 * monitor, and checks that the guest does what it did when recorded.
 * @throws SnapshotFormatError when the log was not recorded from this snapshot; the replay's
 *   own divergences are returned in {@link ReplayResult.divergence}, not thrown.
 */
export async function replay(recording: { readonly snapshot: Snapshot; readonly log: ReplayLog }, options: ReplayOptions = {}): Promise<ReplayResult> {
  if (!recording || typeof recording !== 'object' || !(recording.snapshot instanceof Snapshot)) throw new InvalidArgumentError('recording', 'must be { snapshot, log } (from record() or parseLog)');
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  if (options.monitor !== undefined && typeof options.monitor !== 'function') throw new InvalidArgumentError('monitor', 'must be a function (machine) => void');
  const timeout = options.timeout ?? 30_000;
  if (typeof timeout !== 'number' || !(timeout > 0)) throw new InvalidArgumentError('timeout', 'must be a positive number of milliseconds');
  const { snapshot, log } = recording;
  const base = snapshotDigest(snapshot);
  if (log.base !== base) throw new SnapshotFormatError(`replay log: base: recorded from snapshot ${log.base.slice(0, 12)}…, this snapshot is ${base.slice(0, 12)}…`);

  const snap = options.devices ? snapshot : withoutDevices(snapshot);
  const m = await Machine.restore(snap, {
    backend: tappable(options.backend ?? kvmBackend()),
    ...(options.name !== undefined ? { name: options.name } : {}),
    ...(options.devices ? { devices: options.devices } : {}),
  });
  try {
    // After restore, so the monitor sees the machine as the recording began (paging on, CPU
    // state applied: an exec hook can translate its address and arm its probe).
    await options.monitor?.(m);
    return await drive(m, log, timeout);
  } catch (e) {
    await m.close().catch(() => undefined);
    throw e;
  }
}

async function drive(m: Machine, log: ReplayLog, timeout: number): Promise<ReplayResult> {
  const slot = slotOf(m.vcpu(0).backend);
  if (!slot) throw new TsvmError('TSVM_REPLAY', 'the replay machine is not tapped (a pooled VM from another backend?)');
  const vcpu = m.vcpu(0).backend;
  const gate = DmaGate.of(m.memory);
  let n = 0;
  let di = 0;
  let ii = 0;
  let si = 0;
  let current: LoggedExit | undefined;
  let lastExit: VcpuExit | undefined;
  let stoppedAsRecorded = false;
  const ripOf = (exit: VcpuExit | undefined): bigint | undefined => {
    try { return instructionRipOf(exit, vcpu, m.memory, m.capabilities.ioExitRip); } catch { return undefined; }
  };
  const tap: VcpuTap = {
    beforeRun() {
      for (let d = log.dma[di]; d !== undefined && d.after <= n; d = log.dma[++di]) {
        try {
          gate.write(m.memory, d.device, d.address, d.data);
        } catch (e) {
          throw new ReplayDivergence(n, ripOf(lastExit), 'dma', `${d.device} writes ${d.data.length} bytes at 0x${d.address.toString(16)}`, e instanceof Error ? e.message : String(e), { cause: e });
        }
      }
      for (let q = log.irqs[ii]; q !== undefined && q.after <= n; q = log.irqs[++ii]) slot.vm.irqLine(q.irq, q.level);
    },
    afterRun(exit) {
      if (!countsAsGuestExit(exit, m.memory)) { current = undefined; return; }
      n++;
      lastExit = exit;
      const want = log.exits[n - 1];
      if (want === undefined) throw new ReplayDivergence(n, ripOf(exit), 'end-of-log', `no exit ${n} (the log has ${log.exits.length})`, describeExit(exit));
      const diff = difference(want, exit);
      if (diff) throw new ReplayDivergence(n, ripOf(exit), ...diff);
      current = want;
    },
    read: (data) => current?.read ?? data,
    msr: (data, error) => current?.msr ?? { data, error },
    fault() { /* decided by a hook: the replay hook repeats a recorded fault */ },
    // Devices present in the replay do not interrupt the guest: the log's interrupts do.
    irqLine: () => false,
  };
  slot.tap = tap;

  const owned = (exit: VcpuExit): boolean =>
    exit.kind === 'io' ? m.io.find(BigInt(exit.port), exit.size) !== undefined
      : exit.kind === 'mmio' ? m.mmio.find(exit.address, exit.size) !== undefined : false;
  const hook: ExitHook = {
    name: 'tsvm-replay',
    mode: 'mediate',
    matches: (exit) => current !== undefined && (exit.kind === 'io' || exit.kind === 'mmio' || exit.kind === 'msr') && !owned(exit),
    handle: (): HookDecision => {
      const e = current as LoggedExit;
      const stop = log.stops[si];
      if (stop && stop.after === n && !UNTIED.has(stop.reason)) {
        // The recording stopped at this exit (a device or the recording's monitor asked to):
        // stop here too; `drive` reports the recorded reason.
        stoppedAsRecorded = true;
        return { verdict: 'deny', effect: 'stop', reason: `replay: recorded stop '${stop.reason}'` };
      }
      if (e.fault) return { verdict: 'deny', effect: 'gp', reason: 'replay: recorded fault' };
      if (e.msr) return { verdict: 'emulate', value: e.msr.data };
      return { verdict: 'emulate', value: 0 }; // the tap completes reads with the recorded bytes
    },
  };
  m.addHook(hook);

  const result = (divergence: ReplayDivergence | undefined): ReplayResult => ({ machine: m, exits: n, runs: si, divergence, stops: log.stops });
  for (; si < log.stops.length;) {
    const want = log.stops[si] as LoggedStop;
    stoppedAsRecorded = false;
    const s = await m.run({ timeout });
    if (s.reason === 'backend-error' && s.error instanceof ReplayDivergence) return result(s.error);
    const untied = UNTIED.has(want.reason);
    const reason = stoppedAsRecorded ? want.reason : s.reason;
    const code = stoppedAsRecorded ? want.code : s.reason === 'debug-exit' ? s.code : s.reason === 'exception' ? s.vector : undefined;
    if (reason !== want.reason || code !== want.code || (!untied && n !== want.after)) {
      const detail = s.reason === 'violation' ? `: ${s.violation.message}` : s.reason === 'hook-error' ? ` (${s.hook})` : '';
      return result(new ReplayDivergence(n, s.rip, 'stop', `'${want.reason}'${want.code !== undefined ? ` (${want.code})` : ''} at exit ${want.after}`, `'${s.reason}'${code !== undefined ? ` (${code})` : ''}${detail} at exit ${n}`));
    }
    if (!untied) {
      const regs = m.vcpu(0).getRegs();
      for (const r of REG_NAMES) {
        if (regs[r] !== want.regs[r]) return result(new ReplayDivergence(n, regs.rip, `regs.${r}`, `0x${want.regs[r].toString(16)}`, `0x${regs[r].toString(16)}`));
      }
    }
    si++;
  }
  slot.tap = undefined;
  return result(undefined);
}
