/**
 * The private state one `Machine` shares with the modules it delegates to (`memory-map`,
 * `cpu-entry`, `attachments`, `hooks`, `run-loop`, `teardown`). Not public API: `Machine` keeps
 * it in a private field and never hands it out (snapshots get `MachineInternals`, a narrower view).
 * @module
 */
import type { CpuModel } from '../cpu/models.js';
import { show } from '../check.js';
import type { Backend, BackendRunners, BackendVcpu, BackendVm, HostCapabilities } from '../backend.js';
import { Bus } from '../bus.js';
import type { CpuMode } from '../cpu/x86.js';
import { instructionRipOf } from '../cpu/exit-rip.js';
import type { Device } from '../device.js';
import { InvalidArgumentError, StateError } from '../errors.js';
import type { VcpuExit } from '../exits.js';
import type { ExitHook, HookInfo, HookStats } from '../hooks.js';
import { GuestMemory, type HostMemory } from '../memory.js';
import { ExitCounters } from '../stats.js';
import type { Vcpu } from '../vcpu.js';

/** @internal A range routed to the coalesced ring. */
export interface CoalescedRange {
  readonly start: bigint;
  readonly size: number;
  readonly pio: boolean;
}

/** @internal A function run at every slice boundary, named for `hook-error` stops. */
export interface SliceHook {
  readonly name: string;
  readonly fn: () => void;
}

/** Most vCPUs a machine may have (`MachineOptions.vcpus`). */
export const MAX_VCPUS = 64;

/**
 * @internal Everything a machine owns. A class (not a literal) so every machine's state has one
 * shape: the run loop reads `seq`, `exit` and `coalesced` once per exit.
 */
export class MachineState {
  readonly memory = new GuestMemory();
  readonly io = new Bus('pio');
  readonly mmio = new Bus('mmio');
  readonly vcpus: Vcpu[] = [];
  readonly counters = new ExitCounters();
  readonly hooks: ExitHook[] = [];
  /** Bumped by every change to {@link hooks}: a loop holding an `ExitContext` knows it is stale. */
  hooksVersion = 0;
  readonly hookStats = new Map<ExitHook, HookStats>();
  readonly sliceHooks: SliceHook[] = [];
  /** Memslots in use. */
  readonly slots = new Set<number>();
  /** Memslots that log dirty pages. */
  readonly logDirty = new Set<number>();
  /** Devices attached with `attach` / `attachDevice` (closed with the machine). */
  readonly devices = new Set<Device>();
  coalesced: CoalescedRange[] = [];
  hooksSealed = false;
  running = false;
  closed = false;
  /** Exits since creation: `HookInfo.seq`. */
  seq = 0;
  /** The exit being handled (undefined between exits): what `instructionRip()` explains. */
  exit: VcpuExit | undefined = undefined;
  explainer: ((exit: VcpuExit, info: HookInfo) => string | undefined) | undefined = undefined;
  /** Base of the host's system area (protected/long mode), undefined in real mode. */
  systemArea: number | undefined = undefined;
  mode: CpuMode = 'real';
  /**
   * Debug exceptions (#DB, vector 1) the exception stubs reported: the CPU writes DR6 when it
   * delivers one, even from CPL3 code (a single step it set with `popf`).
   */
  debugTraps = 0;
  /**
   * Offered the machine's VM when it closes, with the guest RAM it had (a restored machine's:
   * its snapshot may keep the VM for its next fork, see `restore.ts`). `true`: taken.
   */
  recycle: ((vcpus: readonly BackendVcpu[], hosts: readonly HostMemory[]) => boolean) | undefined = undefined;
  /** The vCPUs' runner threads (`vcpuThreads: 'parallel'`); undefined: they take turns on the calling thread. */
  runners: BackendRunners | undefined = undefined;
  /** The CPU model applied at create, as a snapshot records it (effective features, enforced); undefined: the host's CPUID. */
  cpuModel: CpuModel | undefined = undefined;
  /** Features the model hides that ring-0 code still sees on this host. */
  uncontrolledFeatures: readonly string[] = [];
  readonly capabilities: HostCapabilities;

  constructor(
    public name: string,
    readonly backend: Backend,
    readonly vm: BackendVm,
    readonly irqchip: boolean,
  ) {
    this.capabilities = backend.capabilities;
  }

  /** @throws StateError once the machine is closed. */
  assertOpen(): void {
    if (this.closed) throw new StateError(`machine '${this.name}' is closed`);
  }

  /** vCPU `id`, or an error naming it. */
  vcpu(id: number): Vcpu {
    const v = Number.isInteger(id) ? this.vcpus[id] : undefined;
    if (!v) throw new InvalidArgumentError('id', `no vCPU ${show(id)}`);
    return v;
  }

  /** The instruction that caused the exit being handled (see `HookInfo.instructionRip`). */
  instructionRip(vcpu: Vcpu): bigint {
    return instructionRipOf(this.exit, vcpu.backend, this.memory, this.capabilities.ioExitRip);
  }
}
