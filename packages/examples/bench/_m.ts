import { AuditLog, FlowMonitor } from '@tsvm/monitor';
import { hash } from 'node:crypto';
const mon = new FlowMonitor({ policy: { version: 1, rules: [{ id: 'a-b', source: 'client', destination: 'server', port: 80, action: 'allow' }] }, topology: { version: 1, principals: { client: { kind: 'machine', cid: 3 }, server: { kind: 'machine', cid: 4 } } }, audit: new AuditLog(() => {}), logMessages: 'all' });
const d = await mon.connect({ source: 'client', destination: 'server', port: 80 });
const data = new Uint8Array(64);
for (let k = 0; k < 5; k++) {
  let t = process.hrtime.bigint();
  for (let i = 0; i < 10000; i++) mon.message(d.connection!, 'forward', data);
  console.log('message', Number(process.hrtime.bigint() - t) / 10000);
  t = process.hrtime.bigint();
  for (let i = 0; i < 10000; i++) hash('sha256', 'x'.repeat(300) + i, 'hex');
  console.log('hash', Number(process.hrtime.bigint() - t) / 10000);
  t = process.hrtime.bigint();
  for (let i = 0; i < 10000; i++) new Date().toISOString();
  console.log('date', Number(process.hrtime.bigint() - t) / 10000);
  // one call per setImmediate
  const ts: number[] = [];
  for (let i = 0; i < 2000; i++) { await new Promise((r) => setImmediate(r)); const t0 = process.hrtime.bigint(); mon.message(d.connection!, 'forward', data); ts.push(Number(process.hrtime.bigint() - t0)); }
  ts.sort((a, b) => a - b); console.log('message after setImmediate med', ts[1000]);
}
