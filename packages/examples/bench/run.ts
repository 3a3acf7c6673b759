/**
 * `pnpm bench`: tsvm's speed and memory targets, each measured against a baseline in the same
 * run. Prints a table and writes JSON to bench-results/foundation.json.
 *
 * - PIO / MMIO exit round trip through the full Machine.run path vs a minimal C KVM_RUN loop
 *   (bench/exitloop.c, built here with cc) running the *identical* guest state, ring 0 and 3;
 *   `floorRatio`: the same loop in Node through kvm-backend with no handling at all (the least
 *   any Node VMM pays here, so the most tsvm's own code can be held to); `cInNodeRatio`: the C
 *   loop itself called once from this Node process (koffi) on a vCPU set up here, which tells
 *   a cost of the Node process (its footprint, threads) from a cost of JavaScript between exits.
 * - create → load 4 KiB → run to hlt → close latency.
 * - RSS growth per idle 2 MiB machine, over 100 machines.
 * @module
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, KvmUnavailableError, kvmBackend } from '@tsvm/core';
import { asm } from '@tsvm/core/testing';
import { readFileSync } from 'node:fs';
import { KvmSystem, MemfdMapping, decodeRegs, decodeSregs, encodeRegs, encodeSregs } from '@tsvm/kvm-backend';
import { Monitor, allow } from '@tsvm/monitor';
import { createRequire } from 'node:module';
import { interleave, ratios, spread, type Spread } from './stats.js';
import { tsPathBench } from './ts-path.js';

const here = dirname(fileURLToPath(import.meta.url));
const RAM = 2 * 1024 * 1024;
const REPS = Number(process.env.TSVM_BENCH_REPS ?? 7);
const N = Number(process.env.TSVM_BENCH_EXITS ?? 20000);
const CYCLES = Number(process.env.TSVM_BENCH_CYCLES ?? 200);
const MACHINES = Number(process.env.TSVM_BENCH_MACHINES ?? 100);
const PROBE_HITS = Number(process.env.TSVM_BENCH_PROBE_HITS ?? 300);
/** One line of results: figures with their spread, targets as plain numbers. */
type BenchLine = Record<string, number | Spread>;

function guestSource(kind: 'pio' | 'mmio', ring: 0 | 3): string {
  const body = kind === 'pio' ? 'mov dx, 0x500\n l: out dx, al' : 'mov rbx, 0xd0000000\n l: mov dword ptr [rbx], eax';
  // Both end with a write to port 0xf4 (the C loop's and tsvm's stop signal).
  return `mov ecx, ${N}\n ${body}\n dec ecx\n jnz l\n mov dx, 0xf4\n out dx, al\n ${ring === 0 ? 'hlt' : 'spin: jmp spin'}`;
}

async function prepare(kind: 'pio' | 'mmio', ring: 0 | 3): Promise<Machine> {
  const vm = await Machine.create({ memory: RAM });
  vm.io.register({ port: 0x500, size: 1 }, { name: 'sink', write: () => {} });
  vm.mmio.register({ address: 0xd0000000n, size: 4096 }, { name: 'mmio-sink', write: () => {} });
  vm.io.register({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  vm.loadFlat(await asm(guestSource(kind, ring), { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring });
  return vm;
}

/** One tsvm run of the exit guest: ns per exit. `monitored` attaches a Monitor with one allowing mediate hook on the loop's device. */
async function tsvmOnce(kind: 'pio' | 'mmio', ring: 0 | 3, monitored: boolean): Promise<number> {
  const vm = await prepare(kind, ring);
  try {
    if (monitored) {
      const mon = new Monitor(vm, { name: 'bench' });
      if (kind === 'pio') mon.mediate({ event: 'pio', ports: [0x500, 0x500] }, () => allow(), { name: 'allow-pio' });
      else mon.mediate({ event: 'mmio', range: [0xd0000000, 0xd0000fff] }, () => allow(), { name: 'allow-mmio' });
      mon.seal();
    }
    const stop = await vm.run({ timeout: 60_000 });
    if (stop.reason !== 'debug-exit') throw new Error(`bench guest stopped with ${stop.reason}`);
    return (stop.elapsedMs * 1e6) / stop.exits;
  } finally {
    await vm.close();
  }
}

/** Writes tsvm's exact initial state for the guest (memory image, kvm_regs, kvm_sregs) into `dir`. */
async function dumpState(dir: string, kind: 'pio' | 'mmio', ring: 0 | 3): Promise<void> {
  const vm = await prepare(kind, ring);
  try {
    writeFileSync(join(dir, 'mem.bin'), vm.memory.read(0, RAM));
    const regs = new Uint8Array(144); encodeRegs(vm.vcpu(0).getRegs(), regs);
    // KVM on SVM reports TR as busy on KVM_GET_SREGS whatever was set (a workaround in
    // svm_get_segment); tsvm enters SVM guests with an *available* TSS (QEMU's emulated AMD
    // ignores the I/O bitmap of a busy one), so hand C the type tsvm really set.
    const s = vm.vcpu(0).getSregs();
    const dumped = { ...s, tr: { ...s.tr, type: vm.capabilities.flavour === 'svm' ? 9 : s.tr.type } };
    const sregs = new Uint8Array(312); encodeSregs(dumped, sregs);
    writeFileSync(join(dir, 'regs.bin'), regs);
    writeFileSync(join(dir, 'sregs.bin'), sregs);
  } finally {
    await vm.close();
  }
}

/** The C loop on tsvm's exact initial state for the same guest: ns per exit. */
async function cOnce(cBin: string, dir: string, kind: 'pio' | 'mmio', ring: 0 | 3): Promise<number> {
  await dumpState(dir, kind, ring);
  const out = JSON.parse(execFileSync(cBin, [join(dir, 'mem.bin'), join(dir, 'regs.bin'), join(dir, 'sregs.bin'), String(RAM)], { encoding: 'utf8' })) as { exits: number; ns: number };
  return out.ns / out.exits;
}

let rawSystem: KvmSystem | undefined;
/**
 * The floor for any Node VMM on this host: kvm-backend's `KvmVcpu.run()` (one koffi KVM_RUN and
 * the exit decode) in a loop that handles nothing, on the state `cOnce` dumped: ns per exit.
 * What it adds over C is the price of calling KVM from Node at all (FFI, and a JS process's
 * larger footprint around each world switch), which no TypeScript-side work can remove.
 */
async function rawOnce(dir: string, kind: 'pio' | 'mmio', ring: 0 | 3, cLoop?: CLoop): Promise<number> {
  await dumpState(dir, kind, ring);
  const sys = (rawSystem ??= KvmSystem.open());
  const vm = sys.createVm();
  const mem = MemfdMapping.create(RAM);
  try {
    if (sys.checkExtension(KVM_CAP_SET_TSS_ADDR) > 0) vm.setTssAddr(0xfffbd000);
    mem.bytes.set(readFileSync(join(dir, 'mem.bin')));
    vm.setUserMemoryRegion(0, 0n, RAM, mem.hostAddress);
    const v = vm.createVcpu(0);
    try {
      v.setCpuid(sys.supportedCpuid());
      v.setSregs(decodeSregs(new Uint8Array(readFileSync(join(dir, 'sregs.bin')))));
      v.setRegs(decodeRegs(new Uint8Array(readFileSync(join(dir, 'regs.bin')))));
      if (cLoop) {
        const ns: [bigint | number] = [0n];
        const exits = cLoop.run(v.fd, sys.vcpuMmapSize(), ns);
        if (exits <= 0) throw new Error(`C loop in Node: ${exits}`);
        return Number(ns[0]) / exits;
      }
      let exits = 0;
      const t0 = process.hrtime.bigint();
      for (;;) {
        const e = v.run();
        exits++;
        if (e.kind === 'io' && e.port === 0xf4) break;
        if (e.kind !== 'io' && e.kind !== 'mmio') throw new Error(`raw loop: unexpected exit ${e.kind}`);
      }
      return Number(process.hrtime.bigint() - t0) / exits;
    } finally {
      v.close();
    }
  } finally {
    vm.close();
    mem.close();
  }
}
const KVM_CAP_SET_TSS_ADDR = 4;

/** `exitloop_run` of bench/exitloop.c built as a library: the C loop on a vCPU this process set up. */
interface CLoop { run(vcpuFd: number, mmapSize: number, ns: [bigint | number]): number }
function loadCLoop(lib: string): CLoop {
  const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  const fn = koffi.load(lib).func('long exitloop_run(int vcpu, int mmap_size, _Out_ unsigned long long *ns)');
  return { run: (fd, size, ns) => Number(fn(fd, size, ns)) };
}

/**
 * C loop, tsvm and tsvm + Monitor, interleaved round by round (one warm-up round discarded).
 * Ratios are taken per round (runs next to each other in time), then summarised, so a slow
 * patch of the shared host moves both sides of a ratio together.
 */
async function exitBench(cBin: string, cLoop: CLoop, dir: string, kind: 'pio' | 'mmio', ring: 0 | 3): Promise<BenchLine> {
  const r = await interleave(REPS, {
    c: () => cOnce(cBin, dir, kind, ring),
    cInNode: () => rawOnce(dir, kind, ring, cLoop),
    floor: () => rawOnce(dir, kind, ring),
    tsvm: () => tsvmOnce(kind, ring, false),
    monitored: () => tsvmOnce(kind, ring, true),
  });
  return {
    cNsPerExit: spread(r.c), cInNodeNsPerExit: spread(r.cInNode), floorNsPerExit: spread(r.floor), tsvmNsPerExit: spread(r.tsvm), monitoredNsPerExit: spread(r.monitored),
    cInNodeRatio: spread(ratios(r.cInNode, r.c)), floorRatio: spread(ratios(r.floor, r.c)), ratio: spread(ratios(r.tsvm, r.c)), monitoredRatio: spread(ratios(r.monitored, r.c)),
    target: 1.03, monitoredTarget: 1.05,
  };
}

/**
 * `exec` hook through the VMM-side probe at CPL3: per hit, (run with the hook − same run
 * without) / hits, interleaved with a PIO-exit run at CPL3 to price it in exits.
 */
async function probeBench(): Promise<BenchLine> {
  const hits = PROBE_HITS;
  const head = await asm('mov ebx, 1', { bits: 64, address: 0x1000 });
  const src = `mov ebx, ${hits}\n l: nop\n nop\n nop\n dec ebx\n jnz l\n mov dx, 0xf4\n out dx, al\n spin: jmp spin`;
  const code = await asm(src, { bits: 64, address: 0x1000 });
  const once = async (hooked: boolean): Promise<number> => {
    const vm = await Machine.create({ memory: RAM });
    try {
      vm.io.register({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
      vm.loadFlat(code, { at: 0x1000, mode: 'long', ring: 3 });
      let seen = 0;
      if (hooked) {
        const mon = new Monitor(vm, { name: 'bench-probe' });
        const h = mon.observe({ event: 'exec', address: 0x1000 + head.length, cpl: 3 }, () => { seen++; });
        if (h.mechanism !== 'probe-breakpoint') throw new Error(`exec at CPL3 picked ${h.mechanism}, not the probe`);
      }
      const stop = await vm.run({ timeout: 60_000 });
      if (stop.reason !== 'debug-exit') throw new Error(`probe guest stopped with ${stop.reason}`);
      if (hooked && seen !== hits) throw new Error(`probe saw ${seen} of ${hits} hits`);
      return stop.elapsedMs * 1e6;
    } finally {
      await vm.close();
    }
  };
  const r = await interleave(REPS, { hooked: () => once(true), plain: () => once(false), pio: () => tsvmOnce('pio', 3, false) });
  const perHit = r.hooked.map((h, i) => (h - (r.plain[i] as number)) / hits);
  return { nsPerHit: spread(perHit), pioExitNs: spread(r.pio), ratio: spread(ratios(perHit, r.pio)), hits, target: 2.5 };
}

/** create → load 4 KiB → run to hlt → close, with the time of each step. */
/**
 * Back to back, as a test suite creates them: a closed plain machine's VM is kept, wiped, for
 * the next create (`KvmBackend`; `TSVM_RECYCLE_VM=0` measures fresh VMs). `fromKeptVm` is the
 * share of measured creates that got one.
 */
async function lifecycleBench(): Promise<BenchLine> {
  const code = await asm('hlt', { bits: 16 });
  const image = new Uint8Array(4096); image.set(code);
  const parts = { create: [] as number[], load: [] as number[], run: [] as number[], close: [] as number[], total: [] as number[] };
  const backend = kvmBackend();
  let kept0 = 0;
  for (let i = 0; i < CYCLES; i++) {
    if (i === Math.min(20, Math.floor(CYCLES / 10))) kept0 = backend.recycledVms;
    const t0 = performance.now();
    const vm = await Machine.create({ memory: RAM });
    const t1 = performance.now();
    vm.loadFlat(image, { at: 0x1000 });
    const t2 = performance.now();
    const s = await vm.run({ timeout: 5000 });
    const t3 = performance.now();
    await vm.close();
    const t4 = performance.now();
    if (s.reason !== 'halt') throw new Error(`lifecycle guest stopped with ${s.reason}`);
    if (i < Math.min(20, Math.floor(CYCLES / 10))) continue; // warm-up
    parts.create.push(t1 - t0); parts.load.push(t2 - t1); parts.run.push(t3 - t2); parts.close.push(t4 - t3); parts.total.push(t4 - t0);
  }
  const fromKeptVm = (backend.recycledVms - kept0) / Math.max(1, parts.total.length);
  return { totalMs: spread(parts.total), createMs: spread(parts.create), loadMs: spread(parts.load), runMs: spread(parts.run), closeMs: spread(parts.close), fromKeptVm, targetMs: 1 };
}

async function memoryBench(): Promise<BenchLine> {
  const code = await asm('hlt', { bits: 16 });
  globalThis.gc?.();
  const rss0 = process.memoryUsage().rss;
  const vms: Machine[] = [];
  for (let i = 0; i < MACHINES; i++) {
    const vm = await Machine.create({ memory: RAM });
    vm.loadFlat(code, { at: 0x1000 });
    await vm.run({ timeout: 5000 });
    vms.push(vm);
  }
  globalThis.gc?.();
  const per = (process.memoryUsage().rss - rss0) / MACHINES;
  for (const vm of vms) await vm.close();
  // Pages the guest touched: the one code page plus the host-built tables (none in real mode).
  const touched = 4096;
  return { rssPerMachineKiB: per / 1024, guestTouchedKiB: touched / 1024, overheadKiB: (per - touched) / 1024, targetKiB: 1024 };
}

/** `median [min–max]` for spreads, the number itself otherwise (table cells). */
function cell(v: number | Spread): string | number {
  if (typeof v === 'number') return Number(v.toFixed(3));
  const d = Math.abs(v.median) >= 100 ? 0 : 3;
  return `${v.median.toFixed(d)} [${v.min.toFixed(d)}–${v.max.toFixed(d)}]`;
}

async function main(): Promise<number> {
  const results: Record<string, BenchLine> = {};
  const record = (name: string, r: BenchLine): void => {
    results[name] = r;
    console.error(`bench: ${name} ${JSON.stringify(r)}`);
  };
  // TSVM_BENCH_ONLY=pio-exit-ring3,idle-machine-memory runs a subset.
  const only = process.env.TSVM_BENCH_ONLY?.split(',');
  const want = (name: string): boolean => only === undefined || only.includes(name);
  // Needs no KVM: the TypeScript part of one exit on the mock backend, plus one koffi ioctl.
  let tsParts: Record<string, Spread> | undefined;
  if (want('ts-exit-path')) { const t = await tsPathBench(REPS); record('ts-exit-path', t.line); tsParts = t.parts; }
  let kvm = true;
  try {
    await (await Machine.create({ memory: RAM })).close();
  } catch (e) {
    if (!(e instanceof KvmUnavailableError)) throw e;
    console.error(`\n***** bench (foundation) KVM lines SKIPPED: ${e.message} *****\n`);
    kvm = false;
  }
  if (kvm) {
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-bench-'));
    const cBin = join(dir, 'exitloop');
    execFileSync('cc', ['-O2', '-o', cBin, join(here, 'exitloop.c')]);
    const cLib = join(dir, 'exitloop.so');
    execFileSync('cc', ['-O2', '-shared', '-fPIC', '-DEXITLOOP_LIB', '-o', cLib, join(here, 'exitloop.c')]);
    const cLoop = loadCLoop(cLib);
    for (const kind of ['pio', 'mmio'] as const) for (const ring of [0, 3] as const) if (want(`${kind}-exit-ring${ring}`)) record(`${kind}-exit-ring${ring}`, await exitBench(cBin, cLoop, dir, kind, ring));
    if (want('probe-exec-cpl3')) record('probe-exec-cpl3', await probeBench());
    if (want('create-load-run-close')) record('create-load-run-close', await lifecycleBench());
    if (want('idle-machine-memory')) record('idle-machine-memory', await memoryBench());
  }
  console.log(`median [min–max] of ${REPS} interleaved rounds (ns unless the column says otherwise)`);
  console.table(Object.fromEntries(Object.entries(results).map(([k, v]) => [k, Object.fromEntries(Object.entries(v).filter(([a]) => a !== 'parts').map(([a, b]) => [a, cell(b)]))])));
  if (tsParts) {
    console.log('ts-exit-path, per part (ns per exit; hooks = handleExitMonitored − handleExit):');
    console.table(Object.fromEntries(Object.entries(tsParts).map(([k, v]) => [k, { ns: cell(v) }])));
  }
  mkdirSync('bench-results', { recursive: true });
  const json = JSON.stringify({ date: new Date().toISOString(), reps: REPS, exits: N, cycles: CYCLES, machines: MACHINES, probeHits: PROBE_HITS, results, tsExitParts: tsParts }, null, 2);
  writeFileSync('bench-results/foundation.json', json);
  return 0;
}

process.exitCode = await main();
