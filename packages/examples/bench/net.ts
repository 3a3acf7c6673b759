/**
 * `pnpm bench:net`: frames per second through the {@link VirtualSwitch}, host side, without
 * guests. Two driver-side test guests (virtio-net behind the real virtio-mmio transport, queues in
 * test guest memory) exchange 64-byte and 1514-byte frames: a's driver transmits (tx kick → device
 * → switch → mediation → b's device writes b's rx buffer), b's driver takes and reposts its
 * buffers every 32 frames. Three mediators: allow-all (no monitor), the `FlowMonitor` with an
 * unguarded rule, and the `FlowMonitor` with a content-filter guard (a regex over the payload);
 * the monitor runs with `logMessages: 'denied'` and with full audit. Guest exits are not
 * included: a real guest adds one notify exit per kick and one interrupt per rx batch.
 * Prints a table and writes bench-results/net.json.
 * @module
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { allowAllFrames, ethernetFrame, NetTestGuest, VirtualSwitch, type FrameMediator } from '@tsvm/devices';
import { AuditLog, FlowMonitor, type FlowPolicy, type GuardFn, type Topology } from '@tsvm/monitor';

const N = Number(process.env.TSVM_BENCH_NET_N ?? 20000);
const MAC = { a: '02:00:00:00:00:0a', b: '02:00:00:00:00:0b' };
const topology: Topology = { version: 1, principals: { a: { kind: 'machine' }, b: { kind: 'machine' } } };
const policy = (guard: boolean): FlowPolicy => ({
  version: 1,
  ...(guard ? { guards: { filter: {} } } : {}),
  rules: [{ id: 'ip', source: 'a', destination: 'b', port: 0x0800, service: 'ethernet', action: 'allow', ...(guard ? { guard: 'filter' } : {}) }],
});
const PATTERN = /DROP\s+TABLE/i;
const filter: GuardFn = (f) => (PATTERN.test(Buffer.from(f.buffer, f.byteOffset + 14, f.length - 14).toString('latin1')) ? { action: 'block' } : { action: 'allow' });

async function run(name: string, mediator: () => FrameMediator, size: number): Promise<{ name: string; frameBytes: number; framesPerSec: number; nsPerFrame: number; mbPerSec: number; delivered: number }> {
  const sw = new VirtualSwitch({ mediator: mediator() });
  const a = new NetTestGuest({ mac: MAC.a, rxBuffers: 0 });
  const b = new NetTestGuest({ mac: MAC.b, rxBuffers: 64 });
  sw.attach(a.device, 'a');
  sw.attach(b.device, 'b');
  b.send(ethernetFrame(MAC.a, MAC.b, 0x0800, 'hello')); // the switch learns b
  const payload = new Uint8Array(size - 14).fill(0x61);
  const frame = ethernetFrame(MAC.b, MAC.a, 0x0800, payload);
  a.send(frame); // the first frame decides the link (async): not timed
  await new Promise((r) => setImmediate(r));
  b.receive();
  let got = 0;
  for (let i = 0; i < 2000; i++) { a.send(frame); if (i % 32 === 31) got += b.receive().length; }
  b.receive();
  got = 0;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) {
    a.send(frame);
    if (i % 32 === 31) got += b.receive().length;
  }
  got += b.receive().length;
  const ns = Number(process.hrtime.bigint() - t0);
  sw.close();
  return { name, frameBytes: size, framesPerSec: N / (ns / 1e9), nsPerFrame: ns / N, mbPerSec: (N * size) / (ns / 1e3), delivered: got };
}

const mediators: [string, () => FrameMediator][] = [
  ['allow-all (no monitor)', () => allowAllFrames],
  ['FlowMonitor, unguarded, audit denied only', () => new FlowMonitor({ policy: policy(false), topology, logMessages: 'denied', audit: new AuditLog([]) })],
  ['FlowMonitor, content filter, audit denied only', () => new FlowMonitor({ policy: policy(true), topology, guards: { filter }, logMessages: 'denied', audit: new AuditLog([]) })],
  ['FlowMonitor, content filter, full audit', () => new FlowMonitor({ policy: policy(true), topology, guards: { filter }, audit: new AuditLog([]) })],
];
const rows = [];
for (const size of [64, 1514]) for (const [name, m] of mediators) rows.push(await run(name, m, size));
console.log(`frames through the virtual switch, host side (${N} frames each; driver ↔ virtio-mmio ↔ VirtioNet ↔ VirtualSwitch ↔ VirtioNet ↔ driver, no guest exits)\n`);
console.log(`${'mediator'.padEnd(48)} ${'frame'.padStart(6)} ${'frames/s'.padStart(10)} ${'ns/frame'.padStart(9)} ${'MB/s'.padStart(7)}  delivered`);
for (const r of rows) console.log(`${r.name.padEnd(48)} ${String(r.frameBytes).padStart(6)} ${Math.round(r.framesPerSec).toString().padStart(10)} ${Math.round(r.nsPerFrame).toString().padStart(9)} ${r.mbPerSec.toFixed(1).padStart(7)}  ${r.delivered}/${N}`);
mkdirSync('bench-results', { recursive: true });
writeFileSync('bench-results/net.json', `${JSON.stringify({ date: new Date().toISOString(), node: process.version, frames: N, hostSideOnly: true, rows }, null, 2)}\n`);
console.log('\nwrote bench-results/net.json');
