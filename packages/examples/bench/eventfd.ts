/**
 * `pnpm bench:eventfd`: would `ioeventfd`/`irqfd` pay off in tsvm? With `KVM_IOEVENTFD` a guest's
 * virtio notify no longer exits: KVM signals an eventfd and the VMM must *notice* it. tsvm runs
 * the vCPU on Node's main thread, so it can notice in two ways, both measured here (no KVM
 * needed — the kernel side of an eventfd is the same):
 *
 * - **wake**: a read parked in libuv's thread pool (`fs.read` on the eventfd) completes and its
 *   callback runs on the event loop — how a device would learn of a notify while the vCPU runs
 *   its slice on the main thread. Latency from the signal to the callback.
 * - **poll**: a non-blocking `read()` through koffi at each exit or slice end — the cost of
 *   checking once, paid even when nothing was signalled.
 *
 * Compare with one PIO/MMIO exit round trip (`pnpm bench`; HOST-FACTS gives ~9–30 µs for a C
 * VMM). Prints a table and writes bench-results/eventfd.json.
 * @module
 */
import { read } from 'node:fs';
import { mkdirSync, writeFileSync } from 'node:fs';
import { libc } from '@tsvm/kvm-backend';

const N = Number(process.env.TSVM_BENCH_EVENTFD_N ?? 2000);
const EFD_NONBLOCK = 0o4000;
const EFD_CLOEXEC = 0o2000000;
const pct = (xs: number[], p: number): number => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(s.length * p))] as number; };

async function wakeLatency(): Promise<number[]> {
  const c = libc();
  const fd = c.eventfd(0, EFD_CLOEXEC);
  if (fd < 0) throw new Error('eventfd failed');
  const one = new Uint8Array(8);
  new DataView(one.buffer).setBigUint64(0, 1n, true);
  const buf = Buffer.alloc(8);
  const out: number[] = [];
  try {
    for (let i = 0; i < N; i++) {
      const done = new Promise<number>((resolve, reject) => read(fd, buf, 0, 8, null, (err) => (err ? reject(err) : resolve(performance.now()))));
      // Let the pool thread park in read() before signalling (as a running guest would later).
      await new Promise<void>((r) => setImmediate(r));
      const t0 = performance.now();
      if (c.write(fd, one, 8) !== 8) throw new Error('eventfd write failed');
      out.push(((await done) - t0) * 1000);
    }
  } finally {
    c.close(fd);
  }
  return out;
}

function pollCost(): { emptyNs: number; signalledNs: number } {
  const c = libc();
  const fd = c.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const buf = new Uint8Array(8);
  const one = new Uint8Array(8);
  new DataView(one.buffer).setBigUint64(0, 1n, true);
  try {
    for (let i = 0; i < 1000; i++) c.read(fd, buf, 8); // warm up
    let t0 = process.hrtime.bigint();
    for (let i = 0; i < N * 10; i++) c.read(fd, buf, 8);
    const emptyNs = Number(process.hrtime.bigint() - t0) / (N * 10);
    t0 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) { c.write(fd, one, 8); c.read(fd, buf, 8); }
    const signalledNs = Number(process.hrtime.bigint() - t0) / N;
    return { emptyNs, signalledNs };
  } finally {
    c.close(fd);
  }
}

async function main(): Promise<number> {
  const wake = await wakeLatency();
  const poll = pollCost();
  const results = {
    'wake via libuv thread pool (µs)': { median: pct(wake, 0.5), p99: pct(wake, 0.99) },
    'poll, nothing signalled (µs)': { median: poll.emptyNs / 1000, p99: NaN },
    'signal + poll (µs)': { median: poll.signalledNs / 1000, p99: NaN },
  };
  console.table(Object.fromEntries(Object.entries(results).map(([k, v]) => [k, { median: Number(v.median.toFixed(2)), p99: Number.isNaN(v.p99) ? '—' : Number(v.p99.toFixed(2)) }])));
  console.log('Compare: one PIO/MMIO exit round trip (pnpm bench; HOST-FACTS: ~9-30 µs for a C VMM).\n' +
    'ioeventfd pays off only where a wake is cheaper than the exits it replaces (batched notifies),\n' +
    'and polling adds its cost to every exit whether or not anything was signalled.');
  mkdirSync('bench-results', { recursive: true });
  writeFileSync('bench-results/eventfd.json', JSON.stringify({ date: new Date().toISOString(), n: N, results }, null, 2));
  return 0;
}

process.exitCode = await main();
