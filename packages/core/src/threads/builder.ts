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
 * - Return the machine, or `{ machine, report, input, close }`: `report()` answers `handle.report()`,
 *   `input(value)` takes the per-run input of `run({ input })` (a pool's job: write it into guest RAM
 *   or a device, start a fresh monitor) just before that run, `close()` runs after the machine is
 *   closed (release what the builder made). In a pool, `release()` resets the machine afterwards,
 *   so what `input` put into guest RAM and device state is gone before the next lease.
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

/**
 * What a builder hands back when it has more than the machine to offer. `R`: what `report()`
 * returns; `P`: the per-run input `input()` takes.
 */
export interface BuiltMachine<R = unknown, P = unknown> {
  /** The machine the handle drives. */
  readonly machine: Machine;
  /** Answers `handle.report()`; its value is structured-cloned to the caller. */
  readonly report?: () => R | Promise<R>;
  /**
   * Prepares one run with the caller's `run({ input })` value (structured-cloned), inside the
   * worker, before the guest runs: a throw rejects that `run()` with the error, typed, and the
   * guest does not run. Without it, a run with an `input` rejects with `InvalidArgumentError`.
   */
  input?(value: P): void | Promise<void>;
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
 * `I`: its `init` (from the caller); `R`: what `report()` returns; `A`: its audit entries;
 * `P`: the per-run input its `input()` takes.
 */
export type MachineBuilder<I = unknown, R = unknown, A = unknown, P = unknown> = (init: I, ctx: WorkerContext<A>) => Promise<Machine | BuiltMachine<R, P>>;

/** Identity, for inference: `export default defineMachine(async (init: MyInit, ctx) => ...)`. */
export function defineMachine<I, R = unknown, A = unknown, P = unknown>(builder: MachineBuilder<I, R, A, P>): MachineBuilder<I, R, A, P> {
  return builder;
}

/** The `init` type of a builder: `BuilderInit<typeof import('./guest.js').default>`. */
export type BuilderInit<B> = B extends MachineBuilder<infer I, unknown, unknown> ? I : never;
/** The `report()` type of a builder. */
export type BuilderReport<B> = B extends (init: never, ctx: never) => Promise<Machine | BuiltMachine<infer R>> ? R : unknown;
/** The per-run input type of a builder (what `run({ input })` takes). */
export type BuilderInput<B> = B extends (init: never, ctx: never) => Promise<Machine | BuiltMachine<unknown, infer P>> ? P : unknown;
/** The audit entry type of a builder. */
export type BuilderAudit<B> = B extends (init: never, ctx: WorkerContext<infer A>) => Promise<unknown> ? A : unknown;
