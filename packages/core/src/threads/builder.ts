/**
 * The contract of a machine module: the file a worker imports to build its machine.
 *
 * The module's default export (or the export named by the `export` option) is a
 * {@link MachineBuilder}: `(init, ctx) => Promise<Machine | BuiltMachine>`. It runs inside the
 * worker, so everything it creates — devices, monitor, policy, hooks — lives there and never
 * crosses threads; only `init` (structured-cloned from the caller) comes in, and only stops,
 * reports, console bytes and audit entries go out.
 *
 * - `init` is the caller's `init` option, cloned.
 * - `ctx.snapshot()` is what to fork from when the worker was started from a snapshot (a file, or
 *   the pool's in-worker template); `undefined` means build from scratch. A builder that a pool
 *   uses must handle both: from scratch for the template, `Machine.fork(snap, { devices })` after.
 * - `ctx.console(bytes)` streams guest output to the handle's `console` event (batched, bounded);
 *   `ctx.consoleDevice()` is a ready `Device` for a byte-wide output port.
 * - `ctx.audit(entry)` streams one audit entry (any structured-cloneable value) to `audit`
 *   (batched and bounded like the console).
 * - Return the machine, or `{ machine, report, close }`: `report()` answers `handle.report()`,
 *   `close()` runs after the machine is closed (release what the builder made).
 *
 * ```ts
 * // guest.ts
 * import { Machine } from '@tsvm/core';
 * import { defineMachine } from '@tsvm/core/threads';
 * export default defineMachine(async (init: { code: Uint8Array }, ctx) => {
 *   const devices = [{ range: { port: 0x3f8, size: 1 }, device: ctx.consoleDevice() }];
 *   const snap = ctx.snapshot();
 *   if (snap) return Machine.fork(snap, { devices });
 *   const vm = await Machine.create({ memory: 2 << 20 });
 *   vm.attachDevice(devices);
 *   vm.loadFlat(init.code, { at: 0x1000, mode: 'long', ring: 3 });
 *   return { machine: vm, report: () => ({ exits: vm.stats().total }) };
 * });
 * ```
 * @module
 */
import type { Backend } from '../backend.js';
import type { Device } from '../device.js';
import type { Machine } from '../machine.js';
import type { Snapshot } from '../snapshot/snapshot.js';

/** What a builder hands back when it has more than the machine to offer. */
export interface BuiltMachine<R = unknown> {
  /** The machine the handle drives. */
  readonly machine: Machine;
  /** Answers `handle.report()`; its value is structured-cloned to the caller. */
  readonly report?: () => R | Promise<R>;
  /** Runs after the machine is closed, when the worker shuts down. */
  readonly close?: () => void | Promise<void>;
}

/** What a builder may use inside the worker. */
export interface WorkerContext<A = unknown> {
  /**
   * The snapshot to fork from, or `undefined` to build from scratch. A snapshot file is loaded on
   * the first call, on `backend` (default: the process-wide KVM backend), and kept for the worker's life.
   */
  snapshot(backend?: Backend): Snapshot | undefined;
  /** Streams guest output to the caller's `console` event (batched; bounded, excess dropped and counted). */
  console(data: Uint8Array | string): void;
  /** A `Device` that streams every byte written to it (any offset, size 1) to `console`. */
  consoleDevice(name?: string): Device;
  /** Streams one audit entry to the caller's `audit` event. It must be structured-cloneable. */
  audit(entry: A): void;
  /** `threadId` of this worker. */
  readonly threadId: number;
}

/**
 * The function a machine module exports: builds the machine inside the worker.
 * `I`: its `init` (from the caller); `R`: what `report()` returns; `A`: its audit entries.
 */
export type MachineBuilder<I = unknown, R = unknown, A = unknown> = (init: I, ctx: WorkerContext<A>) => Promise<Machine | BuiltMachine<R>>;

/** Identity, for inference: `export default defineMachine(async (init: MyInit, ctx) => ...)`. */
export function defineMachine<I, R = unknown, A = unknown>(builder: MachineBuilder<I, R, A>): MachineBuilder<I, R, A> {
  return builder;
}

/** The `init` type of a builder: `BuilderInit<typeof import('./guest.js').default>`. */
export type BuilderInit<B> = B extends MachineBuilder<infer I, unknown, unknown> ? I : never;
/** The `report()` type of a builder. */
export type BuilderReport<B> = B extends (init: never, ctx: never) => Promise<Machine | BuiltMachine<infer R>> ? R : unknown;
/** The audit entry type of a builder. */
export type BuilderAudit<B> = B extends (init: never, ctx: WorkerContext<infer A>) => Promise<unknown> ? A : unknown;
