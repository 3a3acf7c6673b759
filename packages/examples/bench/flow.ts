/**
 * `pnpm bench:flow`: what flow mediation costs on vsock, in two parts.
 *
 * 1. Host side only: two driver-side test guests on a {@link VsockRouter} exchange 64-byte
 *    requests and replies (round trip = request RW → mediation → peer rx, reply likewise), and
 *    stream 64 KiB messages; each with the allow-all mediator (no monitor), with the
 *    `FlowMonitor` (audit log on), and with a content guard. No exits, no slice switches.
 * 2. Real guests (when `/dev/kvm` and `cc` are there): two freestanding vsock guests
 *    (devices/src/net/guest/vsock.c; data path at ring 3, polling, one notify exit per packet
 *    sent) on two machines sharing this thread. Round trip = the gap between successive client
 *    requests reaching the mediator (64 B each way). The cases are *interleaved on one pair of
 *    machines*: one mediator switches between them every 25 round trips, so each case's median
 *    comes from the same machines, connection and host load as the baseline's, and the ratio is
 *    taken per pass (8 passes, the first a warm-up). Separate runs per case were tried first: the
 *    baseline itself moved more between runs than any monitor costs. Throughput = 64 KiB
 *    messages, each answered with a 1-byte acknowledgement (stop-and-wait), one run per case per
 *    pass. Every hop includes one exit and one slice switch (`yieldSlice`).
 *
 * Prints two tables and writes bench-results/flow.json. Figures are noisy on a shared host.
 * @module
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { allowAllMediator, openVsockPair, VsockOp, VsockRouter, VsockTestGuest, type VsockMediator, type VsockPacket } from '@tsvm/devices';
import { kvmAvailability } from '@tsvm/core/testing';
import { AuditLog, calibrateFlowCosts, FlowMonitor, formatNs, type FlowPolicy, type Topology } from '@tsvm/monitor';
import { buildVsockGuest, runGuestPair, vsockGuestToolchain } from '../../devices/src/net/vsock-guest.fixture.js';

const N = Number(process.env.TSVM_BENCH_FLOW_N ?? 3000);
const MB = Number(process.env.TSVM_BENCH_FLOW_MB ?? 64);
const GUEST_MSGS = Number(process.env.TSVM_BENCH_FLOW_GUEST_MSGS ?? 400);
const median = (xs: number[]): number => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)] as number; };

const topology = (a: string, b: string): Topology => ({ version: 1, principals: { [a]: { kind: 'machine', cid: 3 }, [b]: { kind: 'machine', cid: 4 } } });
const policy = (guard: boolean, a = 'a', b = 'b'): FlowPolicy => ({
  version: 1,
  ...(guard ? { guards: { scan: { declassify: [] } } } : {}),
  rules: [{ id: 'a-b', source: a, destination: b, port: 80, action: 'allow', ...(guard ? { guard: 'scan' } : {}) }],
});
const scan = (d: Uint8Array) => (d.includes(0xff) ? { action: 'block' as const } : { action: 'allow' as const });

async function setup<C>(mediator: VsockMediator<C>) {
  const router = new VsockRouter({ mediator, connectionBuffer: 1 << 20 });
  return { router, ...(await openVsockPair(router, { rxBuffers: 64, rxBufferSize: 44 + 65536, bufAlloc: 1 << 20 })) };
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

const monitor = (guard: boolean, log: 'all' | 'denied', a = 'a', b = 'b') => new FlowMonitor({ policy: policy(guard, a, b), topology: topology(a, b), ...(guard ? { guards: { scan } } : {}), audit: new AuditLog(() => {}), logMessages: log });

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

// The flow cost model: prices calibrated on this host, then a guarded stream priced in advance
// (row by row, from the counts it produced) against what the monitor measured.
const model = await calibrateFlowCosts({ guards: { scan } });
const priced = new FlowMonitor({ policy: policy(true), topology: topology('a', 'b'), guards: { scan }, audit: new AuditLog(() => {}), costModel: model });
await throughput(priced as VsockMediator<unknown>);
const modelRows = priced.costs().rows.map((r) => ({ kind: r.kind, name: r.name, measuredNs: r.connectionNs + r.messageNs + r.frameNs, predictedNs: r.predictedNs ?? Number.NaN }));
console.log(`\nflow cost model (calibrated: connection ${formatNs(model.connectionNs)}, message ${formatNs(model.messageNs)} + audit line ${formatNs(model.auditLineNs)}, guard 'scan' ${formatNs(model.guards['scan']?.messageNs ?? 0)} + ${(model.guards['scan']?.byteNs ?? 0).toFixed(3)} ns/B): ${MB} MiB guarded stream`);
for (const r of modelRows) console.log(`  ${r.kind} ${r.name}`.padEnd(30), `measured ${formatNs(r.measuredNs)}`.padStart(20), `predicted ${formatNs(r.predictedNs)}`.padStart(22), `${(r.predictedNs / r.measuredNs).toFixed(2)}×`.padStart(7));

// Part 2: real guests. The mediator sees principals `client` and `server` (runGuestPair's names).
const guestCases = [
  ['no monitor (allow-all mediator)', () => allowAllMediator],
  ['FlowMonitor, every message audited', () => monitor(false, 'all', 'client', 'server')],
  ['FlowMonitor, denials audited', () => monitor(false, 'denied', 'client', 'server')],
  ['FlowMonitor + content guard, every message audited', () => monitor(true, 'all', 'client', 'server')],
] as const;

/**
 * One mediator that decides each round trip with one of `cases`, switching every `block` round
 * trips (a block's case in a rotating order), so every case runs on the same two machines, the
 * same connection and the same minute of host load. Round trip i (the gap between forward
 * messages i and i+1) holds forward message i and its reply, both decided by `caseOf[i]`.
 */
function interleaved(cases: readonly VsockMediator<unknown>[], block: number) {
  const caseOf: number[] = [];
  let forward = 0;
  let current = 0;
  const k = cases.length;
  const mediator: VsockMediator<unknown[]> = {
    connect: async (r) => {
      const vs = await Promise.all(cases.map((m) => m.connect(r)));
      const refused = vs.find((v) => v.verdict !== 'allow');
      return refused ? { verdict: 'deny', connection: null, reason: refused.reason } : { verdict: 'allow', connection: vs.map((v) => v.connection), reason: 'every case allowed' };
    },
    message: (conns, direction, data) => {
      if (direction === 'forward') {
        const b = Math.floor(forward++ / block);
        current = (b + Math.floor(b / k)) % k; // 0 1 2 3 | 1 2 3 0 | 2 3 0 1 | ...
        caseOf.push(current);
      }
      return (cases[current] as VsockMediator<unknown>).message(conns[current], direction, data);
    },
    close: (conns) => cases.forEach((m, i) => m.close?.(conns[i])),
  };
  return { mediator, caseOf };
}

let guestRows: { case: string; roundTripUs: number; throughputMBs: number; ratio: number; ratioMin: number; ratioMax: number; ratioIqr: [number, number] }[] = [];
let guestMeta: Record<string, unknown> = {};
const kvm = kvmAvailability();
const cc = vsockGuestToolchain();
const skipGuests = !kvm.available ? kvm.reason : !cc.available ? cc.reason : '';
if (skipGuests) {
  console.log(`\nreal CPL3 guests: SKIPPED (${skipGuests})`);
} else {
  const elf = await buildVsockGuest();
  const checked = (r: Awaited<ReturnType<typeof runGuestPair>>, what: string) => {
    if (r.clientStop.reason !== 'debug-exit' || r.clientStop.code !== 1 || r.client.error !== 0) throw new Error(`${what}: the client failed (${JSON.stringify(r.client)}, ${r.clientStop.reason})`);
    return r;
  };
  const quantile = (xs: number[], q: number): number => { const v = [...xs].sort((a, b) => a - b); return v[Math.min(v.length - 1, Math.floor(q * v.length))] as number; };
  // Round trip: every pass is one pair of machines running GUEST_RT round trips, the mediator
  // switching case every BLOCK of them (the first 2 of a block are dropped: the switch itself).
  // A case's ratio is per pass, median against the baseline's median in the same pass.
  // Measured (20:57-21:02, load 3-5): separate runs per case moved the baseline's 10th
  // percentile 106-172 us from one run to the next (the host's 2 cores are shared with other
  // work); interleaved in one run the ratio's IQR over 7 passes was 1.26-1.30 where separate
  // runs gave 0.66-1.53. What is left of the gap is the monitor's own time: its cost meter says
  // ~16 us per audited message here (the audit line; ~3.3 us standalone: cold caches between
  // guest exits), two per round trip, which is the whole difference.
  const PASSES = Math.max(2, Number(process.env['TSVM_BENCH_FLOW_PASSES'] ?? 8));
  const BLOCK = 25;
  const GUEST_RT = Math.max(BLOCK * guestCases.length * 4, Number(process.env['TSVM_BENCH_FLOW_GUEST_RT'] ?? 4000));
  const perPass: { rt: number[]; tp: number[]; msgNs: number[] }[] = guestCases.map(() => ({ rt: [], tp: [], msgNs: [] }));
  for (let pass = 0; pass < PASSES; pass++) {
    (globalThis as { gc?: () => void }).gc?.();
    const meds = guestCases.map(([, mk]) => mk() as VsockMediator<unknown>);
    const { mediator, caseOf } = interleaved(meds, BLOCK);
    const r = checked(await runGuestPair(elf, mediator, { count: GUEST_RT, msg: 64, reply: 64, timeoutMs: 120_000 }), 'interleaved');
    const gaps: number[][] = guestCases.map(() => []);
    for (let i = 0; i + 1 < r.forwardAt.length; i++) {
      if (i % BLOCK < 2) continue;
      gaps[caseOf[i] as number]?.push(((r.forwardAt[i + 1] as number) - (r.forwardAt[i] as number)) * 1000);
    }
    // Throughput: one run per case, order rotated each pass (64 KiB stop-and-wait).
    const tp: number[] = [];
    for (let n = 0; n < guestCases.length; n++) {
      const c = (n + pass) % guestCases.length;
      const [name, mk] = guestCases[c] as (typeof guestCases)[number];
      const t = checked(await runGuestPair(elf, mk() as VsockMediator<unknown>, { count: GUEST_MSGS, msg: 65536, reply: 1 }), name);
      tp[c] = ((t.forwardAt.length - 1) * 65536) / (((t.forwardAt.at(-1) as number) - (t.forwardAt[0] as number)) / 1000) / 1e6;
    }
    if (pass === 0) continue; // warm-up: the JIT sees every path once
    guestCases.forEach((_c, k) => {
      perPass[k]?.rt.push(median(gaps[k] ?? []));
      perPass[k]?.tp.push(tp[k] as number);
      // The monitor's own measured price per message, in this context (between guest exits).
      const m = meds[k];
      if (m instanceof FlowMonitor) { const c = m.costs(); perPass[k]?.msgNs.push(c.perGuardedMessageNs || c.perUnguardedMessageNs); }
    });
  }
  const base = perPass[0]?.rt ?? [];
  guestRows = guestCases.map(([name], k) => {
    const ratios = (perPass[k]?.rt ?? []).map((x, p) => x / (base[p] as number));
    return {
      case: name, roundTripUs: median(perPass[k]?.rt ?? []), throughputMBs: median(perPass[k]?.tp ?? []),
      ratio: median(ratios), ratioMin: Math.min(...ratios), ratioMax: Math.max(...ratios), ratioIqr: [quantile(ratios, 0.25), quantile(ratios, 0.75)],
    };
  });
  guestMeta = { passes: PASSES - 1, roundTripsPerPass: GUEST_RT, block: BLOCK };
  console.log(`\nreal guests, data path at CPL3: 64 B round trip, ${PASSES - 1} passes of ${GUEST_RT} round trips on one pair of machines, the mediator switching case every ${BLOCK}; ratio per pass against the same pass's baseline: median [min–max] (IQR); ${GUEST_MSGS} × 64 KiB messages each acknowledged, one run per case per pass`);
  console.log('case'.padEnd(54), 'round trip'.padStart(12), 'ratio'.padStart(20), 'IQR'.padStart(12), 'MB/s'.padStart(7));
  for (const r of guestRows) console.log(r.case.padEnd(54), `${r.roundTripUs.toFixed(1)} µs`.padStart(12), `${r.ratio.toFixed(2)}× [${r.ratioMin.toFixed(2)}–${r.ratioMax.toFixed(2)}]`.padStart(20), `${r.ratioIqr[0].toFixed(2)}–${r.ratioIqr[1].toFixed(2)}`.padStart(12), r.throughputMBs.toFixed(0).padStart(7));
  const verdict = (r: (typeof guestRows)[number]): string => {
    const abs = r.roundTripUs <= 200 ? `≤ 200 µs: met (${r.roundTripUs.toFixed(0)})` : `≤ 200 µs: NOT met (${r.roundTripUs.toFixed(0)})`;
    const rel = r.ratioMax <= 1.2 ? 'met in every pass' : r.ratio <= 1.2 ? `met by the median, not in every pass (max ${r.ratioMax.toFixed(2)})` : `NOT met (median ${r.ratio.toFixed(2)})`;
    return `${abs}; ≤ 1.2×: ${rel}`;
  };
  const msgUs = (k: number): number => median(perPass[k]?.msgNs ?? []) / 1000;
  console.log(`the monitor's own time per message in these runs (its cost meter): every message audited ${msgUs(1).toFixed(1)} µs, denials audited ${msgUs(2).toFixed(1)} µs, with the guard ${msgUs(3).toFixed(1)} µs — two messages per round trip; the audit line is the difference`);
  console.log('targets (with per-message mediation ≤ 1.2× without, ≤ 200 µs absolute):');
  for (const r of guestRows.slice(1)) console.log(`  ${r.case}: ${verdict(r)}`);
}
if (skipGuests) guestRows = [];
mkdirSync('bench-results', { recursive: true });
writeFileSync('bench-results/flow.json', `${JSON.stringify({ n: N, mb: MB, rows, model, modelRows, guests: skipGuests ? { skipped: skipGuests } : { ...guestMeta, messages: GUEST_MSGS, rows: guestRows } }, null, 2)}\n`);
