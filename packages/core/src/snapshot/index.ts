/**
 * Disposable machines: snapshot, restore, copy-on-write fork and dirty-page reset.
 * `Machine.snapshot()` / `Machine.restore()` / `Machine.fork()` / `machine.reset()` delegate here.
 * @module
 */
export { Snapshot, takeSnapshot, cpuSignature } from './snapshot.js';
export { restoreMachine, resetMachine, type RestoreOptions, type ResetResult, type ResetOptions } from './restore.js';
export {
  parseManifest, encodeManifest, SNAPSHOT_FORMAT, SNAPSHOT_VERSION, TSVM_VERSION, PAGE_SIZE,
  type SnapshotManifest, type SnapshotRegion, type SnapshotVcpu, type SnapshotHost,
} from './manifest.js';
export type { MachineInternals } from './internals.js';
