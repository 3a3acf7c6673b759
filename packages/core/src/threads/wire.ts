/**
 * What crosses the thread boundary and how it comes back typed. Structured clone keeps bigints,
 * typed arrays and plain objects, but turns an `Error` into a bare `Error` (its class, `code` and
 * own fields are lost). So errors travel as {@link WireError}s and are re-created on the caller's
 * side: the object gets the prototype of the nearest class of its chain this side knows and the
 * worker's whole brand chain, so `instanceof` holds for every class it had in the worker —
 * including a `TsvmError` subclass of another package (`@tsvm/devices`, `@tsvm/monitor`) that
 * core cannot import — because `TsvmError[Symbol.hasInstance]` checks that brand.
 * @module
 */
import {
  TsvmError, KvmError, KvmUnavailableError, InvalidArgumentError, HookFailure, GuestMemoryError, StateError,
  SnapshotFormatError, ImageFormatError, MonitorViolation, WorkerExitedError,
} from '../errors.js';
import { DmaDeniedError } from '../dma.js';
import { ReplayDivergence } from '../replay/replay.js';
import type { Stop } from '../stop.js';

const BRAND = Symbol.for('tsvm.error');
/** How deep a `cause` chain is carried (deeper causes are cut: bounded work per message). */
const MAX_CAUSE_DEPTH = 8;

/** Classes re-created with their own prototype; any other `TsvmError` gets its nearest known ancestor's. */
const KNOWN: ReadonlyMap<string, { prototype: object }> = new Map<string, { prototype: object }>([
  ['TsvmError', TsvmError], ['KvmError', KvmError], ['KvmUnavailableError', KvmUnavailableError],
  ['InvalidArgumentError', InvalidArgumentError], ['HookFailure', HookFailure], ['GuestMemoryError', GuestMemoryError],
  ['StateError', StateError], ['SnapshotFormatError', SnapshotFormatError], ['ImageFormatError', ImageFormatError],
  ['MonitorViolation', MonitorViolation], ['WorkerExitedError', WorkerExitedError], ['DmaDeniedError', DmaDeniedError],
  ['ReplayDivergence', ReplayDivergence],
]);

/** An error as it crosses the boundary (structured-cloneable). */
export interface WireError {
  /** Marks the object as an encoded error. */
  readonly wire: 'error';
  /** The `TsvmError` brand chain, most derived first; empty for a plain `Error`. */
  readonly chain: readonly string[];
  /** `name` (e.g. `TypeError` for a plain error). */
  readonly name: string;
  /** `message`. */
  readonly message: string;
  /** The worker's stack, kept so the caller can see where it was thrown. */
  readonly stack: string | undefined;
  /** Own enumerable fields (`code`, `argument`, `errno`, ...) that structured clone can carry. */
  readonly fields: Readonly<Record<string, unknown>>;
  /** The encoded `cause`, if any. */
  readonly cause?: WireError | { readonly wire: 'value'; readonly value: unknown };
}

/** Encodes anything thrown so it can be posted. Non-errors become `{ wire: 'value' }` causes. */
export function encodeError(e: unknown, depth = 0): WireError {
  if (!(e instanceof Error)) return { wire: 'error', chain: [], name: 'Error', message: String(e), stack: undefined, fields: {} };
  const chain = (e as unknown as Record<symbol, unknown>)[BRAND];
  const fields: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(e)) {
    if (k === 'cause' || k === 'stack' || k === 'message') continue;
    const c = cloneable(v, depth);
    if (c.ok) fields[k] = c.value;
  }
  const out: { -readonly [K in keyof WireError]: WireError[K] } = {
    wire: 'error', chain: Array.isArray(chain) ? chain.map(String) : [], name: e.name, message: e.message, stack: e.stack, fields,
  };
  if (e.cause !== undefined && depth < MAX_CAUSE_DEPTH) {
    out.cause = e.cause instanceof Error ? encodeError(e.cause, depth + 1) : { wire: 'value', value: cloneable(e.cause, depth).ok ? e.cause : String(e.cause) };
  }
  return out;
}

/** A field value as it can be posted: errors are encoded, functions and symbols are dropped. */
function cloneable(v: unknown, depth: number): { ok: true; value: unknown } | { ok: false } {
  if (v instanceof Error) return depth < MAX_CAUSE_DEPTH ? { ok: true, value: encodeError(v, depth + 1) } : { ok: false };
  if (typeof v === 'function' || typeof v === 'symbol') return { ok: false };
  try {
    structuredClone(v);
    return { ok: true, value: v };
  } catch {
    return { ok: false };
  }
}

function isWireError(v: unknown): v is WireError {
  return typeof v === 'object' && v !== null && (v as { wire?: unknown }).wire === 'error';
}

/** Re-creates an encoded error on this side, typed as in the worker (see the module doc). */
export function decodeError(w: WireError): Error {
  const known = w.chain.find((n) => KNOWN.has(n));
  const proto = known === undefined ? globalThis[w.name as 'TypeError']?.prototype ?? Error.prototype : (KNOWN.get(known) as { prototype: object }).prototype;
  const e = Object.create(proto instanceof Error || proto === Error.prototype ? proto : Error.prototype) as Error;
  Object.defineProperty(e, 'message', { value: w.message, writable: true, configurable: true });
  Object.defineProperty(e, 'stack', { value: w.stack ?? `${w.name}: ${w.message}`, writable: true, configurable: true });
  for (const [k, v] of Object.entries(w.fields)) (e as unknown as Record<string, unknown>)[k] = isWireError(v) ? decodeError(v) : v;
  if (w.name !== proto.constructor.name) (e as { name: string }).name = w.name;
  if (w.chain.length > 0) Object.defineProperty(e, BRAND, { value: Object.freeze([...w.chain]) });
  if (w.cause !== undefined) {
    Object.defineProperty(e, 'cause', { value: w.cause.wire === 'error' ? decodeError(w.cause) : w.cause.value, writable: true, configurable: true });
  }
  return e;
}

/** A {@link Stop} as posted: its error fields encoded. */
export type WireStop = Readonly<Record<string, unknown>> & { readonly reason: Stop['reason'] };

/** Encodes a stop (`violation`, `error` fields are errors; `exit` and the rest clone as they are). */
export function encodeStop(stop: Stop): WireStop {
  const out: Record<string, unknown> = { ...stop };
  if (stop.reason === 'violation') out.violation = encodeError(stop.violation);
  if (stop.reason === 'hook-error' || stop.reason === 'device-error' || stop.reason === 'backend-error') {
    out.error = stop.error instanceof Error ? encodeError(stop.error) : cloneable(stop.error, 0).ok ? stop.error : String(stop.error);
  }
  return out as WireStop;
}

/** The inverse of {@link encodeStop}. */
export function decodeStop(w: WireStop): Stop {
  const out: Record<string, unknown> = { ...w };
  for (const k of ['violation', 'error']) {
    const v = out[k];
    if (isWireError(v)) out[k] = decodeError(v);
  }
  return out as unknown as Stop;
}
