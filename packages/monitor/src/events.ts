/**
 * What a hook asks to see, by *event* rather than by mechanism, and what it is handed when the
 * event happens. Specs are validated and normalised once at registration; matching an exit is
 * then a few comparisons.
 * @module
 */
import { InvalidArgumentError, type VcpuExit } from '@tsvm/core';

/** Inclusive `[first, last]` range of ports or guest-physical addresses. */
export type Span<T extends number | bigint = number | bigint> = readonly [T, T];

/** Port I/O on `ports` (inclusive). */
export interface PioSpec { readonly event: 'pio'; readonly ports: Span<number>; readonly direction?: 'in' | 'out' | 'both' }
/** MMIO (accesses with no RAM behind them) in `range` (inclusive guest-physical addresses). */
export interface MmioSpec { readonly event: 'mmio'; readonly range: Span; readonly direction?: 'read' | 'write' | 'both' }
/** `rdmsr` / `wrmsr` of the listed MSR indices. */
export interface MsrSpec { readonly event: 'msr'; readonly indices: readonly number[]; readonly direction?: 'read' | 'write' | 'both' }
/** CPUID leaves. CPUID never exits on KVM: only a set-up-time table exists (see `Monitor.emulateCpuid`). */
export interface CpuidSpec { readonly event: 'cpuid'; readonly leaves: readonly number[] }
/** A hypercall: a guest write to the hypercall port (default {@link HYPERCALL_PORT}); `vmcall` hangs on PVM. */
export interface HypercallSpec { readonly event: 'hypercall'; readonly port?: number }
/**
 * The instruction at guest-physical `address` is about to execute. `virtualAddress` is where
 * the guest sees it (default: identity mapping); `cpl` is the privilege level it runs at
 * (default: the vCPU's CPL at registration), which decides the mechanism.
 */
export interface ExecSpec { readonly event: 'exec'; readonly address: number | bigint; readonly virtualAddress?: number | bigint; readonly cpl?: 0 | 3 }
/** Every instruction (single-step), at privilege level `cpl` (default: the vCPU's current CPL). */
export interface StepSpec { readonly event: 'step'; readonly cpl?: 0 | 3 }
/** Guest writes to the guest-physical `range` (inclusive). Watched at 4 KiB page granularity. */
export interface WriteWatchSpec { readonly event: 'write-watch'; readonly range: Span }
/** The guest halted. */
export interface HaltSpec { readonly event: 'halt' }
/** The CPU shut down (triple fault). */
export interface ShutdownSpec { readonly event: 'shutdown' }
/** Every exit the run loop hands to hooks (the slice timer's `intr` exits are not hooks' business). */
export interface AnyExitSpec { readonly event: 'any-exit' }

/** Everything a hook can ask for. */
export type EventSpec =
  | PioSpec | MmioSpec | MsrSpec | CpuidSpec | HypercallSpec | ExecSpec | StepSpec | WriteWatchSpec
  | HaltSpec | ShutdownSpec | AnyExitSpec;

/** The event names. */
export type EventName = EventSpec['event'];

/** All event names, for validation and tables. */
export const EVENT_NAMES: readonly EventName[] = ['pio', 'mmio', 'msr', 'cpuid', 'hypercall', 'exec', 'step', 'write-watch', 'halt', 'shutdown', 'any-exit'];

import { HYPERCALL_PORT } from '@tsvm/core';
/** Default hypercall port: a guest `out` here is a hypercall (reserved in core's port table). */
export { HYPERCALL_PORT };

/** What a hook receives: the event in its own terms (not the exit that carried it). */
export type MonitorEvent =
  /**
   * Port I/O. `count` is the number of elements the exit carries: a `rep insb`/`outsb` batches up
   * to 1024 per exit, and a decision applies to all of them (an emulated value is returned for each
   * element; a deny drops or fails them all). `value` is the first element written (`out`); `values`
   * has every element.
   */
  | { readonly event: 'pio'; readonly port: number; readonly direction: 'in' | 'out'; readonly size: 1 | 2 | 4; readonly value: number | undefined; readonly count: number; readonly values: readonly number[] }
  | { readonly event: 'mmio'; readonly address: bigint; readonly direction: 'read' | 'write'; readonly size: number; readonly value: bigint | undefined }
  | { readonly event: 'msr'; readonly index: number; readonly direction: 'read' | 'write'; readonly value: bigint | undefined }
  | { readonly event: 'hypercall'; readonly port: number; readonly nr: number }
  /**
   * `code`: the hooked instruction's bytes as the guest's program has them (up to 15; the
   * monitor's own traps, which stay in guest RAM while a probe is armed, replaced by the bytes
   * they cover). Decode it rather than guest RAM at `address`.
   */
  | { readonly event: 'exec'; readonly address: bigint; readonly rip: bigint; readonly code: Uint8Array }
  | { readonly event: 'step'; readonly rip: bigint }
  /**
   * `value` is undefined when the write was sampled from the dirty log (observe): then `size` is a
   * page; and for a DMA write longer than 8 bytes. `source: 'dma'` marks a write a device made on
   * the guest's behalf (`device` names it); guest stores have no `source`.
   */
  | { readonly event: 'write-watch'; readonly address: bigint; readonly size: number; readonly value: bigint | undefined; readonly source?: 'dma'; readonly device?: string }
  | { readonly event: 'halt' }
  | { readonly event: 'shutdown' }
  | { readonly event: 'any-exit'; readonly exit: VcpuExit };

/** A spec after validation: ranges as bigints, directions filled in. */
export type NormalSpec =
  | { readonly event: 'pio'; readonly lo: bigint; readonly hi: bigint; readonly dir: 'in' | 'out' | 'both' }
  | { readonly event: 'mmio'; readonly lo: bigint; readonly hi: bigint; readonly dir: 'read' | 'write' | 'both' }
  | { readonly event: 'msr'; readonly indices: ReadonlySet<number>; readonly dir: 'read' | 'write' | 'both' }
  | { readonly event: 'cpuid'; readonly leaves: readonly number[] }
  | { readonly event: 'hypercall'; readonly port: number }
  | { readonly event: 'exec'; readonly address: bigint; readonly virtualAddress: bigint; readonly cpl: 0 | 3 | undefined }
  | { readonly event: 'step'; readonly cpl: 0 | 3 | undefined }
  | { readonly event: 'write-watch'; readonly lo: bigint; readonly hi: bigint }
  | { readonly event: 'halt' } | { readonly event: 'shutdown' } | { readonly event: 'any-exit' };

function int(v: unknown, path: string, max: bigint): bigint {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) v = BigInt(v);
  if (typeof v !== 'bigint' || v < 0n || v > max) throw new InvalidArgumentError(path, `must be an integer in [0, 0x${max.toString(16)}], got ${String(v)}`);
  return v;
}

function span(v: unknown, path: string, max: bigint): [bigint, bigint] {
  if (!Array.isArray(v) || v.length !== 2) throw new InvalidArgumentError(path, 'must be an inclusive [first, last] pair');
  const lo = int(v[0], `${path}[0]`, max), hi = int(v[1], `${path}[1]`, max);
  if (hi < lo) throw new InvalidArgumentError(path, `last (0x${hi.toString(16)}) is below first (0x${lo.toString(16)})`);
  return [lo, hi];
}

function oneOf<T extends string>(v: unknown, allowed: readonly T[], fallback: T, path: string): T {
  if (v === undefined) return fallback;
  if (!allowed.includes(v as T)) throw new InvalidArgumentError(path, `must be one of ${allowed.join(', ')}, got ${String(v)}`);
  return v as T;
}

function cpl(v: unknown, path: string): 0 | 3 | undefined {
  if (v === undefined || v === 0 || v === 3) return v;
  throw new InvalidArgumentError(path, `must be 0 or 3, got ${String(v)}`);
}

const PHYS = (1n << 52n) - 1n;

/** Validates a spec (as given by code or compiled from policy) and normalises it. */
export function normaliseSpec(spec: EventSpec, path = 'spec'): NormalSpec {
  if (!spec || typeof spec !== 'object') throw new InvalidArgumentError(path, 'must be an object with an `event` field');
  const s = spec as unknown as Record<string, unknown>;
  switch (spec.event) {
    case 'pio': {
      const [lo, hi] = span(s['ports'], `${path}.ports`, 0xffffn);
      return { event: 'pio', lo, hi, dir: oneOf(s['direction'], ['in', 'out', 'both'] as const, 'both', `${path}.direction`) };
    }
    case 'mmio': {
      const [lo, hi] = span(s['range'], `${path}.range`, PHYS);
      return { event: 'mmio', lo, hi, dir: oneOf(s['direction'], ['read', 'write', 'both'] as const, 'both', `${path}.direction`) };
    }
    case 'msr': {
      const list = s['indices'];
      if (!Array.isArray(list) || list.length === 0) throw new InvalidArgumentError(`${path}.indices`, 'must be a non-empty array of MSR indices');
      const indices = new Set(list.map((x, i) => Number(int(x, `${path}.indices[${i}]`, 0xffffffffn))));
      return { event: 'msr', indices, dir: oneOf(s['direction'], ['read', 'write', 'both'] as const, 'both', `${path}.direction`) };
    }
    case 'cpuid': {
      const list = s['leaves'];
      if (!Array.isArray(list)) throw new InvalidArgumentError(`${path}.leaves`, 'must be an array of CPUID leaves');
      return { event: 'cpuid', leaves: list.map((x, i) => Number(int(x, `${path}.leaves[${i}]`, 0xffffffffn))) };
    }
    case 'hypercall':
      return { event: 'hypercall', port: s['port'] === undefined ? HYPERCALL_PORT : Number(int(s['port'], `${path}.port`, 0xffffn)) };
    case 'exec': {
      const address = int(s['address'], `${path}.address`, PHYS);
      const va = s['virtualAddress'] === undefined ? address : int(s['virtualAddress'], `${path}.virtualAddress`, (1n << 64n) - 1n);
      return { event: 'exec', address, virtualAddress: va, cpl: cpl(s['cpl'], `${path}.cpl`) };
    }
    case 'step': return { event: 'step', cpl: cpl(s['cpl'], `${path}.cpl`) };
    case 'write-watch': {
      const [lo, hi] = span(s['range'], `${path}.range`, PHYS);
      return { event: 'write-watch', lo, hi };
    }
    case 'halt': case 'shutdown': case 'any-exit': return { event: spec.event };
    default:
      throw new InvalidArgumentError(`${path}.event`, `must be one of ${EVENT_NAMES.join(', ')}, got ${String(s['event'])}`);
  }
}

/** Whether two normalised specs can see the same event (used for conflict and coalescing checks). */
export function specsOverlap(a: NormalSpec, b: NormalSpec): boolean {
  const dirs = (x: string, y: string): boolean => x === 'both' || y === 'both' || x === y;
  if (a.event === 'any-exit' || b.event === 'any-exit') return true;
  if (a.event === 'pio' && b.event === 'pio') return a.lo <= b.hi && b.lo <= a.hi && dirs(a.dir, b.dir);
  if (a.event === 'mmio' && b.event === 'mmio') return a.lo <= b.hi && b.lo <= a.hi && dirs(a.dir, b.dir);
  if (a.event === 'write-watch' && b.event === 'write-watch') return a.lo <= b.hi && b.lo <= a.hi;
  if (a.event === 'msr' && b.event === 'msr') return dirs(a.dir, b.dir) && [...a.indices].some((i) => b.indices.has(i));
  if (a.event === 'hypercall' && b.event === 'hypercall') return a.port === b.port;
  if (a.event === 'hypercall' && b.event === 'pio') return BigInt(a.port) >= b.lo && BigInt(a.port) <= b.hi && b.dir !== 'in';
  if (a.event === 'pio' && b.event === 'hypercall') return specsOverlap(b, a);
  if (a.event === 'exec' && b.event === 'exec') return a.address === b.address;
  return a.event === b.event && (a.event === 'halt' || a.event === 'shutdown' || a.event === 'step');
}

/**
 * Translates an exit into the event a hook with `spec` sees. Only the dispatcher calls it, on
 * records its table matched to the exit (`Table.match` in `dispatch.ts`: exit kind, port or
 * address range, direction, MSR index), so those checks are not made again here (a port
 * range's bounds are bigints: comparing the exit's number with them is a slow mixed compare,
 * twice per exit); only the exit kind is checked, which narrows its type. Undefined for a spec
 * of another kind, and for exec, step and write-watch, which their mechanisms deliver.
 */
export function eventOf(spec: NormalSpec, exit: VcpuExit): MonitorEvent | undefined {
  switch (spec.event) {
    case 'pio': {
      if (exit.kind !== 'io') return undefined;
      const values: number[] = exit.direction === 'in' ? [] : exit.count === 1 ? [leAt(exit.data, 0, exit.size)] : outValues(exit.data, exit.size, exit.count);
      return { event: 'pio', port: exit.port, direction: exit.direction, size: exit.size, value: values[0], count: exit.count, values };
    }
    case 'mmio': {
      if (exit.kind !== 'mmio') return undefined;
      return { event: 'mmio', address: exit.address, direction: exit.isWrite ? 'write' : 'read', size: exit.size, value: exit.isWrite ? le64(exit.data) : undefined };
    }
    case 'msr': {
      if (exit.kind !== 'msr') return undefined;
      return { event: 'msr', index: exit.index, direction: exit.direction, value: exit.direction === 'write' ? exit.data : undefined };
    }
    case 'hypercall':
      if (exit.kind !== 'io') return undefined;
      return { event: 'hypercall', port: exit.port, nr: le(exit.data, exit.size) };
    case 'halt': return exit.kind === 'hlt' ? { event: 'halt' } : undefined;
    case 'shutdown': return exit.kind === 'shutdown' ? { event: 'shutdown' } : undefined;
    case 'any-exit': return exit.kind === 'intr' ? undefined : { event: 'any-exit', exit };
    // exec, step and write-watch are delivered by their mechanisms, not by plain exit matching.
    case 'exec': case 'step': case 'write-watch': case 'cpuid': return undefined;
  }
}

/** The values of a string `out` (`outs` with a rep count): one per element. */
function outValues(data: Uint8Array, size: number, count: number): number[] {
  const values: number[] = [];
  for (let i = 0; i < count; i++) values.push(leAt(data, i * size, size));
  return values;
}

function le(data: Uint8Array, size: number): number {
  return leAt(data, 0, size);
}

function leAt(data: Uint8Array, at: number, size: number): number {
  let v = 0;
  for (let i = Math.min(size, data.length - at) - 1; i >= 0; i--) v = v * 256 + (data[at + i] ?? 0);
  return v;
}

function le64(data: Uint8Array): bigint {
  let v = 0n;
  for (let i = Math.min(8, data.length) - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[i] ?? 0);
  return v;
}

/** A short description of a spec for plans, errors and audit lines, e.g. `pio out [0x3f8, 0x3ff]`. */
export function describeSpec(s: NormalSpec): string {
  const h = (v: bigint | number): string => `0x${v.toString(16)}`;
  switch (s.event) {
    case 'pio': return `pio ${s.dir} [${h(s.lo)}, ${h(s.hi)}]`;
    case 'mmio': return `mmio ${s.dir} [${h(s.lo)}, ${h(s.hi)}]`;
    case 'msr': return `msr ${s.dir} {${[...s.indices].map(h).join(', ')}}`;
    case 'cpuid': return `cpuid {${s.leaves.map(h).join(', ')}}`;
    case 'hypercall': return `hypercall port ${h(s.port)}`;
    case 'exec': return `exec ${h(s.address)}${s.virtualAddress !== s.address ? ` (va ${h(s.virtualAddress)})` : ''}`;
    case 'step': return 'step';
    case 'write-watch': return `write-watch [${h(s.lo)}, ${h(s.hi)}]`;
    default: return s.event;
  }
}
