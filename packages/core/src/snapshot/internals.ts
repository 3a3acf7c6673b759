/**
 * What the snapshot code needs of a machine's private state. `Machine` hands an object of
 * this shape to the snapshot functions it delegates to; it is not part of the public API.
 * @module
 */
import type { BackendVcpu, BackendVm } from '../backend.js';
import type { CpuMode } from '../cpu/x86.js';
import type { Device } from '../device.js';
import type { HostMemory } from '../memory.js';

/** @internal A machine's private state, as `Machine` lends it to `snapshot/`. */
export interface MachineInternals {
  /** The backend VM (state blobs, dirty logs, memory). */
  readonly vm: BackendVm;
  /** Whether `run()` is in progress. */
  readonly running: boolean;
  /** Devices attached with `attach` / `attachDevice`. */
  devices(): readonly Device[];
  /** The CPU mode and system area the host set up. */
  cpu(): { mode: CpuMode; systemArea: number | undefined };
  /** Adopts a restored CPU set-up (and its exception reporter). */
  setCpu(mode: CpuMode, systemArea: number | undefined): void;
  /** Debug exceptions (#DB) reported by the exception stubs since the machine was made. */
  debugTraps(): number;
  /** Whether memslot `slot` logs dirty pages. */
  logsDirty(slot: number): boolean;
  /** Gives the machine its name (a machine built ahead gets its fork's name when it is taken). */
  rename(name: string): void;
  /** Sets what the machine's VM is offered to when it closes (see `MachineState.recycle`). */
  setRecycler(recycle: (vcpus: readonly BackendVcpu[], hosts: readonly HostMemory[]) => boolean): void;
}
