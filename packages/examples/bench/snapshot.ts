/**
 * `pnpm bench:snapshot`: what disposable machines cost on this host, against issue 11's targets
 * (TinyKVM / Firecracker anchors): fork of a 16 MiB guest ≤ 200 µs, reset after 4 dirty pages
 * ≤ 20 µs, restore of 16 MiB to its first instruction ≤ 2 ms; plus snapshot time and size.
 * Each figure is the median of ≥ 5 rounds (min–max shown). Prints a table and writes
 * bench-results/snapshot.json.
 * @module
 */
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, Snapshot, kvmBackend, type Device, type DeviceMapping } from '@tsvm/core';
import { asm } from '@tsvm/core/testing';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const ROUNDS = Number(process.env.TSVM_BENCH_ROUNDS ?? 7);
const RESETS = 200;

// Ring 3, long mode, a loop: dirty 4 pages, then a debug-exit (port 0xf4). The template runs
// one round before it is snapshotted, so the CPU's accessed/dirty bits in the host-built page
// tables and GDT are already set and each later round dirties exactly the 4 data pages.
const program = `
  top:
  inc rax
  mov rbx, 0x400000
  mov qword ptr [rbx], rax
  mov qword ptr [rbx + 0x1000], rax
  mov qword ptr [rbx + 0x2000], rax
  mov qword ptr [rbx + 0x3000], rax
  mov dx, 0xf4
  out dx, al
  jmp top`;

const exitDev: Device = { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) };
const devices: DeviceMapping[] = [{ range: { port: 0xf4, size: 1 }, device: exitDev }];

interface Figure { name: string; unit: string; median: number; min: number; max: number; n: number; target?: number }
const stats = (name: string, unit: string, xs: number[], target?: number): Figure => {
  const s = [...xs].sort((a, b) => a - b);
  return { name, unit, median: s[Math.floor(s.length / 2)] as number, min: s[0] as number, max: s.at(-1) as number, n: s.length, ...(target === undefined ? {} : { target }) };
};
const us = (t0: number) => (performance.now() - t0) * 1000;

async function main(): Promise<void> {
  const backend = kvmBackend();
  const dir = mkdtempSync(join(tmpdir(), 'tsvm-bench-snap-'));
  const figures: Figure[] = [];
  try {
    const vm = await Machine.create({ memory: SIZE, name: 'template' });
    vm.attachDevice(devices);
    // A guest that has touched a quarter of its RAM (what a booted sandbox might have), the rest zero.
    const fill = new Uint8Array(4 * MiB);
    for (let i = 0; i < fill.length; i += 64) fill[i] = (i >>> 6) & 0xff | 1;
    vm.memory.write(0x800000, fill);
    vm.loadFlat(await asm(program, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    if ((await vm.run({ timeout: 5000 })).reason !== 'debug-exit') throw new Error('template did not reach its first exit');

    const snapTimes: number[] = [];
    let snap: Snapshot | undefined;
    for (let i = 0; i < ROUNDS; i++) {
      snap?.close();
      const t0 = performance.now();
      snap = await vm.snapshot();
      snapTimes.push(us(t0));
    }
    if (!snap) throw new Error('no snapshot');
    figures.push(stats('snapshot of 16 MiB (4 MiB touched), in memory', 'µs', snapTimes));
    const file = join(dir, 'bench.tsvm');
    const saveTimes: number[] = [];
    for (let i = 0; i < Math.min(ROUNDS, 5); i++) { const t0 = performance.now(); snap.save(file); saveTimes.push(us(t0)); }
    figures.push(stats('snapshot save to a file', 'µs', saveTimes));
    const loadTimes: number[] = [];
    for (let i = 0; i < Math.min(ROUNDS, 5); i++) { const t0 = performance.now(); Snapshot.load(file, backend).close(); loadTimes.push(us(t0)); }
    figures.push(stats('snapshot load from a file', 'µs', loadTimes));
    const st = statSync(file);
    const size = { guestRam: SIZE, storedBytes: snap.storedBytes, fileLength: st.size, fileAllocated: st.blocks * 512 };
    await vm.close();

    // Warm-up: the first machine of a process pays for koffi and JIT.
    for (let i = 0; i < 3; i++) await (await Machine.fork(snap, { devices })).close();

    const forkTimes: number[] = [];
    const restoreToRun: number[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      let t0 = performance.now();
      const child = await Machine.fork(snap, { devices });
      forkTimes.push(us(t0));
      await child.close();
      t0 = performance.now();
      const r = await Machine.restore(snap, { devices });
      const stop = await r.run({ timeout: 5000 });
      restoreToRun.push(us(t0));
      if (stop.reason !== 'debug-exit') throw new Error(`unexpected stop ${stop.reason}`);
      await r.close();
    }
    figures.push(stats('fork of a 16 MiB guest (Machine.fork)', 'µs', forkTimes, 200));
    figures.push(stats('restore 16 MiB + run to its next exit', 'µs', restoreToRun, 2000));

    // With a warm pool (Snapshot.prewarm): VM creation happens between forks, off their path.
    snap.prewarm(2);
    const warm: number[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      await new Promise((r) => setTimeout(r, 5)); // let the pool refill
      const t1 = performance.now();
      const child = await Machine.fork(snap, { devices });
      warm.push(us(t1));
      await child.close();
    }
    snap.prewarm(0);
    figures.push(stats('fork of a 16 MiB guest, warm VM pool', 'µs', warm, 200));

    // Many children at once: they share the snapshot's pages.
    const many: Machine[] = [];
    const t0 = performance.now();
    for (let i = 0; i < 32; i++) many.push(await Machine.fork(snap, { devices }));
    const per = us(t0) / 32;
    for (const m of many) await m.close();
    figures.push(stats('fork ×32 in one process, per child', 'µs', [per]));

    const child = await Machine.fork(snap, { devices });
    const resetTimes: number[] = [];
    let copied = 0;
    for (let i = 0; i < RESETS; i++) {
      const stop = await child.run({ timeout: 5000 });
      if (stop.reason !== 'debug-exit') throw new Error(`unexpected stop ${stop.reason}`);
      const t1 = performance.now();
      copied = child.reset().pagesCopied;
      resetTimes.push(us(t1));
    }
    await child.close();
    figures.push(stats(`reset after ${copied} dirty pages (full vCPU + VM state)`, 'µs', resetTimes, 20));

    const rows = figures.map((f) => `| ${f.name} | ${f.median.toFixed(1)} ${f.unit} | ${f.min.toFixed(1)}–${f.max.toFixed(1)} | ${f.n} | ${f.target === undefined ? '' : `≤ ${f.target} ${f.unit}${f.median <= f.target ? ' ✓' : ' ✗'}`} |`);
    console.log(`\n## snapshot / fork / reset (${backend.capabilities.flavour}, ${new Date().toISOString()})\n`);
    console.log('| figure | median | min–max | n | target |\n|---|---|---|---|---|');
    console.log(rows.join('\n'));
    console.log(`\nsize: guest RAM ${SIZE / MiB} MiB, stored ${(size.storedBytes / MiB).toFixed(2)} MiB (${((100 * size.storedBytes) / SIZE).toFixed(1)} %), file ${(size.fileLength / MiB).toFixed(2)} MiB long, ${(size.fileAllocated / MiB).toFixed(2)} MiB allocated on disk`);
    mkdirSync('bench-results', { recursive: true });
    writeFileSync('bench-results/snapshot.json', JSON.stringify({ date: new Date().toISOString(), flavour: backend.capabilities.flavour, figures, size }, null, 2));
    snap.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
