/**
 * The snapshot manifest: a versioned JSON document describing everything about a machine
 * except its RAM (which is the image). Parsing treats it as untrusted input — it may come from
 * disk, another build or an attacker — so every field is checked and a bad one is a
 * {@link SnapshotFormatError} naming its path (`vcpus[0].sregs.cs.limit`), never a crash.
 * @module
 */
import { createRequire } from 'node:module';
import { SnapshotFormatError } from '../errors.js';
import type { MsrEntry, Regs, Segment, Sregs, DTable, VirtFlavour } from '../backend.js';
import { SYSTEM_AREA_SIZE, type CpuMode } from '../cpu/x86.js';
import { REG_NAMES } from '@tsvm/kvm-backend';
import { resolveCpuModel, type CpuModel } from '../cpu/models.js';

/** The manifest format this build writes and the only one it reads. */
export const SNAPSHOT_FORMAT = 'tsvm-snapshot';
/** Bumped whenever the manifest's shape or meaning changes; other versions are rejected. */
export const SNAPSHOT_VERSION = 1;
/**
 * The `@tsvm/core` version that writes snapshots; a snapshot from another version is refused
 * (device and vCPU state layouts may differ between builds even when the manifest parses).
 */
export const TSVM_VERSION: string = coreVersion();

/** This package's version, from its package.json (one level up when bundled into dist/, two from src/snapshot/). */
function coreVersion(): string {
  const req = createRequire(import.meta.url);
  for (const p of ['../../package.json', '../package.json']) {
    try {
      const pkg = req(p) as { name?: string; version?: string };
      if (pkg.name === '@tsvm/core' && typeof pkg.version === 'string') return pkg.version;
    } catch { /* try the next */ }
  }
  return 'unknown';
}
/** 4 KiB: the unit in which memory is stored, compared and re-copied. */
export const PAGE_SIZE = 4096;
/** @internal A page of zeros (a snapshot's image stores, and its digest hashes, only pages that differ from it). */
export const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** Which host a snapshot can be restored on: the same flavour and CPU. */
export interface SnapshotHost {
  /** Backend name (`kvm`, `mock`). */
  readonly backend: string;
  /** Virtualization flavour; state blobs differ between flavours. */
  readonly flavour: VirtFlavour;
  /** CPUID vendor string and leaf-1 signature (family/model/stepping), e.g. `GenuineIntel:0x806f8`. */
  readonly cpu: string;
}

/** One RAM region and where its bytes are in the image. */
export interface SnapshotRegion {
  /** Memslot number. */
  readonly slot: number;
  /** Guest-physical start. */
  readonly start: bigint;
  /** Bytes (page multiple). */
  readonly size: number;
  /** Read-only memslot. */
  readonly readonly: boolean;
  /** Region label. */
  readonly name: string;
  /** Byte offset of the region in the image (page aligned). */
  readonly offset: number;
  /** Pages that are not all zero (the ones actually stored). */
  readonly storedPages: number;
}

/** One vCPU's architectural state. */
export interface SnapshotVcpu {
  /** vCPU index. */
  readonly id: number;
  /** General-purpose registers. */
  readonly regs: Regs;
  /** Segment, control and descriptor-table registers. */
  readonly sregs: Sregs;
  /** MSRs from the backend's index list that could be read. */
  readonly msrs: readonly MsrEntry[];
  /** Opaque backend blobs (FPU, XSAVE, LAPIC, events, debug registers, MP state). */
  readonly blobs: Readonly<Record<string, Uint8Array>>;
}

/** A parsed, validated manifest. */
export interface SnapshotManifest {
  /** Always {@link SNAPSHOT_FORMAT}. */
  readonly format: typeof SNAPSHOT_FORMAT;
  /** Always {@link SNAPSHOT_VERSION}. */
  readonly version: typeof SNAPSHOT_VERSION;
  /** The tsvm ({@link TSVM_VERSION}) that wrote it. */
  readonly tsvm: string;
  /** Where it was taken. */
  readonly host: SnapshotHost;
  /** Machine-level settings a restored machine must share. */
  readonly machine: {
    /** Name of the machine it was taken from. */
    readonly name: string;
    /** Whether it has an in-kernel irqchip. */
    readonly irqchip: boolean;
    /** CPU mode the host set up (decides the exception-frame layout). */
    readonly mode: CpuMode;
    /** Base of the host-built system area, if any. */
    readonly systemArea: number | null;
    /** The CPU model (`Machine.cpuModel`, enforced on restore); absent: the host's CPUID. */
    readonly cpu?: CpuModel;
  };
  /** RAM regions; their bytes are in the image. */
  readonly memory: readonly SnapshotRegion[];
  /** Image length in bytes (sum of region sizes). */
  readonly imageSize: number;
  /** vCPU states. */
  readonly vcpus: readonly SnapshotVcpu[];
  /** VM-wide blobs (irqchip, PIT, clock). */
  readonly vm: Readonly<Record<string, Uint8Array>>;
  /** Device states by device name, as their `snapshot()` returned them. */
  readonly devices: Readonly<Record<string, unknown>>;
}

const MAX_REGIONS = 32;
const MAX_VCPUS = 256;
const MAX_MSRS = 4096;
const MAX_BLOB = 1 << 20;
const MAX_IMAGE = 64 * 1024 ** 3;

/** Encodes a manifest as JSON-safe values (bigints as `0x` strings, blobs as base64). */
export function encodeManifest(m: SnapshotManifest): unknown {
  const blobs = (b: Readonly<Record<string, Uint8Array>>) => Object.fromEntries(Object.entries(b).map(([k, v]) => [k, Buffer.from(v).toString('base64')]));
  const seg = (s: Segment) => ({ ...s, base: h(s.base) });
  const dt = (d: DTable) => ({ base: h(d.base), limit: d.limit });
  return {
    format: m.format, version: m.version, tsvm: m.tsvm, host: m.host, machine: m.machine,
    memory: m.memory.map((r) => ({ ...r, start: h(r.start) })),
    imageSize: m.imageSize,
    vcpus: m.vcpus.map((v) => ({
      id: v.id,
      regs: Object.fromEntries(REG_NAMES.map((k) => [k, h(v.regs[k])])),
      sregs: {
        ...Object.fromEntries(SEGMENTS.map((k) => [k, seg(v.sregs[k])])),
        gdt: dt(v.sregs.gdt), idt: dt(v.sregs.idt),
        ...Object.fromEntries(CONTROL.map((k) => [k, h(v.sregs[k])])),
        interrupt_bitmap: v.sregs.interrupt_bitmap.map(h),
      },
      msrs: v.msrs.map((e) => [e.index, h(e.data)]),
      blobs: blobs(v.blobs),
    })),
    vm: blobs(m.vm),
    devices: m.devices,
  };
}

const h = (v: bigint): string => `0x${v.toString(16)}`;
const SEGMENTS = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
const CONTROL = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base'] as const;
const SEG_FIELDS: ReadonlyArray<[keyof Omit<Segment, 'base'>, number]> = [
  ['limit', 0xffff_ffff], ['selector', 0xffff], ['type', 15], ['present', 1], ['dpl', 3], ['db', 1], ['s', 1], ['l', 1], ['g', 1], ['avl', 1], ['unusable', 1],
];

/** Walks untrusted JSON; every failure names the path. */
class Field {
  constructor(readonly path: string, readonly value: unknown) {}

  fail(why: string): never {
    throw new SnapshotFormatError(`snapshot manifest: ${this.path || '(root)'} ${why}`);
  }

  at(key: string): Field {
    const v = this.value;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.fail('must be an object');
    return new Field(this.path ? `${this.path}.${key}` : key, Object.hasOwn(v, key) ? (v as Record<string, unknown>)[key] : undefined);
  }

  object(): Record<string, unknown> {
    const v = this.value;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.fail('must be an object');
    return v as Record<string, unknown>;
  }

  items(max: number): Field[] {
    const v = this.value;
    if (!Array.isArray(v)) this.fail('must be an array');
    if (v.length > max) this.fail(`has ${v.length} entries, at most ${max} allowed`);
    return v.map((x, i) => new Field(`${this.path}[${i}]`, x));
  }

  int(min: number, max: number): number {
    const v = this.value;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) this.fail(`must be an integer in [${min}, ${max}], got ${short(v)}`);
    return v;
  }

  bool(): boolean {
    if (typeof this.value !== 'boolean') this.fail(`must be a boolean, got ${short(this.value)}`);
    return this.value;
  }

  str(max = 256): string {
    const v = this.value;
    if (typeof v !== 'string' || v.length > max) this.fail(`must be a string of at most ${max} characters, got ${short(v)}`);
    return v;
  }

  u64(): bigint {
    const v = this.value;
    if (typeof v !== 'string' || !/^0x[0-9a-f]{1,16}$/.test(v)) this.fail(`must be a 0x-prefixed hex u64, got ${short(v)}`);
    return BigInt(v);
  }

  blob(): Uint8Array {
    const v = this.value;
    if (typeof v !== 'string' || v.length > (MAX_BLOB * 4) / 3 + 4 || !/^[A-Za-z0-9+/]*={0,2}$/.test(v) || v.length % 4 !== 0) this.fail('must be a base64 string');
    return new Uint8Array(Buffer.from(v, 'base64'));
  }

  blobs(max: number): Record<string, Uint8Array> {
    const o = this.object();
    const keys = Object.keys(o);
    if (keys.length > max) this.fail(`has ${keys.length} entries, at most ${max} allowed`);
    const out: Record<string, Uint8Array> = {};
    for (const k of keys) {
      if (!/^[a-z0-9-]{1,32}$/.test(k)) this.fail(`has a malformed key ${short(k)}`);
      out[k] = this.at(k).blob();
    }
    return out;
  }
}

function short(v: unknown): string {
  let s: string;
  try { s = JSON.stringify(v) ?? String(v); } catch { s = String(v); }
  return s.length > 40 ? `${s.slice(0, 40)}…` : s;
}

/**
 * Checks a parsed JSON value against the manifest schema and returns it typed. Rejects another
 * format or version, missing or extra-shaped fields, regions outside the image or overlapping,
 * and out-of-range register fields.
 * @throws SnapshotFormatError naming the first bad field.
 */
export function parseManifest(json: unknown): SnapshotManifest {
  const root = new Field('', json);
  root.object();
  if (root.at('format').value !== SNAPSHOT_FORMAT) root.at('format').fail(`must be '${SNAPSHOT_FORMAT}', got ${short(root.at('format').value)}`);
  const version = root.at('version').value;
  if (version !== SNAPSHOT_VERSION) root.at('version').fail(`is ${short(version)}; this build reads version ${SNAPSHOT_VERSION} only`);
  const tsvm = root.at('tsvm').str(32);
  if (tsvm !== TSVM_VERSION) root.at('tsvm').fail(`is ${short(tsvm)}; this is tsvm ${TSVM_VERSION}, which restores only its own snapshots`);
  const hf = root.at('host');
  const flavour = hf.at('flavour').str(16);
  if (!['vmx', 'svm', 'pvm', 'mock', 'unknown'].includes(flavour)) hf.at('flavour').fail(`is not a known flavour: ${short(flavour)}`);
  const host: SnapshotHost = { backend: hf.at('backend').str(32), flavour: flavour as VirtFlavour, cpu: hf.at('cpu').str(64) };
  const mf = root.at('machine');
  const mode = mf.at('mode').str(16);
  if (mode !== 'real' && mode !== 'protected' && mode !== 'long') mf.at('mode').fail(`must be 'real', 'protected' or 'long', got ${short(mode)}`);
  const sa = mf.at('systemArea');
  const cf = mf.at('cpu');
  let cpu: CpuModel | undefined;
  try {
    cpu = cf.value === undefined ? undefined : resolveCpuModel(cf.value, 'machine.cpu');
  } catch (e) {
    cf.fail(`is not a CPU model: ${e instanceof Error ? e.message : String(e)}`);
  }
  const machine = { name: mf.at('name').str(256), irqchip: mf.at('irqchip').bool(), mode: mode as CpuMode, systemArea: sa.value === null ? null : sa.int(0, 0xffff_ffff), ...(cpu ? { cpu } : {}) };
  const imageSize = root.at('imageSize').int(0, MAX_IMAGE);
  if (imageSize % PAGE_SIZE !== 0) root.at('imageSize').fail('must be a multiple of 4096');
  const memory = root.at('memory').items(MAX_REGIONS).map((f): SnapshotRegion => {
    const size = f.at('size').int(PAGE_SIZE, MAX_IMAGE);
    const offset = f.at('offset').int(0, MAX_IMAGE);
    if (size % PAGE_SIZE !== 0) f.at('size').fail('must be a multiple of 4096');
    if (offset % PAGE_SIZE !== 0) f.at('offset').fail('must be a multiple of 4096');
    if (offset + size > imageSize) f.at('offset').fail(`[${offset}, +${size}) lies outside the ${imageSize}-byte image`);
    const start = f.at('start').u64();
    if (start % BigInt(PAGE_SIZE) !== 0n || start + BigInt(size) > 1n << 52n) f.at('start').fail('must be page aligned and inside the 52-bit physical space');
    return { slot: f.at('slot').int(0, MAX_REGIONS - 1), start, size, readonly: f.at('readonly').bool(), name: f.at('name').str(64), offset, storedPages: f.at('storedPages').int(0, size / PAGE_SIZE) };
  });
  if (memory.length === 0) root.at('memory').fail('must list at least one region');
  const sorted = [...memory].sort((a, b) => a.offset - b.offset);
  sorted.forEach((r, i) => {
    const p = sorted[i - 1];
    if (p && r.offset < p.offset + p.size) root.at('memory').fail(`regions '${p.name}' and '${r.name}' overlap in the image`);
  });
  const byStart = [...memory].sort((a, b) => (a.start < b.start ? -1 : 1));
  byStart.forEach((r, i) => {
    const p = byStart[i - 1];
    if (p && r.start < p.start + BigInt(p.size)) root.at('memory').fail(`regions '${p.name}' and '${r.name}' overlap in guest-physical memory`);
  });
  if (new Set(memory.map((r) => r.slot)).size !== memory.length) root.at('memory').fail('two regions share a slot');
  const area = machine.systemArea;
  if (area !== null && !memory.some((r) => BigInt(area) >= r.start && BigInt(area) + BigInt(SYSTEM_AREA_SIZE) <= r.start + BigInt(r.size))) {
    mf.at('systemArea').fail(`[${area}, +${SYSTEM_AREA_SIZE}) is not inside one RAM region`);
  }
  const vcpus = root.at('vcpus').items(MAX_VCPUS).map((f, i): SnapshotVcpu => {
    const id = f.at('id').int(0, MAX_VCPUS - 1);
    if (id !== i) f.at('id').fail(`must be ${i} (vCPUs are listed in order)`);
    const rf = f.at('regs');
    const regs = Object.fromEntries(REG_NAMES.map((k) => [k, rf.at(k).u64()])) as unknown as Regs;
    const sf = f.at('sregs');
    const segment = (g: Field): Segment => {
      const out: Record<string, number | bigint> = { base: g.at('base').u64() };
      for (const [k, max] of SEG_FIELDS) out[k] = g.at(k).int(0, max);
      return out as unknown as Segment;
    };
    const dt = (g: Field): DTable => ({ base: g.at('base').u64(), limit: g.at('limit').int(0, 0xffff) });
    const bitmap = sf.at('interrupt_bitmap').items(4).map((x) => x.u64());
    if (bitmap.length !== 4) sf.at('interrupt_bitmap').fail('must have 4 entries');
    const sregs = {
      ...Object.fromEntries(SEGMENTS.map((k) => [k, segment(sf.at(k))])),
      gdt: dt(sf.at('gdt')), idt: dt(sf.at('idt')),
      ...Object.fromEntries(CONTROL.map((k) => [k, sf.at(k).u64()])),
      interrupt_bitmap: bitmap as [bigint, bigint, bigint, bigint],
    } as unknown as Sregs;
    const msrs = f.at('msrs').items(MAX_MSRS).map((e) => {
      const [ix, data] = e.items(2);
      if (!ix || !data) return e.fail('must be [index, value]');
      return { index: ix.int(0, 0xffff_ffff), data: data.u64() };
    });
    // Frozen: a snapshot's registers never change, so a backend may keep them encoded (reset).
    return { id, regs: Object.freeze(regs), sregs: freezeSregs(sregs), msrs, blobs: f.at('blobs').blobs(16) };
  });
  if (vcpus.length === 0) root.at('vcpus').fail('must list at least one vCPU');
  const devices = root.at('devices').object();
  for (const k of Object.keys(devices)) if (k.length > 64) root.at('devices').fail(`has an over-long device name ${short(k)}`);
  return { format: SNAPSHOT_FORMAT, version: SNAPSHOT_VERSION, tsvm, host, machine, memory, imageSize, vcpus, vm: root.at('vm').blobs(16), devices: { ...devices } };
}

/** Freezes `s` and every object in it. */
function freezeSregs(s: Sregs): Sregs {
  for (const v of Object.values(s)) if (typeof v === 'object' && v !== null) Object.freeze(v);
  return Object.freeze(s);
}
