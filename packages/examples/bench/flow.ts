/**
 * `pnpm bench:flow`: what flow mediation costs on the host side of vsock, without guests. Two
 * driver-side test guests on a {@link VsockRouter} exchange 64-byte requests and replies (round
 * trip = request REQUEST-side RW → mediation → peer rx, reply likewise), and stream 64 KiB
 * messages; each with the allow-all mediator (no monitor), with the `FlowMonitor` (audit log on),
 * and with a content guard. Guest exits are not included: add two notify exits and two interrupt
 * injections per round trip for real CPL3 guests (HOST-FACTS: ~30 µs each on PVM) — the
 * guest-to-guest benchmark of issue 10 needs an in-guest vsock driver, which does not exist yet.
 * Prints a table and writes bench-results/flow.json.
 * @module
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { allowAllMediator, VsockOp, VsockRouter, VsockTestGuest, type VsockMediator, type VsockPacket } from '@tsvm/devices';
import { AuditLog, FlowMonitor, type FlowPolicy, type Topology } from '@tsvm/monitor';

const N = Number(process.env.TSVM_BENCH_FLOW_N ?? 3000);
const MB = Number(process.env.TSVM_BENCH_FLOW_MB ?? 64);
const median = (xs: number[]): number => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)] as number; };

const topology: Topology = { version: 1, principals: { a: { kind: 'machine', cid: 3 }, b: { kind: 'machine', cid: 4 } } };
const policy = (guard: boolean): FlowPolicy => ({
  version: 1,
  ...(guard ? { guards: { scan: { declassify: [] } } } : {}),
  rules: [{ id: 'a-b', source: 'a', destination: 'b', port: 80, action: 'allow', ...(guard ? { guard: 'scan' } : {}) }],
});
const scan = (d: Uint8Array) => (d.includes(0xff) ? { action: 'block' as const } : { action: 'allow' as const });

async function setup<C>(mediator: VsockMediator<C>) {
  const router = new VsockRouter({ mediator, connectionBuffer: 1 << 20 });
  const a = new VsockTestGuest({ cid: 3, rxBuffers: 64, rxBufferSize: 44 + 65536, bufAlloc: 1 << 20 });
  const b = new VsockTestGuest({ cid: 4, rxBuffers: 64, rxBufferSize: 44 + 65536, bufAlloc: 1 << 20 });
  router.attach(a.device, 'a');
  router.attach(b.device, 'b');
  a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 1000, dstPort: 80 });
  await new Promise((r) => setImmediate(r));
  b.receive();
  b.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
  a.receive();
  return { router, a, b };
}

async function roundTrip<C>(mediator: VsockMediator<C>): Promise<number> {
  const { a, b } = await setup(mediator);
  const req = new Uint8Array(64), rep = new Uint8Array(64);
  const samples: number[] = [];
  const got = (ps: VsockPacket[]) => ps.reduce((n, p) => n + (p.op === VsockOp.Rw ? p.payload.length : 0), 0);
  for (let i = 0; i < N; i++) {
    const t0 = process.hrtime.bigint();
    a.send({ op: VsockOp.Rw, dstCid: 4, srcPort: 1000, dstPort: 80, payload: req });
    let n = got(b.receive());
    while (n < 64) { await Promise.resolve(); n += got(b.receive()); }
    b.fwdCnt += 64;
    b.send({ op: VsockOp.Rw, dstCid: 3, srcPort: 80, dstPort: 1000, payload: rep });
    let m = got(a.receive());
    while (m < 64) { await Promise.resolve(); m += got(a.receive()); }
    a.fwdCnt += 64;
    samples.push(Number(process.hrtime.bigint() - t0));
  }
  return median(samples.slice(N / 10));
}

async function throughput<C>(mediator: VsockMediator<C>): Promise<number> {
  const { a, b } = await setup(mediator);
  const msg = new Uint8Array(65536);
  const total = MB * 1024 * 1024;
  let sent = 0, recvd = 0;
  const t0 = process.hrtime.bigint();
  while (recvd < total) {
    // Send within the credit window the router granted (1 MiB), as a driver would.
    while (sent - recvd < (1 << 20) - 65536 && sent < total) {
      a.send({ op: VsockOp.Rw, dstCid: 4, srcPort: 1000, dstPort: 80, payload: msg });
      sent += 65536;
    }
    await Promise.resolve();
    for (const p of b.receive()) if (p.op === VsockOp.Rw) recvd += p.payload.length;
    b.fwdCnt = recvd;
    b.send({ op: VsockOp.CreditUpdate, dstCid: 3, srcPort: 80, dstPort: 1000 });
    a.receive();
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return total / s / 1e6;
}

const monitor = (guard: boolean, log: 'all' | 'denied') => new FlowMonitor({ policy: policy(guard), topology, ...(guard ? { guards: { scan } } : {}), audit: new AuditLog(() => {}), logMessages: log });

const cases = [
  ['no monitor (allow-all mediator)', () => allowAllMediator],
  ['FlowMonitor, every message audited', () => monitor(false, 'all')],
  ['FlowMonitor, denials audited', () => monitor(false, 'denied')],
  ['FlowMonitor + content guard, every message audited', () => monitor(true, 'all')],
] as const;
let rows: { case: string; roundTripUs: number; throughputMBs: number }[] = [];
// Two passes, the first to warm the JIT up for every path; the second is reported.
for (let pass = 0; pass < 2; pass++) {
  rows = [];
  for (const [name, mk] of cases) {
    const rt = await roundTrip(mk() as VsockMediator<unknown>);
    const tp = await throughput(mk() as VsockMediator<unknown>);
    rows.push({ case: name, roundTripUs: rt / 1000, throughputMBs: tp });
  }
}
const base = rows[0] as (typeof rows)[number];
console.log(`host-side vsock through the router: 64 B round trip (median of ${N}), ${MB} MiB in 64 KiB messages`);
console.log('case'.padEnd(54), 'round trip'.padStart(12), 'ratio'.padStart(7), 'MB/s'.padStart(9));
for (const r of rows) console.log(r.case.padEnd(54), `${r.roundTripUs.toFixed(1)} µs`.padStart(12), `${(r.roundTripUs / base.roundTripUs).toFixed(2)}×`.padStart(7), r.throughputMBs.toFixed(0).padStart(9));
mkdirSync('bench-results', { recursive: true });
writeFileSync('bench-results/flow.json', `${JSON.stringify({ n: N, mb: MB, rows }, null, 2)}\n`);
