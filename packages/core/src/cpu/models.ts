/**
 * CPU models: named CPUID templates (as Firecracker's CPU templates or QEMU's `-cpu` models) so
 * a test can pin the features a guest sees. A model says, per *feature register* (a CPUID leaf,
 * subleaf and output register that holds feature flags), which bits may show, and how many
 * basic and extended leaves exist. Applying it to the host's table (`KVM_GET_SUPPORTED_CPUID`,
 * plus the hypervisor bit) *intersects*: a model never advertises a feature the host lacks. With
 * `enforce`, a host without every bit the model names is an error ({@link CpuModelError}), as
 * QEMU's `enforce`; a snapshot records its machine's model that way, so a restore on a host
 * without those features fails instead of running a guest that would see them vanish.
 *
 * What is not a feature register passes through: vendor, family/model/stepping (a guest on a
 * real CPU keeps seeing its vendor), cache and topology leaves, and KVM's own leaves
 * (0x40000000+, so kvm-clock stays available). XSAVE state components follow the features:
 * without AVX the YMM component leaves XCR0's supported mask (leaf 0xd), without XSAVE leaf 0xd
 * is empty. OSXSAVE follows XSAVE (it mirrors CR4 at run time).
 *
 * How far a model binds depends on the host, which is probed, not assumed
 * (`Backend.cpuidControl`): on VMX/SVM every CPUID exits and the guest sees exactly the table.
 * On PVM ring-3 CPUID never reaches KVM (the guest sees the CPU underneath), and ring-0 CPUID
 * takes from the table only the bits KVM itself supports there (hypervisor, x2APIC,
 * TSC-deadline, …), passing SSE4, AVX and the like through: such bits are listed in
 * `Machine.uncontrolledFeatures`, and a `strict` model refuses the host instead.
 * @module
 */
import type { CpuidEntry } from '../backend.js';
import { InvalidArgumentError, TsvmError } from '../errors.js';

/** A CPUID output register that holds feature flags: `leaf.register` or `leaf.subleaf.register`. */
export type CpuFeatureRegister =
  | '1.ecx' | '1.edx' | '6.eax' | '7.0.ebx' | '7.0.ecx' | '7.0.edx' | '7.1.eax' | '0xd.1.eax'
  | '0x80000001.ecx' | '0x80000001.edx' | '0x80000007.edx' | '0x80000008.ebx';

/** Every feature register a model filters, with its leaf, subleaf (`undefined`: any) and output register. */
export const CPU_FEATURE_REGISTERS: Readonly<Record<CpuFeatureRegister, { readonly leaf: number; readonly subleaf: number | undefined; readonly reg: 'eax' | 'ebx' | 'ecx' | 'edx' }>> = {
  '1.ecx': { leaf: 1, subleaf: undefined, reg: 'ecx' },
  '1.edx': { leaf: 1, subleaf: undefined, reg: 'edx' },
  '6.eax': { leaf: 6, subleaf: undefined, reg: 'eax' },
  '7.0.ebx': { leaf: 7, subleaf: 0, reg: 'ebx' },
  '7.0.ecx': { leaf: 7, subleaf: 0, reg: 'ecx' },
  '7.0.edx': { leaf: 7, subleaf: 0, reg: 'edx' },
  '7.1.eax': { leaf: 7, subleaf: 1, reg: 'eax' },
  '0xd.1.eax': { leaf: 0xd, subleaf: 1, reg: 'eax' },
  '0x80000001.ecx': { leaf: 0x8000_0001, subleaf: undefined, reg: 'ecx' },
  '0x80000001.edx': { leaf: 0x8000_0001, subleaf: undefined, reg: 'edx' },
  '0x80000007.edx': { leaf: 0x8000_0007, subleaf: undefined, reg: 'edx' },
  '0x80000008.ebx': { leaf: 0x8000_0008, subleaf: undefined, reg: 'ebx' },
};

/** Feature words: the value of each feature register. */
export type CpuFeatureWords = Readonly<Partial<Record<CpuFeatureRegister, number>>>;

/** A CPUID template. */
export interface CpuModel {
  /** Model name, for diagnostics and snapshots. */
  readonly name: string;
  /** Bits each feature register may show; a register not named shows nothing (deny by default). */
  readonly features: CpuFeatureWords;
  /** Highest basic leaf: leaf 0's EAX is clamped to it and the leaves above it are dropped. Default: the host's. */
  readonly maxLeaf?: number;
  /** Highest extended leaf (0x8000_00xx), likewise. Default: the host's. */
  readonly maxExtendedLeaf?: number;
  /** Refuse a host that lacks any bit `features` names ({@link CpuModelError}) instead of hiding it. Default false. */
  readonly enforce?: boolean;
  /**
   * Refuse a host on which ring-0 code would still see a host feature the model hides (PVM
   * passes most feature bits through; see `Backend.cpuidControl`) ({@link CpuModelError}).
   * Default false: such bits are listed in `Machine.uncontrolledFeatures`.
   */
  readonly strict?: boolean;
}

/** Names of the built-in models; `'host'` is the host's table unfiltered (the default). */
export type CpuModelName = 'host' | 'qemu64' | 'minimal';

/** What `Machine.create({ cpu })` accepts: a built-in name or a model of one's own. */
export type CpuModelSpec = CpuModelName | CpuModel;

/** Named bits, for messages and tests (`cpuHasFeature(table, 'avx')`). Not every bit has a name. */
export const CPU_FEATURES = {
  fpu: ['1.edx', 0], vme: ['1.edx', 1], de: ['1.edx', 2], pse: ['1.edx', 3], tsc: ['1.edx', 4], msr: ['1.edx', 5],
  pae: ['1.edx', 6], mce: ['1.edx', 7], cx8: ['1.edx', 8], apic: ['1.edx', 9], sep: ['1.edx', 11], mtrr: ['1.edx', 12],
  pge: ['1.edx', 13], mca: ['1.edx', 14], cmov: ['1.edx', 15], pat: ['1.edx', 16], pse36: ['1.edx', 17],
  clflush: ['1.edx', 19], mmx: ['1.edx', 23], fxsr: ['1.edx', 24], sse: ['1.edx', 25], sse2: ['1.edx', 26],
  sse3: ['1.ecx', 0], pclmulqdq: ['1.ecx', 1], ssse3: ['1.ecx', 9], fma: ['1.ecx', 12], cx16: ['1.ecx', 13],
  pcid: ['1.ecx', 17], sse41: ['1.ecx', 19], sse42: ['1.ecx', 20], x2apic: ['1.ecx', 21], movbe: ['1.ecx', 22],
  popcnt: ['1.ecx', 23], tscDeadline: ['1.ecx', 24], aes: ['1.ecx', 25], xsave: ['1.ecx', 26], osxsave: ['1.ecx', 27],
  avx: ['1.ecx', 28], f16c: ['1.ecx', 29], rdrand: ['1.ecx', 30], hypervisor: ['1.ecx', 31],
  fsgsbase: ['7.0.ebx', 0], bmi1: ['7.0.ebx', 3], avx2: ['7.0.ebx', 5], smep: ['7.0.ebx', 7], bmi2: ['7.0.ebx', 8],
  erms: ['7.0.ebx', 9], invpcid: ['7.0.ebx', 10], avx512f: ['7.0.ebx', 16], rdseed: ['7.0.ebx', 18], adx: ['7.0.ebx', 19],
  smap: ['7.0.ebx', 20], sha: ['7.0.ebx', 29], umip: ['7.0.ecx', 2], pku: ['7.0.ecx', 3], amxTile: ['7.0.edx', 24],
  lahfLm: ['0x80000001.ecx', 0], svm: ['0x80000001.ecx', 2], abm: ['0x80000001.ecx', 5],
  syscall: ['0x80000001.edx', 11], nx: ['0x80000001.edx', 20], pdpe1gb: ['0x80000001.edx', 26], rdtscp: ['0x80000001.edx', 27],
  lm: ['0x80000001.edx', 29], invariantTsc: ['0x80000007.edx', 8],
} as const satisfies Record<string, readonly [CpuFeatureRegister, number]>;

/** A named CPU feature. */
export type CpuFeature = keyof typeof CPU_FEATURES;

function bits(...names: CpuFeature[]): Partial<Record<CpuFeatureRegister, number>> {
  const out: Partial<Record<CpuFeatureRegister, number>> = {};
  for (const n of names) {
    const [reg, bit] = CPU_FEATURES[n];
    out[reg] = ((out[reg] ?? 0) | (1 << bit)) >>> 0;
  }
  return out;
}

/** Leaf-1 EDX bits that AMD mirrors in 0x8000_0001 EDX (SYSCALL, NX, LM are not among them). */
const AMD_EDX_ALIASES = 0x0183_f3ff;

function withAmdAliases(f: Partial<Record<CpuFeatureRegister, number>>): CpuFeatureWords {
  return { ...f, '0x80000001.edx': ((f['0x80000001.edx'] ?? 0) | ((f['1.edx'] ?? 0) & AMD_EDX_ALIASES)) >>> 0 };
}

/**
 * The built-in models. `qemu64` is QEMU's `qemu64` feature set as QEMU shows it under KVM
 * (x2APIC and the hypervisor bit on, SVM off): SSE2-era x86-64 with SSE3 and CMPXCHG16B, no
 * XSAVE/AVX, no leaf-7 features; basic leaves up to 0xd, extended up to 0x8000_000a. `minimal`
 * is what a long-mode guest needs and no more: x87, TSC, MSRs, PAE, PGE, APIC, CMOV, PAT, FXSR,
 * SSE/SSE2, SYSCALL, NX, LM (plus the hypervisor bit), leaves up to 7 and 0x8000_0008.
 */
export const CPU_MODELS: Readonly<Record<Exclude<CpuModelName, 'host'>, CpuModel>> = {
  qemu64: {
    name: 'qemu64',
    features: withAmdAliases(bits(
      'fpu', 'de', 'pse', 'tsc', 'msr', 'pae', 'mce', 'cx8', 'apic', 'sep', 'mtrr', 'pge', 'mca', 'cmov', 'pat', 'pse36',
      'clflush', 'mmx', 'fxsr', 'sse', 'sse2', 'sse3', 'cx16', 'x2apic', 'hypervisor', 'lahfLm', 'syscall', 'nx', 'lm',
    )),
    maxLeaf: 0xd,
    maxExtendedLeaf: 0x8000_000a,
  },
  minimal: {
    name: 'minimal',
    features: withAmdAliases(bits(
      'fpu', 'tsc', 'msr', 'pae', 'cx8', 'apic', 'pge', 'cmov', 'pat', 'fxsr', 'sse', 'sse2', 'hypervisor', 'syscall', 'nx', 'lm',
    )),
    maxLeaf: 7,
    maxExtendedLeaf: 0x8000_0008,
  },
};

/**
 * The host cannot give the guest a model as asked: it lacks features a model with `enforce`
 * requires (or a snapshot's machine saw), or, with `strict`, it cannot hide features the model hides.
 */
export class CpuModelError extends TsvmError {
  /** The model. */
  readonly model: string;
  /** The missing bits, by name where they have one (`avx`), else as `1.ecx[28]`. */
  readonly missing: readonly string[];
  /** Host bits the model hides that ring-0 code would see anyway (only with `strict`). */
  readonly uncontrolled: readonly string[];

  /**
   * @param model - model name.
   * @param missing - missing feature bits.
   * @param uncontrolled - bits that cannot be hidden.
   */
  constructor(model: string, missing: readonly string[], uncontrolled: readonly string[] = []) {
    const why = [
      ...(missing.length > 0 ? [`this host lacks ${missing.join(', ')}`] : []),
      ...(uncontrolled.length > 0 ? [`this host cannot hide ${uncontrolled.join(', ')} from ring-0 code`] : []),
    ];
    super('TSVM_CPU_MODEL', `CPU model '${model}': ${why.join('; ')}`);
    this.model = model;
    this.missing = Object.freeze([...missing]);
    this.uncontrolled = Object.freeze([...uncontrolled]);
  }
}

const U32 = 0xffff_ffff;

/**
 * The model a spec names, checked: `undefined` for `'host'` (and for no spec), the built-in
 * model for its name, or a copy of a model of one's own after its fields are validated.
 * @throws InvalidArgumentError naming the bad field.
 */
export function resolveCpuModel(spec: unknown, argument = 'cpu'): CpuModel | undefined {
  if (spec === undefined || spec === 'host') return undefined;
  if (typeof spec === 'string') {
    const m = (CPU_MODELS as Record<string, CpuModel>)[spec];
    if (!m) throw invalid(argument, `is not a CPU model: '${spec}' (built in: host, ${Object.keys(CPU_MODELS).join(', ')})`);
    return m;
  }
  if (spec === null || typeof spec !== 'object' || Array.isArray(spec)) throw invalid(argument, 'must be a model name or a CpuModel object');
  const o = spec as Record<string, unknown>;
  if (typeof o['name'] !== 'string' || o['name'] === '' || o['name'].length > 64) throw invalid(`${argument}.name`, 'must be a non-empty string of at most 64 characters');
  const f = o['features'];
  if (f === null || typeof f !== 'object' || Array.isArray(f)) throw invalid(`${argument}.features`, 'must be an object of feature registers');
  const features: Partial<Record<CpuFeatureRegister, number>> = {};
  for (const [k, v] of Object.entries(f)) {
    if (!Object.hasOwn(CPU_FEATURE_REGISTERS, k)) throw invalid(`${argument}.features.${k}`, `is not a feature register (known: ${Object.keys(CPU_FEATURE_REGISTERS).join(', ')})`);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > U32) throw invalid(`${argument}.features.${k}`, 'must be a 32-bit unsigned integer');
    features[k as CpuFeatureRegister] = v;
  }
  const leaf = (k: string, lo: number, hi: number): number | undefined => {
    const v = o[k];
    if (v === undefined) return undefined;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi) throw invalid(`${argument}.${k}`, `must be an integer in [0x${lo.toString(16)}, 0x${hi.toString(16)}]`);
    return v;
  };
  const maxLeaf = leaf('maxLeaf', 1, 0x3fff_ffff);
  const maxExtendedLeaf = leaf('maxExtendedLeaf', 0x8000_0000, 0x8fff_ffff);
  if (o['enforce'] !== undefined && typeof o['enforce'] !== 'boolean') throw invalid(`${argument}.enforce`, 'must be a boolean');
  if (o['strict'] !== undefined && typeof o['strict'] !== 'boolean') throw invalid(`${argument}.strict`, 'must be a boolean');
  return {
    name: o['name'], features,
    ...(maxLeaf !== undefined ? { maxLeaf } : {}),
    ...(maxExtendedLeaf !== undefined ? { maxExtendedLeaf } : {}),
    ...(o['enforce'] === true ? { enforce: true } : {}),
    ...(o['strict'] === true ? { strict: true } : {}),
  };
}

function invalid(argument: string, message: string): InvalidArgumentError {
  return new InvalidArgumentError(argument, message);
}

/** The feature words of a CPUID table (0 for a register whose leaf is absent). */
export function cpuFeatureWords(table: readonly CpuidEntry[]): Record<CpuFeatureRegister, number> {
  const out = {} as Record<CpuFeatureRegister, number>;
  for (const [name, r] of Object.entries(CPU_FEATURE_REGISTERS) as [CpuFeatureRegister, (typeof CPU_FEATURE_REGISTERS)[CpuFeatureRegister]][]) {
    const e = table.find((x) => x.function === r.leaf && (r.subleaf === undefined || x.index === r.subleaf));
    out[name] = e ? e[r.reg] >>> 0 : 0;
  }
  return out;
}

/** Whether `table` shows the named feature. */
export function cpuHasFeature(table: readonly CpuidEntry[], feature: CpuFeature): boolean {
  const [reg, bit] = CPU_FEATURES[feature];
  return ((cpuFeatureWords(table)[reg] >>> bit) & 1) === 1;
}

/** Names of the bits set in `mask` of `reg`. */
function bitNames(reg: CpuFeatureRegister, mask: number): string[] {
  const out: string[] = [];
  for (let b = 0; b < 32; b++) {
    if (!((mask >>> b) & 1)) continue;
    const named = (Object.entries(CPU_FEATURES) as [string, readonly [CpuFeatureRegister, number]][]).find(([, [r, x]]) => r === reg && x === b);
    out.push(named ? named[0] : `${reg}[${b}]`);
  }
  return out;
}

/** The result of {@link applyCpuModel}. */
export interface AppliedCpuModel {
  /** The table for `KVM_SET_CPUID2`. */
  readonly cpuid: CpuidEntry[];
  /** Bits the model names that the host lacks (hidden, or an error with `enforce`). */
  readonly missing: readonly string[];
  /** Host bits the table hides that ring-0 code still sees, per `uncontrolled` (an error with `strict`). */
  readonly uncontrolled: readonly string[];
}

/** XCR0 components and the feature that must show for each (x87 and SSE always stay). */
const XCR0_NEEDS: readonly [number, CpuFeature][] = [
  [2, 'avx'], [5, 'avx512f'], [6, 'avx512f'], [7, 'avx512f'], [9, 'pku'], [17, 'amxTile'], [18, 'amxTile'],
];

/**
 * Filters the host's CPUID table through `model` (pure: `host` is not changed). `uncontrolled`
 * (from `Backend.cpuidControl`) names the bits the host shows ring-0 code whatever the table says. Feature
 * registers are ANDed with the model's masks (the host's bits are never widened), leaves past
 * the model's maxima dropped and leaf 0 / 0x8000_0000 clamped, leaf 0xd trimmed to the state
 * components the remaining features use.
 */
export function applyCpuModel(model: CpuModel, host: readonly CpuidEntry[], uncontrolled?: CpuFeatureWords): AppliedCpuModel {
  const hostWords = cpuFeatureWords(host);
  const missing: string[] = [];
  const leaks: string[] = [];
  const allowed = {} as Record<CpuFeatureRegister, number>;
  for (const reg of Object.keys(CPU_FEATURE_REGISTERS) as CpuFeatureRegister[]) {
    let mask = (model.features[reg] ?? 0) >>> 0;
    const lacking = (mask & ~hostWords[reg]) >>> 0;
    // OSXSAVE is CR4's mirror at run time (0 in the supported table), and AMD's copies of
    // leaf-1 EDX bits exist only on AMD: allowed where present, never missing.
    const dynamic = reg === '1.ecx' ? 1 << CPU_FEATURES.osxsave[1] : reg === '0x80000001.edx' ? AMD_EDX_ALIASES : 0;
    if ((lacking & ~dynamic) !== 0) missing.push(...bitNames(reg, (lacking & ~dynamic) >>> 0));
    if (reg === '1.ecx' && !((mask >>> CPU_FEATURES.xsave[1]) & 1)) mask &= ~dynamic;
    allowed[reg] = mask >>> 0;
    const leaked = ((uncontrolled?.[reg] ?? 0) & ~mask) >>> 0;
    if (leaked !== 0) leaks.push(...bitNames(reg, leaked));
  }
  const hostMax = host.find((e) => e.function === 0)?.eax ?? 0;
  const hostMaxExt = host.find((e) => e.function === 0x8000_0000)?.eax ?? 0x8000_0000;
  const maxLeaf = Math.min(hostMax >>> 0, model.maxLeaf ?? U32);
  const maxExt = Math.min(hostMaxExt >>> 0, model.maxExtendedLeaf ?? U32);
  const out: CpuidEntry[] = [];
  for (const e of host) {
    const fn = e.function >>> 0;
    if (fn < 0x4000_0000 && fn > maxLeaf) continue;
    if (fn >= 0x8000_0000 && fn > maxExt) continue;
    const x = { ...e };
    if (fn === 0) x.eax = maxLeaf;
    if (fn === 0x8000_0000) x.eax = maxExt;
    for (const [reg, r] of Object.entries(CPU_FEATURE_REGISTERS) as [CpuFeatureRegister, (typeof CPU_FEATURE_REGISTERS)[CpuFeatureRegister]][]) {
      if (r.leaf === fn && (r.subleaf === undefined || r.subleaf === x.index)) x[r.reg] = (x[r.reg] & allowed[reg]) >>> 0;
    }
    out.push(x);
  }
  trimXsave(out);
  return { cpuid: out, missing, uncontrolled: leaks };
}

/** Leaf 0xd after the features are filtered: empty without XSAVE, else only the components still backed by a feature. */
function trimXsave(table: CpuidEntry[]): void {
  const xsave = cpuHasFeature(table, 'xsave');
  const sub0 = table.find((e) => e.function === 0xd && e.index === 0);
  const hostXcr0 = sub0 ? sub0.eax >>> 0 : 0;
  // Components no feature controls here (MPX bounds) stay as the host has them.
  let keep = hostXcr0;
  for (const [bit, f] of XCR0_NEEDS) if (!cpuHasFeature(table, f)) keep &= ~(1 << bit);
  for (let i = table.length - 1; i >= 0; i--) {
    const e = table[i] as CpuidEntry;
    if (e.function !== 0xd) continue;
    if (!xsave) {
      e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0;
    } else if (e.index === 0) {
      e.eax = keep >>> 0;
    } else if (e.index >= 2 && e.index < 32 && ((hostXcr0 >>> e.index) & 1) === 1 && ((keep >>> e.index) & 1) === 0) {
      table.splice(i, 1); // a user state component the guest may no longer enable
    }
  }
}

/** The model a snapshot records for a machine: its effective features, enforced on restore. */
export function recordedCpuModel(model: CpuModel, applied: readonly CpuidEntry[]): CpuModel {
  const words = cpuFeatureWords(applied);
  const features: Partial<Record<CpuFeatureRegister, number>> = {};
  for (const [k, v] of Object.entries(words) as [CpuFeatureRegister, number][]) {
    // OSXSAVE is dynamic: a recording should not demand it.
    const w = k === '1.ecx' ? v & ~(1 << CPU_FEATURES.osxsave[1]) : v;
    if (w !== 0) features[k] = w >>> 0;
  }
  return {
    name: model.name, features,
    ...(model.maxLeaf !== undefined ? { maxLeaf: model.maxLeaf } : {}),
    ...(model.maxExtendedLeaf !== undefined ? { maxExtendedLeaf: model.maxExtendedLeaf } : {}),
    enforce: true,
    ...(model.strict ? { strict: true } : {}),
  };
}
