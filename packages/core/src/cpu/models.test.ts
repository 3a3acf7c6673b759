import { describe, expect, it } from 'vitest';
import type { CpuidEntry } from '../backend.js';
import { InvalidArgumentError, SnapshotFormatError } from '../errors.js';
import { Machine } from '../machine.js';
import { encodeManifest, parseManifest } from '../snapshot/manifest.js';
import { MockBackend, MockVcpu } from '../testing/mock.js';
import { applyCpuModel, CPU_FEATURES, CPU_MODELS, cpuFeatureWords, cpuHasFeature, CpuModelError, type CpuFeature, type CpuModel, resolveCpuModel } from './models.js';

const e = (fn: number, index: number, r: Partial<CpuidEntry>): CpuidEntry => ({ function: fn, index, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0, ...r });
const bit = (...names: CpuFeature[]): number => names.reduce((m, n) => (m | (1 << CPU_FEATURES[n][1])) >>> 0, 0);

/** A fabricated Intel host with AVX, AVX2, AVX-512F, XSAVE and the usual baseline; 0x14 (PT) and a KVM leaf. */
function hostTable(): CpuidEntry[] {
  return [
    e(0, 0, { eax: 0x1f, ebx: 0x756e6547, edx: 0x49656e69, ecx: 0x6c65746e }), // GenuineIntel
    e(1, 0, {
      eax: 0x806f8, ebx: 0x0010_0800,
      ecx: bit('sse3', 'pclmulqdq', 'ssse3', 'fma', 'cx16', 'sse41', 'sse42', 'x2apic', 'popcnt', 'aes', 'xsave', 'avx', 'f16c', 'rdrand', 'hypervisor'),
      edx: bit('fpu', 'vme', 'de', 'pse', 'tsc', 'msr', 'pae', 'mce', 'cx8', 'apic', 'sep', 'mtrr', 'pge', 'mca', 'cmov', 'pat', 'pse36', 'clflush', 'mmx', 'fxsr', 'sse', 'sse2'),
    }),
    e(4, 0, { eax: 0x121, ebx: 0x1c0003f }), // cache leaf: passes through
    e(7, 0, { ebx: bit('fsgsbase', 'bmi1', 'avx2', 'smep', 'bmi2', 'avx512f'), ecx: bit('umip', 'pku') }),
    e(0xd, 0, { eax: 0b1110_0111 | (1 << 9), ebx: 0x988, ecx: 0xa88 }),
    e(0xd, 1, { eax: 0xf }),
    e(0xd, 2, { eax: 0x100, ebx: 0x240 }),
    e(0xd, 5, { eax: 0x40, ebx: 0x440 }),
    e(0xd, 9, { eax: 8, ebx: 0xa80 }),
    e(0x14, 0, { eax: 1, ebx: 0xf }),
    e(0x4000_0000, 0, { eax: 0x4000_0001, ebx: 0x4b4d564b }),
    e(0x4000_0001, 0, { eax: 0x01007afb }),
    e(0x8000_0000, 0, { eax: 0x8000_0008 }),
    e(0x8000_0001, 0, { ecx: bit('lahfLm', 'abm'), edx: bit('syscall', 'nx', 'pdpe1gb', 'rdtscp', 'lm') }),
    e(0x8000_0008, 0, { eax: 0x3027 }),
  ];
}

describe('CPU models', () => {
  it('qemu64 hides what QEMU qemu64 lacks and keeps what it has, never adding a host-missing bit', () => {
    const host = hostTable();
    const { cpuid, missing } = applyCpuModel(CPU_MODELS.qemu64, host);
    for (const f of ['avx', 'xsave', 'osxsave', 'sse41', 'sse42', 'popcnt', 'aes', 'avx2', 'avx512f', 'pku', 'pdpe1gb', 'rdtscp', 'abm', 'vme'] as CpuFeature[]) {
      expect([f, cpuHasFeature(cpuid, f)]).toEqual([f, false]);
    }
    for (const f of ['sse3', 'cx16', 'x2apic', 'hypervisor', 'sse2', 'fxsr', 'lm', 'nx', 'syscall', 'lahfLm', 'apic'] as CpuFeature[]) {
      expect([f, cpuHasFeature(cpuid, f)]).toEqual([f, true]);
    }
    // The model names SVM? no (QEMU turns it off under KVM); it names nothing this host lacks.
    expect(missing).toEqual([]);
    // Intersect: every feature word of the result is a subset of the host's.
    const hw = cpuFeatureWords(host);
    for (const [k, v] of Object.entries(cpuFeatureWords(cpuid))) expect((v & ~hw[k as keyof typeof hw]) >>> 0).toBe(0);
    // Leaves: 0x14 is beyond qemu64's level 0xd; leaf 0 says 0xd; caches and KVM leaves pass through.
    expect(cpuid.find((x) => x.function === 0)?.eax).toBe(0xd);
    expect(cpuid.some((x) => x.function === 0x14)).toBe(false);
    expect(cpuid.find((x) => x.function === 4)).toEqual(host.find((x) => x.function === 4));
    expect(cpuid.filter((x) => x.function >= 0x4000_0000 && x.function < 0x8000_0000)).toEqual(host.filter((x) => x.function >= 0x4000_0000 && x.function < 0x8000_0000));
    expect(cpuid.find((x) => x.function === 0x8000_0000)?.eax).toBe(0x8000_0008); // the host's is lower than 0x8000000a
    // Vendor and signature unchanged.
    expect(cpuid.find((x) => x.function === 0)?.ebx).toBe(0x756e6547);
    expect(cpuid.find((x) => x.function === 1)?.eax).toBe(0x806f8);
    // No XSAVE: leaf 0xd is empty.
    expect(cpuid.filter((x) => x.function === 0xd).every((x) => x.eax === 0 && x.ebx === 0 && x.ecx === 0 && x.edx === 0)).toBe(true);
    // The host table was not changed.
    expect(host).toEqual(hostTable());
  });

  it('a model with XSAVE but no AVX keeps x87/SSE and the features it names, drops the YMM and ZMM components', () => {
    const model: CpuModel = { name: 'xsave-no-avx', features: { '1.ecx': bit('xsave', 'sse3'), '1.edx': bit('fpu', 'sse', 'sse2'), '7.0.ecx': bit('pku') } };
    const { cpuid } = applyCpuModel(model, hostTable());
    const sub0 = cpuid.find((x) => x.function === 0xd && x.index === 0);
    expect(sub0?.eax).toBe(0b11 | (1 << 9)); // x87, SSE, PKRU (pku stays)
    expect(cpuid.filter((x) => x.function === 0xd).map((x) => x.index)).toEqual([0, 1, 9]);
    expect(cpuHasFeature(cpuid, 'avx')).toBe(false);
    // Registers the model does not name show nothing.
    expect(cpuFeatureWords(cpuid)['0x80000001.edx']).toBe(0);
  });

  it('missing bits are reported by name; enforce turns them into a CpuModelError at create', async () => {
    const host = hostTable().map((x) => (x.function === 1 ? { ...x, ecx: x.ecx & ~bit('cx16') } : x));
    const { missing, cpuid } = applyCpuModel(CPU_MODELS.qemu64, host);
    expect(missing).toEqual(['cx16']);
    expect(cpuHasFeature(cpuid, 'cx16')).toBe(false);
    const custom = applyCpuModel({ name: 'x', features: { '1.ecx': 1 << 11 } }, host);
    expect(custom.missing).toEqual(['1.ecx[11]']);

    const backend = new MockBackend();
    backend.nextVcpu = new MockVcpu(0);
    backend.nextVcpu.setCpuid(host);
    const err = await Machine.create({ memory: 64 * 1024, backend, cpu: { ...CPU_MODELS.qemu64, enforce: true } }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(CpuModelError);
    expect((err as CpuModelError).missing).toEqual(['cx16']);
  });

  it('bits a host cannot hide are named; a strict model refuses such a host at create', async () => {
    const uncontrolled = { '1.ecx': bit('avx', 'sse41', 'cx16') };
    const r = applyCpuModel(CPU_MODELS.qemu64, hostTable(), uncontrolled);
    expect(r.uncontrolled).toEqual(['sse41', 'avx']); // cx16 is qemu64's own: no leak
    const fake = (): MockBackend => {
      const b = new MockBackend();
      b.nextVcpu = new MockVcpu(0);
      b.nextVcpu.setCpuid(hostTable());
      return Object.assign(b, { cpuidControl: () => ({ uncontrolled: { ...cpuFeatureWords([]), ...uncontrolled }, probed: true }) });
    };
    const lax = await Machine.create({ memory: 64 * 1024, backend: fake(), cpu: 'qemu64' });
    expect(lax.uncontrolledFeatures).toEqual(['sse41', 'avx']);
    await lax.close();
    const err = await Machine.create({ memory: 64 * 1024, backend: fake(), cpu: { ...CPU_MODELS.qemu64, strict: true } }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(CpuModelError);
    expect((err as CpuModelError).uncontrolled).toEqual(['sse41', 'avx']);
    expect((err as Error).message).toMatch(/cannot hide sse41, avx/);
    const host = await Machine.create({ memory: 64 * 1024, backend: fake() });
    expect(host.uncontrolledFeatures).toEqual([]);
    expect(host.cpuModel).toBeUndefined();
    await host.close();
  });

  it('validates model specs with errors naming the field', () => {
    expect(resolveCpuModel(undefined)).toBeUndefined();
    expect(resolveCpuModel('host')).toBeUndefined();
    expect(resolveCpuModel('qemu64')).toBe(CPU_MODELS.qemu64);
    for (const bad of ['pentium', 7, null, [], { name: '' , features: {} }, { name: 'x', features: { '2.eax': 1 } }, { name: 'x', features: { '1.ecx': -1 } }, { name: 'x', features: {}, maxLeaf: 0 }, { name: 'x', features: {}, maxExtendedLeaf: 5 }, { name: 'x', features: {}, enforce: 1 }]) {
      expect(() => resolveCpuModel(bad)).toThrow(InvalidArgumentError);
    }
    expect(() => resolveCpuModel({ name: 'x', features: { '2.eax': 1 } })).toThrow(/cpu\.features\.2\.eax/);
  });

  it('Machine.create({ cpu }) sets the filtered table on every vCPU; a snapshot records it and a restore on a host without it fails typed', async () => {
    const backend = new MockBackend();
    backend.nextVcpu = new MockVcpu(0);
    backend.nextVcpu.setCpuid(hostTable());
    const vm = await Machine.create({ memory: 64 * 1024, backend, cpu: 'qemu64' });
    const seen = vm.vcpu(0).supportedCpuid(); // the mock returns what was set
    expect(cpuHasFeature(seen, 'avx')).toBe(false);
    expect(cpuHasFeature(seen, 'sse3')).toBe(true);
    expect(vm.cpuModel?.name).toBe('qemu64');
    expect(vm.cpuModel?.enforce).toBe(true);
    expect(vm.cpuModel?.features['1.ecx']).toBe(bit('sse3', 'cx16', 'x2apic', 'hypervisor'));
    vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000 });
    const snap = await vm.snapshot();
    expect(snap.manifest.machine.cpu).toEqual(vm.cpuModel);
    // The same host: restores, with the model applied again.
    const same = new MockBackend();
    same.nextVcpu = new MockVcpu(0);
    same.nextVcpu.setCpuid(hostTable());
    const ok = await Machine.restore(snap, { backend: same });
    expect(ok.cpuModel).toEqual(vm.cpuModel);
    expect(cpuHasFeature(ok.vcpu(0).supportedCpuid(), 'avx')).toBe(false);
    await ok.close();
    // A host without CX16 (same signature): refused, naming the feature.
    const poorer = new MockBackend();
    poorer.nextVcpu = new MockVcpu(0);
    poorer.nextVcpu.setCpuid(hostTable().map((x) => (x.function === 1 ? { ...x, ecx: x.ecx & ~bit('cx16') } : x)));
    const err = await Machine.restore(snap, { backend: poorer }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(SnapshotFormatError);
    expect((err as Error).cause).toBeInstanceOf(CpuModelError);
    expect((err as Error).message).toMatch(/cx16/);
    // The manifest's model is checked like any other field.
    const encoded = encodeManifest(snap.manifest) as { machine: Record<string, unknown> };
    expect(parseManifest(encoded).machine.cpu).toEqual(vm.cpuModel);
    expect(() => parseManifest({ ...encoded, machine: { ...encoded.machine, cpu: { name: 'x', features: { '1.ecx': 'all' } } } })).toThrow(/machine\.cpu .*features\.1\.ecx/);
    expect(parseManifest({ ...encoded, machine: { ...encoded.machine, cpu: undefined } }).machine.cpu).toBeUndefined();
    snap.close();
    await vm.close();
  });
});
