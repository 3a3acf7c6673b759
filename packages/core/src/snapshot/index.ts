/**
 * Disposable machines: snapshot, restore, copy-on-write fork and dirty-page reset.
 * `Machine.snapshot()` / `Machine.restore()` / `Machine.fork()` / `machine.reset()` delegate here.
 * @module
 */
export { Snapshot, takeSnapshot, cpuSignature, prebuilding, type PrewarmOptions } from './snapshot.js';
export { measureDirtyTracking, cheaperDirtyTracking, dirtyTrackingPrices, DIRTY_RING_BYTES, type DirtyTracking, type DirtyTrackingPrices } from './dirty-tracking.js';
export { restoreMachine, resetMachine, schedulePrebuild, type MachineMaker, type RestoreOptions, type ResetResult, type ResetOptions } from './restore.js';
export {
  parseManifest, encodeManifest, SNAPSHOT_FORMAT, SNAPSHOT_VERSION, TSVM_VERSION, PAGE_SIZE,
  type SnapshotManifest, type SnapshotRegion, type SnapshotVcpu, type SnapshotHost,
} from './manifest.js';
export type { MachineInternals } from './internals.js';
