/**
 * `@tsvm/core/threads` — machines in worker threads.
 *
 * - {@link MachineWorker}: one machine in its own worker, built there by a machine module you
 *   name (see {@link MachineBuilder} and {@link defineMachine} for the contract). The handle runs,
 *   stops, snapshots (to a file), resets and reports; console bytes and audit entries stream back
 *   as events. A guest that spins or storms exits runs on the worker's event loop, never the
 *   caller's; a worker that dies rejects its handle's calls with a `WorkerExitedError`.
 * - {@link MachinePool}: N machines in N workers forked from one snapshot, `acquire()` /
 *   `release()` (which resets), a per-run input (`run({ input })`, taken by the builder's `input()`), a bounded wait queue with a timeout ({@link PoolQueueFullError},
 *   {@link PoolTimeoutError}), {@link PoolMetrics}, and dead workers replaced.
 * - Stops and errors cross the boundary typed ({@link encodeError} / {@link decodeError}).
 *
 * Isolation is that of `worker_threads` by default: a worker's exit, uncaught throw or heap
 * exhaustion (`resourceLimits`) ends that worker only — almost always: V8 can abort the whole
 * process when a worker hits its heap limit during its own clean-up (seen under load, "Ineffective
 * mark-compacts" in the worker's teardown). A native fault (SIGSEGV in koffi or the kernel
 * interface) ends the whole process too. `isolation: 'process'` (on a worker or a pool) puts each
 * machine in a child process instead, which contains those: the handle rejects with a
 * `WorkerExitedError` (`how: 'signal'`, `signal: 'SIGSEGV'`) and a pool replaces the machine.
 * @module
 */
export { MachineWorker, type MachineWorkerOptions, type MachineWorkerEvents, type WorkerRunOptions } from './machine-worker.js';
export { MachinePool, PooledMachine, type MachinePoolOptions, type AcquireOptions, type PoolMetrics } from './pool.js';
export { defineMachine, type MachineBuilder, type BuiltMachine, type WorkerContext, type BuilderInit, type BuilderReport, type BuilderAudit, type BuilderInput } from './builder.js';
export type { SnapshotFileInfo } from './protocol.js';
export type { SpawnOptions } from './spawn.js';
export { PoolTimeoutError, PoolQueueFullError } from './errors.js';
export { encodeError, decodeError, encodeStop, decodeStop, type WireError, type WireStop } from './wire.js';
export { WorkerExitedError } from '../errors.js';
