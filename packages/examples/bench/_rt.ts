import { allowAllMediator, type VsockMediator } from '@tsvm/devices';
import { AuditLog, FlowMonitor } from '@tsvm/monitor';
import { buildVsockGuest, runGuestPair } from '../../devices/src/net/vsock-guest.fixture.js';
const elf = await buildVsockGuest();
const pct = (xs: number[], p: number) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length * p)] as number; };
const mon = () => new FlowMonitor({ policy: { version: 1, rules: [{ id: 'a-b', source: 'client', destination: 'server', port: 80, action: 'allow' }] }, topology: { version: 1, principals: { client: { kind: 'machine', cid: 3 }, server: { kind: 'machine', cid: 4 } } }, audit: new AuditLog(() => {}), logMessages: 'all' });
const timed = <C>(m: VsockMediator<C>) => { const ts: number[] = []; return { ts, m: { connect: (r: any) => m.connect(r), message: (c: C, d: any, data: Uint8Array) => { const t = process.hrtime.bigint(); const v = m.message(c, d, data); ts.push(Number(process.hrtime.bigint() - t)); return v; } } as VsockMediator<C> }; };
for (let pass = 0; pass < 4; pass++) for (const [name, mk] of [['none', () => allowAllMediator], ['mon', mon]] as const) {
  const t = timed(mk() as VsockMediator<unknown>);
  const r = await runGuestPair(elf, t.m, { count: 1000, msg: 64, reply: 64 });
  const g = r.forwardAt.slice(1).map((t, i) => (t - (r.forwardAt[i] as number)) * 1000).slice(100);
  console.log(name, [0.1, 0.25, 0.5, 0.75, 0.9, 0.99].map((p) => pct(g, p).toFixed(0)).join(' '), 'mean', (g.reduce((a, b) => a + b, 0) / g.length).toFixed(0), 'med message ns', pct(t.ts.slice(200), 0.5), 'p90', pct(t.ts.slice(200), 0.9));
}
