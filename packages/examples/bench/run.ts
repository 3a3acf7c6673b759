/**
 * `pnpm bench`: tsvm's speed and memory targets, each measured against a baseline in the same
 * run. Prints a table and writes JSON to bench-results/foundation.json.
 *
 * - PIO / MMIO exit round trip through the full Machine.run path vs a minimal C KVM_RUN loop
 *   (bench/exitloop.c, built here with cc) running the *identical* guest state, ring 0 and 3.
 * - create → load 4 KiB → run to hlt → close latency.
 * - RSS growth per idle 2 MiB machine, over 100 machines.
 * @module
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, KvmUnavailableError } from '@tsvm/core';
import { asm } from '@tsvm/core/testing';
import { encodeRegs, encodeSregs } from '@tsvm/kvm-backend';

const here = dirname(fileURLToPath(import.meta.url));
const RAM = 2 * 1024 * 1024;
const REPS = Number(process.env.TSVM_BENCH_REPS ?? 5);
const N = Number(process.env.TSVM_BENCH_EXITS ?? 20000);
const CYCLES = Number(process.env.TSVM_BENCH_CYCLES ?? 200);
const MACHINES = Number(process.env.TSVM_BENCH_MACHINES ?? 100);
const median = (xs: number[]): number => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)] as number; };

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

async function exitBench(cBin: string, dir: string, kind: 'pio' | 'mmio', ring: 0 | 3): Promise<Record<string, number>> {
  const ts: number[] = [];
  const c: number[] = [];
  for (let i = 0; i < REPS; i++) {
    // Baseline: dump tsvm's exact initial state and let C run it.
    const vm = await prepare(kind, ring);
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
    const out = JSON.parse(execFileSync(cBin, [join(dir, 'mem.bin'), join(dir, 'regs.bin'), join(dir, 'sregs.bin'), String(RAM)], { encoding: 'utf8' })) as { exits: number; ns: number };
    c.push(out.ns / out.exits);
    const stop = await vm.run({ timeout: 60_000 });
    if (stop.reason !== 'debug-exit') throw new Error(`bench guest stopped with ${stop.reason}`);
    ts.push((stop.elapsedMs * 1e6) / stop.exits);
    await vm.close();
  }
  const t = median(ts), b = median(c);
  return { tsvmNsPerExit: t, cNsPerExit: b, ratio: t / b, target: 1.15 };
}

async function lifecycleBench(): Promise<Record<string, number>> {
  const code = await asm('hlt', { bits: 16 });
  const image = new Uint8Array(4096); image.set(code);
  const lat: number[] = [];
  for (let i = 0; i < CYCLES; i++) {
    const t0 = performance.now();
    const vm = await Machine.create({ memory: RAM });
    vm.loadFlat(image, { at: 0x1000 });
    const s = await vm.run({ timeout: 5000 });
    await vm.close();
    if (s.reason !== 'halt') throw new Error(`lifecycle guest stopped with ${s.reason}`);
    lat.push(performance.now() - t0);
  }
  return { medianMs: median(lat.slice(Math.min(20, Math.floor(CYCLES / 10)))), targetMs: 5 };
}

async function memoryBench(): Promise<Record<string, number>> {
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

async function main(): Promise<number> {
  try {
    await (await Machine.create({ memory: RAM })).close();
  } catch (e) {
    if (e instanceof KvmUnavailableError) { console.error(`\n***** bench (foundation) SKIPPED: ${e.message} *****\n`); return 0; }
    throw e;
  }
  const dir = mkdtempSync(join(tmpdir(), 'tsvm-bench-'));
  const cBin = join(dir, 'exitloop');
  execFileSync('cc', ['-O2', '-o', cBin, join(here, 'exitloop.c')]);
  const results: Record<string, Record<string, number>> = {};
  const record = (name: string, r: Record<string, number>): void => {
    results[name] = r;
    console.error(`bench: ${name} ${JSON.stringify(r)}`);
  };
  // TSVM_BENCH_ONLY=pio-exit-ring3,idle-machine-memory runs a subset.
  const only = process.env.TSVM_BENCH_ONLY?.split(',');
  const want = (name: string): boolean => only === undefined || only.includes(name);
  for (const kind of ['pio', 'mmio'] as const) for (const ring of [0, 3] as const) if (want(`${kind}-exit-ring${ring}`)) record(`${kind}-exit-ring${ring}`, await exitBench(cBin, dir, kind, ring));
  if (want('create-load-run-close')) record('create-load-run-close', await lifecycleBench());
  if (want('idle-machine-memory')) record('idle-machine-memory', await memoryBench());
  console.table(Object.fromEntries(Object.entries(results).map(([k, v]) => [k, Object.fromEntries(Object.entries(v).map(([a, b]) => [a, Number(b.toFixed(3))]))])));
  mkdirSync('bench-results', { recursive: true });
  const json = JSON.stringify({ date: new Date().toISOString(), reps: REPS, exits: N, cycles: CYCLES, machines: MACHINES, results }, null, 2);
  writeFileSync('bench-results/foundation.json', json);
  console.log(json);
  return 0;
}

process.exitCode = await main();
