/**
 * The replay log: everything a recorded guest received from the host, keyed by *exit number*
 * (the count of guest exits so far; the monitor's own probe, debug and write-watch exits and
 * slice-timer `intr`s are not counted, see `countsAsGuestExit`). In memory it is plain objects;
 * on disk it is versioned JSON whose every field is checked on load, so a hostile log is a
 * {@link SnapshotFormatError} naming the field, never a crash half-way through a replay.
 * @module
 */
import { createHash } from 'node:crypto';
import { SnapshotFormatError } from '../errors.js';
import type { Regs } from '../backend.js';
import type { ExitKind } from '../exits.js';
import { EXIT_KINDS } from '../exits.js';
import { encodeManifest, PAGE_SIZE, TSVM_VERSION, ZERO_PAGE } from '../snapshot/manifest.js';
import type { Snapshot } from '../snapshot/snapshot.js';
import { REG_NAMES } from '@tsvm/kvm-backend';

/** `format` of every replay log. */
export const REPLAY_FORMAT = 'tsvm-replay-log';
/** The one log layout this build reads and writes. */
export const REPLAY_VERSION = 2;

/** One counted guest exit, with what the guest wrote and what it was given back. */
export interface LoggedExit {
  /** Exit kind. */
  readonly kind: ExitKind;
  /** Port (io), guest-physical address (mmio) or MSR index (msr); absent for other kinds. */
  readonly at?: bigint;
  /** `in`/`out` (io), `read`/`write` (mmio, msr). */
  readonly dir?: 'in' | 'out' | 'read' | 'write';
  /** Access width in bytes (io, mmio). */
  readonly size?: number;
  /** Repetitions of a string I/O instruction (io; 1 unless `rep`). */
  readonly count?: number;
  /** Bytes the guest wrote (io out, mmio write; the 8-byte LE value of a `wrmsr`). Checked on replay. */
  readonly wrote?: Uint8Array;
  /** Bytes the guest received (io in, mmio read). Substituted on replay. */
  read?: Uint8Array;
  /** Result of an intercepted MSR access. Substituted on replay. */
  msr?: { readonly data: bigint; readonly error: boolean };
  /** The access was abandoned and this exception raised instead (a `deny({ effect: 'gp' })`). */
  fault?: { readonly vector: number; readonly errorCode: number | undefined };
}

/** A device write into guest RAM, applied before the guest resumes after exit `after`. */
export interface LoggedDma {
  /** Exit number it followed (0: before the first exit). */
  readonly after: number;
  /** Writing device, as named at the DMA gate. */
  readonly device: string;
  /** First guest-physical address. */
  readonly address: bigint;
  /** The bytes that reached RAM. */
  readonly data: Uint8Array;
}

/** An interrupt-line change, delivered to the irqchip before the guest resumes after exit `after`. */
export interface LoggedIrq {
  /** Exit number it followed. */
  readonly after: number;
  /** irqchip input (0..23). */
  readonly irq: number;
  /** New line level. */
  readonly level: boolean;
}

/** Why one recorded `run()` ended, and the registers at that point (checked on replay). */
export interface LoggedStop {
  /** Exit number it ended at (the exit that caused it, or the last one before a timeout). */
  readonly after: number;
  /** `Stop.reason`. */
  readonly reason: string;
  /** `Stop.code` of a `debug-exit`, `Stop.vector` of an `exception`. */
  readonly code?: number;
  /** General-purpose registers after the stop. */
  readonly regs: Regs;
}

/** A recorded execution, relative to the snapshot it starts from. */
export interface ReplayLog {
  /** {@link snapshotDigest} of the base snapshot: a log replayed on another image is refused. */
  readonly base: string;
  /** Whether recording set `CR4.TSD` (so a CPL3 `rdtsc` faulted instead of reading the host's TSC). */
  readonly tsd: boolean;
  /** Counted guest exits, in order: entry `i` is exit number `i + 1`. */
  readonly exits: LoggedExit[];
  /** Device DMA into guest RAM, in order. */
  readonly dma: LoggedDma[];
  /** Interrupt-line changes, in order. */
  readonly irqs: LoggedIrq[];
  /** One entry per recorded `run()`, in order. */
  readonly stops: LoggedStop[];
}

/**
 * SHA-256 (hex) of a snapshot: its manifest as stored, then its memory image. What
 * {@link ReplayLog.base} names, so a log is never replayed on another image (~5 ms per 16 MiB).
 */
export function snapshotDigest(snapshot: Snapshot): string {
  const h = createHash('sha256').update(JSON.stringify(encodeManifest(snapshot.manifest)));
  const image = snapshot.image();
  const img = image.bytes;
  const size = Math.min(img.byteLength, snapshot.manifest.imageSize);
  // SAFETY: a view of the snapshot's own image, used only inside this call.
  const bytes = Buffer.from(img.buffer, img.byteOffset, size);
  // The image's content, page by page: each non-zero page with its index (zero pages, most of a
  // sparse image, add nothing). Where the image's file tells where its data is, only that is
  // read; the digest is the same either way (it depends on the bytes, not on the file's holes).
  const index = Buffer.alloc(8);
  const extents = image.dataExtents?.() ?? [[0, size] as const];
  for (const [from, to] of extents) {
    for (let at = from - (from % PAGE_SIZE); at < Math.min(to, size); at += PAGE_SIZE) {
      const page = bytes.subarray(at, Math.min(at + PAGE_SIZE, size));
      if (page.equals(ZERO_PAGE.subarray(0, page.length))) continue;
      index.writeBigUInt64LE(BigInt(at / PAGE_SIZE));
      h.update(index).update(page);
    }
  }
  return h.digest('hex');
}

const hex = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
const big = (v: bigint): string => `0x${v.toString(16)}`;

/** The log as JSON-safe data (bigints and bytes as hex strings), tagged with format and version. */
export function encodeLog(log: ReplayLog): Record<string, unknown> {
  return {
    format: REPLAY_FORMAT, version: REPLAY_VERSION, tsvm: TSVM_VERSION, base: log.base, tsd: log.tsd,
    exits: log.exits.map((e) => ({
      kind: e.kind,
      ...(e.at !== undefined ? { at: big(e.at) } : {}),
      ...(e.dir !== undefined ? { dir: e.dir } : {}),
      ...(e.size !== undefined ? { size: e.size } : {}),
      ...(e.count !== undefined ? { count: e.count } : {}),
      ...(e.wrote !== undefined ? { wrote: hex(e.wrote) } : {}),
      ...(e.read !== undefined ? { read: hex(e.read) } : {}),
      ...(e.msr !== undefined ? { msr: { data: big(e.msr.data), error: e.msr.error } } : {}),
      ...(e.fault !== undefined ? { fault: { vector: e.fault.vector, ...(e.fault.errorCode !== undefined ? { errorCode: e.fault.errorCode } : {}) } } : {}),
    })),
    dma: log.dma.map((d) => ({ after: d.after, device: d.device, address: big(d.address), data: hex(d.data) })),
    irqs: log.irqs.map((i) => ({ after: i.after, irq: i.irq, level: i.level })),
    stops: log.stops.map((s) => ({
      after: s.after, reason: s.reason, ...(s.code !== undefined ? { code: s.code } : {}),
      regs: Object.fromEntries(REG_NAMES.map((r) => [r, big(s.regs[r])])),
    })),
  };
}

// ---- parsing untrusted logs: every error names the field ----

/** At most this many entries per list: a log is replayed in memory. */
const MAX_ENTRIES = 1 << 24;
/** At most this many bytes in one hex field (a 1024-element `rep insd` is 4 KiB; DMA up to 1 MiB). */
const MAX_BYTES = 1 << 20;

function fail(field: string, what: string): never {
  throw new SnapshotFormatError(`replay log: ${field}: ${what}`);
}
function obj(v: unknown, f: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(f, 'must be an object');
  return v as Record<string, unknown>;
}
function arr(v: unknown, f: string): unknown[] {
  if (!Array.isArray(v)) fail(f, 'must be an array');
  if (v.length > MAX_ENTRIES) fail(f, `has ${v.length} entries, more than ${MAX_ENTRIES}`);
  return v;
}
function int(v: unknown, f: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) fail(f, `must be an integer in [${min}, ${max}]`);
  return v;
}
function bool(v: unknown, f: string): boolean {
  if (typeof v !== 'boolean') fail(f, 'must be a boolean');
  return v;
}
function str(v: unknown, f: string, max = 256): string {
  if (typeof v !== 'string' || v.length > max) fail(f, `must be a string of at most ${max} characters`);
  return v;
}
function u64(v: unknown, f: string): bigint {
  if (typeof v !== 'string' || !/^0x[0-9a-f]{1,16}$/.test(v)) fail(f, 'must be a 0x-prefixed hex u64');
  return BigInt(v);
}
function bytes(v: unknown, f: string, length?: number): Uint8Array {
  if (typeof v !== 'string' || v.length % 2 !== 0 || v.length > 2 * MAX_BYTES || !/^[0-9a-f]*$/.test(v)) fail(f, 'must be lower-case hex bytes');
  if (length !== undefined && v.length !== 2 * length) fail(f, `must hold ${length} bytes, has ${v.length / 2}`);
  return new Uint8Array(Buffer.from(v, 'hex'));
}
function known(o: Record<string, unknown>, f: string, keys: readonly string[]): void {
  for (const k of Object.keys(o)) if (!keys.includes(k)) fail(`${f}.${k}`, 'unknown field');
}
function ascending(list: readonly { after: number }[], f: string, exits: number): void {
  let prev = 0;
  list.forEach((e, i) => {
    if (e.after < prev) fail(`${f}[${i}].after`, `${e.after} is before the previous entry's ${prev}`);
    if (e.after > exits) fail(`${f}[${i}].after`, `${e.after} is past the log's ${exits} exits`);
    prev = e.after;
  });
}

const DIRS = ['in', 'out', 'read', 'write'] as const;

function parseExit(v: unknown, f: string): LoggedExit {
  const o = obj(v, f);
  known(o, f, ['kind', 'at', 'dir', 'size', 'count', 'wrote', 'read', 'msr', 'fault']);
  if (!(EXIT_KINDS as readonly unknown[]).includes(o.kind) || o.kind === 'intr') fail(`${f}.kind`, `must be a counted exit kind, got ${JSON.stringify(o.kind)?.slice(0, 40)}`);
  const kind = o.kind as ExitKind;
  const e: { -readonly [K in keyof LoggedExit]: LoggedExit[K] } = { kind };
  const access = kind === 'io' || kind === 'mmio' || kind === 'msr';
  if (access) {
    e.at = u64(o.at, `${f}.at`);
    if (kind === 'io' && e.at > 0xffffn) fail(`${f}.at`, 'a port is at most 0xffff');
    if (!DIRS.includes(o.dir as (typeof DIRS)[number])) fail(`${f}.dir`, "must be 'in', 'out', 'read' or 'write'");
    e.dir = o.dir as NonNullable<LoggedExit['dir']>;
    if ((kind === 'io') !== (e.dir === 'in' || e.dir === 'out')) fail(`${f}.dir`, `'${e.dir}' does not fit a ${kind} exit`);
  } else {
    for (const k of ['at', 'dir', 'size', 'count', 'wrote', 'read', 'msr', 'fault']) if (o[k] !== undefined) fail(`${f}.${k}`, `not allowed on a ${kind} exit`);
    return e;
  }
  if (kind !== 'msr') {
    e.size = int(o.size, `${f}.size`, 1, 8);
    e.count = int(o.count ?? 1, `${f}.count`, 1, 1024);
  }
  const span = (e.size ?? 8) * (e.count ?? 1);
  const writes = e.dir === 'out' || e.dir === 'write';
  if (o.wrote !== undefined) {
    if (!writes) fail(`${f}.wrote`, 'only writes carry the bytes written');
    e.wrote = bytes(o.wrote, `${f}.wrote`, span);
  } else if (writes) fail(`${f}.wrote`, 'a write must carry the bytes written');
  if (o.read !== undefined) {
    if (writes || kind === 'msr') fail(`${f}.read`, 'only io and mmio reads receive bytes');
    e.read = bytes(o.read, `${f}.read`, kind === 'mmio' ? undefined : span);
    if (e.read.length > 8 && kind === 'mmio') fail(`${f}.read`, 'an MMIO read receives at most 8 bytes');
  }
  if (o.msr !== undefined) {
    if (kind !== 'msr') fail(`${f}.msr`, 'only msr exits have an MSR result');
    const m = obj(o.msr, `${f}.msr`);
    known(m, `${f}.msr`, ['data', 'error']);
    e.msr = { data: u64(m.data, `${f}.msr.data`), error: bool(m.error, `${f}.msr.error`) };
  }
  if (o.fault !== undefined) {
    const x = obj(o.fault, `${f}.fault`);
    known(x, `${f}.fault`, ['vector', 'errorCode']);
    e.fault = { vector: int(x.vector, `${f}.fault.vector`, 0, 31), errorCode: x.errorCode === undefined ? undefined : int(x.errorCode, `${f}.fault.errorCode`, 0, 0xffff_ffff) };
  }
  return e;
}

/**
 * Checks untrusted JSON data (from `JSON.parse`) against the log schema and returns the log.
 * @throws SnapshotFormatError naming the first bad field (`replay log: exits[12].read: ...`).
 */
export function parseLog(json: unknown): ReplayLog {
  const o = obj(json, '(root)');
  known(o, '(root)', ['format', 'version', 'tsvm', 'base', 'tsd', 'exits', 'dma', 'irqs', 'stops']);
  if (o.format !== REPLAY_FORMAT) fail('format', `must be '${REPLAY_FORMAT}'`);
  if (o.version !== REPLAY_VERSION) fail('version', `${JSON.stringify(o.version)?.slice(0, 20)}; this build reads version ${REPLAY_VERSION} only`);
  if (o.tsvm !== TSVM_VERSION) fail('tsvm', `written by tsvm ${JSON.stringify(o.tsvm)?.slice(0, 40)}, this is ${TSVM_VERSION} (exit layouts may differ)`);
  if (typeof o.base !== 'string' || !/^[0-9a-f]{64}$/.test(o.base)) fail('base', 'must be a SHA-256 in hex');
  const exits = arr(o.exits, 'exits').map((e, i) => parseExit(e, `exits[${i}]`));
  const dma = arr(o.dma, 'dma').map((v, i): LoggedDma => {
    const f = `dma[${i}]`;
    const d = obj(v, f);
    known(d, f, ['after', 'device', 'address', 'data']);
    const data = bytes(d.data, `${f}.data`);
    if (data.length === 0) fail(`${f}.data`, 'must not be empty');
    return { after: int(d.after, `${f}.after`, 0, MAX_ENTRIES), device: str(d.device, `${f}.device`), address: u64(d.address, `${f}.address`), data };
  });
  const irqs = arr(o.irqs, 'irqs').map((v, i): LoggedIrq => {
    const f = `irqs[${i}]`;
    const d = obj(v, f);
    known(d, f, ['after', 'irq', 'level']);
    return { after: int(d.after, `${f}.after`, 0, MAX_ENTRIES), irq: int(d.irq, `${f}.irq`, 0, 23), level: bool(d.level, `${f}.level`) };
  });
  const stops = arr(o.stops, 'stops').map((v, i): LoggedStop => {
    const f = `stops[${i}]`;
    const d = obj(v, f);
    known(d, f, ['after', 'reason', 'code', 'regs']);
    const r = obj(d.regs, `${f}.regs`);
    known(r, `${f}.regs`, REG_NAMES);
    const regs = Object.fromEntries(REG_NAMES.map((n) => [n, u64(r[n], `${f}.regs.${n}`)])) as unknown as Regs;
    return {
      after: int(d.after, `${f}.after`, 0, MAX_ENTRIES), reason: str(d.reason, `${f}.reason`, 32),
      ...(d.code !== undefined ? { code: int(d.code, `${f}.code`, 0, 0xffff_ffff) } : {}), regs,
    };
  });
  if (stops.length === 0) fail('stops', 'a log records at least one run');
  ascending(dma, 'dma', exits.length);
  ascending(irqs, 'irqs', exits.length);
  ascending(stops, 'stops', exits.length);
  return { base: o.base, tsd: bool(o.tsd, 'tsd'), exits, dma, irqs, stops };
}
