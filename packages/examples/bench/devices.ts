/**
 * `pnpm bench:devices`: throughput of tsvm's devices driven by a real in-guest driver, each against
 * a baseline measured in the same run. Prints a table and writes JSON to bench-results/devices.json.
 *
 * - uart-tx: bytes/s of guest output through `Uart16550` (COM1, polling LSR.THRE before every
 *   byte, as an early console does) into a host sink, vs QEMU's 16550A on the *same guest file*.
 * - blk-rand-4k / blk-seq: 4 KiB random-read IOPS and sequential-read MB/s of a file-backed
 *   `VirtioBlock` behind `VirtioMmio`, vs plain pread() of the same file doing the same reads.
 *   QEMU has no virtio-mmio on `-M pc` (only on `microvm`, with another boot path), so no QEMU here.
 * - rng: MB/s from `VirtioRng`, vs `crypto.randomFillSync` (its entropy source) in the same sizes.
 *
 * One guest image (bench/guest/, multiboot + its own switch to long mode) serves every workload;
 * the multiboot command line picks one. tsvm boots it with `loadMultiboot` + `Machine.enter`, QEMU
 * with `-kernel`: the same file, the same loader protocol, the same 32-bit entry.
 *
 * How time is measured, and why: the guest reads the TSC right before and after the measured loop
 * and reports the difference on COM1. That excludes what differs between the VMMs but is not
 * device work (QEMU's process start-up and SeaBIOS, tsvm's Machine.create), and is the same
 * clock for both. KVM guests see the host TSC plus an offset (neither VMM scales it), so cycles
 * become seconds with the host TSC rate, calibrated here by devices-host.c. Ratios between the two
 * VMMs do not depend on that rate at all. As a cross-check the guest time must fit inside the host's
 * wall time of the same run (tsvm `Stop.elapsedMs`, QEMU process lifetime); a warning says if not.
 * Host baselines are timed on the host (CLOCK_MONOTONIC_RAW / performance.now()).
 *
 * Knobs (sizes take K/M suffixes): TSVM_BENCH_REPS (3; median of the runs),
 * TSVM_BENCH_ONLY (uart,blk,rng), TSVM_BENCH_UART_BYTES (1M), TSVM_BENCH_UART_LINE (64 bytes per
 * line, 0 = no newlines), TSVM_BENCH_BLK_DISK (64M), TSVM_BENCH_BLK_REQUESTS (20000 random reads),
 * TSVM_BENCH_BLK_SEQ_SIZE (64K per sequential request), TSVM_BENCH_BLK_SEQ_BYTES (0 = whole disk),
 * TSVM_BENCH_BLK_QD (1 request per kick), TSVM_BENCH_RNG_BYTES (16M), TSVM_BENCH_RNG_REQUEST (4K),
 * TSVM_BENCH_RNG_QD (1), TSVM_BENCH_DIR (where the disk file goes; os.tmpdir()),
 * TSVM_BENCH_QEMU (binary; 0 = no QEMU), TSVM_BENCH_TIMEOUT_MS (600000 per guest run).
 *
 * Exit status: 0 done (or skipped loudly: no /dev/kvm, no C compiler), 1 a guest reported an
 * error, a device misbehaved, a run failed or a knob is invalid.
 * @module
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { KvmUnavailableError, loadMultiboot, Machine, type Stop } from '@tsvm/core';
import { DebugExit, Uart16550, VirtioBlock, VirtioMmio, VirtioRng, type VirtioDevice } from '@tsvm/devices';
import { buildBenchGuest, buildHostHelper, compiler, field, SECTOR, SerialCapture, writeBenchDisk } from './devices-guest.js';
import { detectQemu, type QemuInfo, runQemu } from './devices-qemu.js';

const run = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
/** Guest RAM for tsvm: image at 1 MiB, rings at 2 MiB, data buffers at 4–6 MiB (guest/bench.c). */
const GUEST_RAM = 16 * MiB;
/** Where the virtio-mmio window goes (`VIRTIO_BASE` in the device tests' guest.h). */
const VIRTIO_BASE = 0xd000_0000n;
/** xorshift seed of the random reads; any non-zero value, the same for guest and host. */
const SEED = '88172645463325252';
const DATA_LIMIT = 2 * MiB;
const MAX_QD = 64;

function knobInt(name: string, def: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const m = /^(\d+)([kKmM]?)$/.exec(raw.trim());
  if (!m) throw new Error(`${name}=${raw}: expected a non-negative integer (K/M suffix allowed)`);
  const scale = m[2] === '' ? 1 : /k/i.test(m[2] as string) ? KiB : MiB;
  return Number(m[1]) * scale;
}

function knobs() {
  const k = {
    reps: knobInt('TSVM_BENCH_REPS', 3),
    only: (process.env.TSVM_BENCH_ONLY ?? 'uart,blk,rng').split(',').map((s) => s.trim()).filter(Boolean),
    uartBytes: knobInt('TSVM_BENCH_UART_BYTES', MiB),
    uartLine: knobInt('TSVM_BENCH_UART_LINE', 64),
    blkDisk: knobInt('TSVM_BENCH_BLK_DISK', 64 * MiB),
    blkRequests: knobInt('TSVM_BENCH_BLK_REQUESTS', 20_000),
    blkSeqSize: knobInt('TSVM_BENCH_BLK_SEQ_SIZE', 64 * KiB),
    blkSeqBytes: knobInt('TSVM_BENCH_BLK_SEQ_BYTES', 0),
    blkQd: knobInt('TSVM_BENCH_BLK_QD', 1),
    rngBytes: knobInt('TSVM_BENCH_RNG_BYTES', 16 * MiB),
    rngRequest: knobInt('TSVM_BENCH_RNG_REQUEST', 4 * KiB),
    rngQd: knobInt('TSVM_BENCH_RNG_QD', 1),
    dir: process.env.TSVM_BENCH_DIR ?? tmpdir(),
    timeoutMs: knobInt('TSVM_BENCH_TIMEOUT_MS', 600_000),
  };
  // The guest checks these too (and fails with a message); refusing early is friendlier.
  const bad = (cond: boolean, what: string): void => { if (cond) throw new Error(`invalid knob: ${what}`); };
  bad(k.reps < 1, 'TSVM_BENCH_REPS must be >= 1');
  for (const o of k.only) bad(!['uart', 'blk', 'rng'].includes(o), `TSVM_BENCH_ONLY: unknown workload '${o}'`);
  bad(k.uartBytes < 1, 'TSVM_BENCH_UART_BYTES must be >= 1');
  bad(k.blkDisk < 4 * KiB || k.blkDisk % (4 * KiB) !== 0, 'TSVM_BENCH_BLK_DISK must be a non-zero multiple of 4K');
  bad(k.blkQd < 1 || k.blkQd > MAX_QD, `TSVM_BENCH_BLK_QD must be 1..${MAX_QD}`);
  bad(k.blkSeqSize < SECTOR || k.blkSeqSize % SECTOR !== 0 || k.blkSeqSize * k.blkQd > DATA_LIMIT || k.blkSeqSize > k.blkDisk,
    'TSVM_BENCH_BLK_SEQ_SIZE must be a multiple of 512, at most the disk, and QD × size <= 2M');
  bad(k.blkSeqBytes > k.blkDisk, 'TSVM_BENCH_BLK_SEQ_BYTES must not exceed the disk');
  bad(k.rngQd < 1 || k.rngQd > MAX_QD, `TSVM_BENCH_RNG_QD must be 1..${MAX_QD}`);
  bad(k.rngRequest < 16 || k.rngRequest > 64 * KiB || k.rngRequest % 8 !== 0 || k.rngRequest * k.rngQd > DATA_LIMIT,
    'TSVM_BENCH_RNG_REQUEST must be 16..64K, a multiple of 8, and QD × size <= 2M');
  bad(k.rngBytes < k.rngRequest || k.rngBytes % k.rngRequest !== 0, 'TSVM_BENCH_RNG_BYTES must be a non-zero multiple of TSVM_BENCH_RNG_REQUEST');
  return k;
}

type Knobs = ReturnType<typeof knobs>;

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
};

function describeStop(stop: Stop): string {
  return JSON.stringify(stop, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v instanceof Error ? `${v.name}: ${v.message}` : v));
}

/** One tsvm run of the bench guest: result fields, exits and wall time. */
interface TsvmRun {
  readonly fields: Record<string, bigint>;
  readonly exits: number;
  readonly wallMs: number;
}

/**
 * Boots the bench guest on tsvm with COM1 → `capture`, debug-exit, and optionally a virtio device
 * (made by `makeDevice`, once the machine exists) at {@link VIRTIO_BASE}. The interrupt line is not wired: the guest polls with IF = 0, so no
 * KVM_IRQ_LINE cost is included (QEMU's 16550 is also polled here).
 * @throws Error unless the guest ended with debug-exit 0 and the transport never needed a reset.
 */
async function runTsvm(image: Uint8Array, cmdline: string, capture: SerialCapture, timeoutMs: number, makeDevice?: () => VirtioDevice): Promise<TsvmRun> {
  const vm = await Machine.create({ memory: GUEST_RAM, name: 'bench-devices' });
  try {
    const device = makeDevice?.();
    const uart = new Uart16550({ sink: (b) => capture.push(b) });
    vm.attachDevice(uart);
    vm.attachDevice(new DebugExit());
    const errors: string[] = [];
    const mmio = device ? new VirtioMmio({ device, memory: vm.memory, onError: (e) => void errors.push(e.message) }) : undefined;
    if (mmio) vm.attachDevice(mmio.mappings(VIRTIO_BASE));
    const loaded = loadMultiboot(vm.memory, image, { cmdline, avoid: vm.hostReserved() });
    vm.enter(loaded.entryState);
    const stop = await vm.run({ timeout: timeoutMs });
    uart.flush();
    if (stop.reason !== 'debug-exit' || stop.code !== 1) {
      const step = stop.reason === 'debug-exit' ? ` (guest failed at step ${(stop.code - 1) / 2})` : '';
      throw new Error(`tsvm: the guest stopped with ${describeStop(stop)}${step}\nguest console: ${capture.text().slice(-2000)}`);
    }
    if (mmio && (mmio.stats.needsReset !== 0 || errors.length > 0)) {
      throw new Error(`tsvm: ${device?.name} entered DEVICE_NEEDS_RESET: ${errors.join('; ')} (stats ${JSON.stringify(mmio.stats)})`);
    }
    return { fields: capture.result(), exits: stop.exits, wallMs: stop.elapsedMs };
  } finally {
    await vm.close();
  }
}

/** Context shared by the workloads. */
interface Ctx {
  readonly k: Knobs;
  readonly image: Uint8Array;
  readonly elfPath: string;
  readonly helper: string;
  readonly tscHz: number;
  readonly qemu: QemuInfo;
  readonly warnings: string[];
}

/** One row of the result: tsvm vs its baseline, plus what explains the figure. */
interface Result {
  readonly unit: string;
  readonly tsvm: number;
  readonly baseline: number | null;
  readonly baselineIs: string;
  /** tsvm ÷ baseline (higher is better for tsvm); null without a baseline. */
  readonly ratio: number | null;
  readonly details: Record<string, unknown>;
}

const seconds = (ctx: Ctx, cycles: number): number => cycles / ctx.tscHz;

/** The guest's own time must fit in the host's wall time of the same run, else the TSC rate is off. */
function checkClock(ctx: Ctx, what: string, guestS: number, wallMs: number): void {
  if (guestS * 1000 > wallMs * 1.02 + 1) {
    ctx.warnings.push(`${what}: the guest measured ${(guestS * 1000).toFixed(1)} ms inside a ${wallMs.toFixed(1)} ms run; the TSC rate (${ctx.tscHz} Hz) does not hold for the guest, so absolute figures are off (ratios between VMMs are not affected)`);
  }
}

async function uartBench(ctx: Ctx): Promise<Result> {
  const { uartBytes: n, uartLine: line, reps, timeoutMs } = ctx.k;
  const cmdline = `mode=uart bytes=${n} line=${line}`;
  const tsvm: number[] = [], qemu: number[] = [], exits: number[] = [], qemuWall: number[] = [];
  for (let i = 0; i < reps; i++) {
    // Interleaved, so drift in host load hits both VMMs alike.
    const cap = new SerialCapture({ mode: 'uart', payloadBytes: n, line });
    const t = await runTsvm(ctx.image, cmdline, cap, timeoutMs);
    if (field(t.fields, 'bytes') !== n) throw new Error(`tsvm: the guest reports ${t.fields.bytes} bytes sent, asked for ${n}`);
    const s = seconds(ctx, field(t.fields, 'cycles'));
    checkClock(ctx, 'uart (tsvm)', s, t.wallMs);
    tsvm.push(n / s);
    exits.push(t.exits);
    if (ctx.qemu.available) {
      const qcap = new SerialCapture({ mode: 'uart', payloadBytes: n, line });
      const q = await runQemu(ctx.qemu, ctx.elfPath, cmdline, qcap, timeoutMs);
      const f = qcap.result();
      if (field(f, 'bytes') !== n) throw new Error(`QEMU: the guest reports ${f.bytes} bytes sent, asked for ${n}`);
      const qs = seconds(ctx, field(f, 'cycles'));
      checkClock(ctx, 'uart (QEMU)', qs, q.wallMs);
      qemu.push(n / qs);
      qemuWall.push(q.wallMs);
    }
  }
  const t = median(tsvm), q = ctx.qemu.available ? median(qemu) : null;
  return {
    unit: 'bytes/s', tsvm: t, baseline: q,
    baselineIs: ctx.qemu.available ? `QEMU -accel ${ctx.qemu.accel}, same guest file` : `none (${ctx.qemu.reason})`,
    ratio: q === null ? null : t / q,
    details: {
      bytes: n, lineLength: line, tsvmUsPerByte: 1e6 / t, qemuUsPerByte: q === null ? null : 1e6 / q,
      tsvmExitsPerByte: median(exits) / n, qemuWallMs: qemuWall, samples: { tsvm, qemu },
    },
  };
}

async function blkBench(ctx: Ctx): Promise<Result[]> {
  const { blkDisk, blkRequests, blkSeqSize, blkSeqBytes, blkQd, reps, timeoutMs } = ctx.k;
  const dir = mkdtempSync(join(ctx.k.dir, 'tsvm-bench-disk-'));
  try {
    const disk = join(dir, 'disk.img');
    writeBenchDisk(disk, blkDisk);
    const cmdline = `mode=blk requests=${blkRequests} qd=${blkQd} seqsize=${blkSeqSize} seqbytes=${blkSeqBytes} seed=${SEED}`;
    const rand: number[] = [], seq: number[] = [], exits: number[] = [], hostRand: number[] = [], hostSeq: number[] = [];
    let seqBytes = 0, seqRequests = 0;
    for (let i = 0; i < reps; i++) {
      const cap = new SerialCapture({ mode: 'blk', payloadBytes: 0, line: 0 });
      const t = await runTsvm(ctx.image, cmdline, cap, timeoutMs, () => new VirtioBlock({ path: disk, readonly: true }));
      if (field(t.fields, 'capacity') !== blkDisk / SECTOR) throw new Error(`virtio-blk: the guest sees ${t.fields.capacity} sectors, the disk has ${blkDisk / SECTOR}`);
      if (field(t.fields, 'rand_requests') !== blkRequests) throw new Error(`virtio-blk: the guest did ${t.fields.rand_requests} random reads, asked for ${blkRequests}`);
      const rs = seconds(ctx, field(t.fields, 'rand_cycles')), ss = seconds(ctx, field(t.fields, 'seq_cycles'));
      checkClock(ctx, 'blk (tsvm)', rs + ss, t.wallMs);
      seqBytes = field(t.fields, 'seq_bytes');
      seqRequests = field(t.fields, 'seq_requests');
      rand.push(blkRequests / rs);
      seq.push(seqBytes / ss / 1e6);
      exits.push(t.exits);
      // The baseline: the same reads (same offsets, sizes, tag checks) as pread() on the same file.
      const { stdout } = await run(ctx.helper, ['pread', disk, String(blkRequests), SEED, String(blkSeqSize), String(seqBytes)], { timeout: timeoutMs });
      const h = JSON.parse(stdout) as { randNs: number; seqNs: number; seqRequests: number };
      if (h.seqRequests !== seqRequests) throw new Error(`host pread did ${h.seqRequests} sequential requests, the guest ${seqRequests}`);
      hostRand.push(blkRequests / (h.randNs / 1e9));
      hostSeq.push(seqBytes / (h.seqNs / 1e9) / 1e6);
    }
    // Exits per request of the whole run (set-up and the result line included): ~1 is one notify per request.
    const common = { diskBytes: blkDisk, queueDepth: blkQd, diskDir: ctx.k.dir, tsvmExitsPerRequest: median(exits) / (blkRequests + seqRequests) };
    const r = median(rand), hr = median(hostRand), s = median(seq), hs = median(hostSeq);
    return [
      {
        unit: 'IOPS', tsvm: r, baseline: hr, baselineIs: 'host pread() of the same file, same offsets (QD1)', ratio: r / hr,
        details: { ...common, requests: blkRequests, tsvmUsPerRequest: 1e6 / r, hostUsPerRequest: 1e6 / hr, samples: { tsvm: rand, host: hostRand } },
      },
      {
        unit: 'MB/s', tsvm: s, baseline: hs, baselineIs: `host pread() of the same file, ${blkSeqSize / KiB} KiB requests`, ratio: s / hs,
        details: { ...common, requestBytes: blkSeqSize, requests: seqRequests, bytes: seqBytes, samples: { tsvm: seq, host: hostSeq } },
      },
    ];
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function rngBench(ctx: Ctx): Promise<Result> {
  const { rngBytes, rngRequest, rngQd, reps, timeoutMs } = ctx.k;
  const cmdline = `mode=rng bytes=${rngBytes} size=${rngRequest} qd=${rngQd}`;
  const tsvm: number[] = [], host: number[] = [], exits: number[] = [];
  const buf = new Uint8Array(rngRequest);
  for (let i = 0; i < reps; i++) {
    const cap = new SerialCapture({ mode: 'rng', payloadBytes: 0, line: 0 });
    const t = await runTsvm(ctx.image, cmdline, cap, timeoutMs, () => new VirtioRng());
    if (field(t.fields, 'bytes') !== rngBytes) throw new Error(`virtio-rng: the guest got ${t.fields.bytes} bytes, asked for ${rngBytes}`);
    const s = seconds(ctx, field(t.fields, 'cycles'));
    checkClock(ctx, 'rng (tsvm)', s, t.wallMs);
    tsvm.push(rngBytes / s / 1e6);
    exits.push(t.exits);
    // The baseline: the device's own entropy source, same request size, same total.
    const t0 = performance.now();
    for (let done = 0; done < rngBytes; done += rngRequest) randomFillSync(buf);
    host.push(rngBytes / ((performance.now() - t0) / 1000) / 1e6);
  }
  const t = median(tsvm), h = median(host);
  return {
    unit: 'MB/s', tsvm: t, baseline: h, baselineIs: `host crypto.randomFillSync, ${rngRequest} B calls`, ratio: t / h,
    details: { bytes: rngBytes, requestBytes: rngRequest, queueDepth: rngQd, tsvmUsPerRequest: rngRequest / t, tsvmExitsPerRequest: median(exits) / (rngBytes / rngRequest), samples: { tsvm, host } },
  };
}

async function main(): Promise<number> {
  const k = knobs();
  try {
    await (await Machine.create({ memory: 2 * MiB })).close();
  } catch (e) {
    if (e instanceof KvmUnavailableError) {
      console.error(`bench:devices: SKIPPED — KVM is not available here: ${e.reason}. Nothing was measured.`);
      return 0;
    }
    throw e;
  }
  const cc = await compiler();
  if ('error' in cc) {
    console.error(`bench:devices: SKIPPED — no C compiler to build the bench guest: ${cc.error}. Nothing was measured.`);
    return 0;
  }
  const [elfPath, helper] = await Promise.all([buildBenchGuest(cc), buildHostHelper(cc)]);
  const { stdout } = await run(helper, ['tsc']);
  const tscHz = (JSON.parse(stdout) as { tscHz: number }).tscHz;
  const qemu = detectQemu();
  if (qemu.available) console.error(`bench:devices: QEMU ${qemu.version}, -accel ${qemu.accel} (${qemu.accelReason})`);
  else console.error(`bench:devices: *** no QEMU column: ${qemu.reason} ***`);
  console.error(`bench:devices: host TSC ${(tscHz / 1e6).toFixed(1)} MHz; ${k.reps} run(s) each, medians reported`);
  const ctx: Ctx = { k, image: new Uint8Array(readFileSync(elfPath)), elfPath, helper, tscHz, qemu, warnings: [] };

  const results: Record<string, Result> = {};
  const record = (name: string, r: Result): void => {
    results[name] = r;
    console.error(`bench:devices: ${name} tsvm ${r.tsvm.toPrecision(4)} ${r.unit}, baseline ${r.baseline?.toPrecision(4) ?? '–'} (${r.baselineIs})`);
  };
  if (k.only.includes('uart')) record('uart-tx', await uartBench(ctx));
  if (k.only.includes('blk')) {
    const [rand, seq] = await blkBench(ctx);
    record('blk-rand-4k', rand as Result);
    record('blk-seq', seq as Result);
  }
  if (k.only.includes('rng')) record('rng', await rngBench(ctx));

  const fmt = (x: number | null): string | number => (x === null ? '–' : Number(x.toPrecision(4)));
  console.table(Object.fromEntries(Object.entries(results).map(([name, r]) => [name, {
    unit: r.unit, tsvm: fmt(r.tsvm), baseline: fmt(r.baseline), 'tsvm ÷ baseline': fmt(r.ratio), 'baseline is': r.baselineIs,
  }])));
  if (qemu.available && qemu.accel === 'tcg') console.log('NOTE: QEMU ran under TCG (no usable /dev/kvm for it): the uart ratio compares KVM with an emulator.');
  for (const w of ctx.warnings) console.log(`WARNING: ${w}`);
  mkdirSync('bench-results', { recursive: true });
  const json = JSON.stringify({
    date: new Date().toISOString(),
    host: { tscHz, node: process.version, qemu: qemu.available ? { version: qemu.version, accel: qemu.accel, why: qemu.accelReason } : { skipped: qemu.reason } },
    knobs: k,
    timing: 'guest rdtsc around the measured loop / host TSC rate; baselines timed on the host',
    results,
    warnings: ctx.warnings,
  }, null, 2);
  writeFileSync('bench-results/devices.json', `${json}\n`);
  console.log('bench:devices: wrote bench-results/devices.json');
  return 0;
}

try {
  process.exitCode = await main();
} catch (e) {
  console.error(`bench:devices: FAILED: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
  process.exitCode = 1;
}
