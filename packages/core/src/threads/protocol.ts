/**
 * The messages between a {@link MachineWorker} and its worker (structured clone both ways).
 * Requests carry an `id` answered by exactly one `result`; `abort` has no answer (the pending
 * `run` answers, with an `aborted` stop). Streams (`console`, `audit`) are one-way.
 * @module
 */
import type { ExitStats } from '../stats.js';
import type { ResetResult } from '../snapshot/restore.js';
import type { WireError, WireStop } from './wire.js';

/** `workerData` of a machine worker. */
export interface WorkerBoot {
  /** URL (`file:`) of the machine module. */
  readonly module: string;
  /** Name of the builder export. */
  readonly export: string;
  /** The builder's `init`. */
  readonly init: unknown;
  /** A snapshot file to fork from (`ctx.snapshot()`). */
  readonly snapshotFile: string | undefined;
  /** Build once from scratch, snapshot that in memory, and build again forked from it. */
  readonly template: boolean;
  /** Console batching: flush after this many milliseconds, or at `consoleChunk` bytes. */
  readonly consoleFlushMs: number;
  /** Audit entries buffered in the worker beyond which entries are dropped (and counted). */
  readonly auditLimit: number;
  /** Largest console message, in bytes. */
  readonly consoleChunk: number;
  /** Console bytes buffered in the worker beyond which output is dropped (and counted). */
  readonly consoleLimit: number;
  /** Nice value for the worker's thread (0: leave it). */
  readonly nice: number;
  /** Schedule the worker's thread SCHED_IDLE. */
  readonly idle: boolean;
  /** URL of tsx's ESM API to register before importing TypeScript, if needed. */
  readonly tsx: string | undefined;
  /** URL of the worker's own entry (imported by the bootstrap). */
  readonly entry: string;
  /**
   * A worker thread's ledger of what it holds of the kernel's (kvm-backend's `attachLedger`):
   * the parent closes and unmaps what is left once the thread has exited, however it ended.
   * None for a child process (its end releases everything).
   */
  readonly ledger?: SharedArrayBuffer;
}

/** Options of a remote `run`. */
export interface RemoteRunOptions {
  /** As `Machine.run`'s `timeout`. */
  readonly timeout?: number;
  /** As `Machine.run`'s `sliceMs`. */
  readonly sliceMs?: number;
  /** Whether `input` was given (an `undefined` input is still an input). */
  readonly withInput?: boolean;
  /** The per-run input, for the builder's `input()`. */
  readonly input?: unknown;
}

/** What `handle.snapshot(path)` returns: the snapshot stays in the file, not in memory. */
export interface SnapshotFileInfo {
  /** Where it was written. */
  readonly path: string;
  /** Bytes of the file (holes included). */
  readonly fileBytes: number;
  /** Bytes of guest RAM it describes. */
  readonly memorySize: number;
  /** Bytes of non-zero pages it stores. */
  readonly storedBytes: number;
}

/** Every request and its answer's type. */
export interface Ops {
  /** `Machine.run`. */
  run: { args: RemoteRunOptions; value: WireStop };
  /** `Machine.snapshot(path)`, then the in-memory snapshot is closed. */
  snapshot: { args: { path: string }; value: SnapshotFileInfo };
  /** `Machine.reset()`. */
  reset: { args: { full?: boolean }; value: ResetResult };
  /** The builder's `report()`. */
  report: { args: Record<string, never>; value: unknown };
  /** `Machine.stats()`. */
  stats: { args: Record<string, never>; value: ExitStats };
  /** Closes the machine and what the builder made; the worker then ends. */
  close: { args: Record<string, never>; value: null };
}

/** Caller → worker. */
export type ToWorker =
  | { readonly t: 'call'; readonly id: number; readonly op: keyof Ops; readonly args: unknown }
  | { readonly t: 'abort' };

/** Worker → caller. */
export type FromWorker =
  | { readonly t: 'ready' }
  | { readonly t: 'failed'; readonly error: WireError }
  | { readonly t: 'result'; readonly id: number; readonly ok: true; readonly value: unknown }
  | { readonly t: 'result'; readonly id: number; readonly ok: false; readonly error: WireError }
  | { readonly t: 'console'; readonly data: Uint8Array; readonly dropped: number }
  | { readonly t: 'audit'; readonly entries: readonly unknown[]; readonly dropped: number };
