import { AuditLog, FlowMonitor } from '@tsvm/monitor';
const mk = (audit: AuditLog | undefined, log: 'all' | 'denied') => new FlowMonitor({ policy: { version: 1, rules: [{ id: 'a-b', source: 'client', destination: 'server', port: 80, action: 'allow' }] }, topology: { version: 1, principals: { client: { kind: 'machine', cid: 3 }, server: { kind: 'machine', cid: 4 } } }, ...(audit ? { audit } : {}), logMessages: log });
const data = new Uint8Array(64);
const al = new AuditLog(() => {});
const entry = { machine: 'client', vcpu: -1, rip: '-', event: 'flow:message', address: 'server:80', hook: 'a-b', decision: 'allow', reason: 'connection allowed', exit: -1, flow: { connection: 1, from: 'client', to: 'server', port: 80, rule: 'a-b', guard: null, bytes: 64, mode: 'enforce' } } as const;
const d0 = new Date();
for (let k = 0; k < 3; k++) {
  for (const [name, m] of [['no audit', mk(undefined, 'all')], ['denied-only', mk(al, 'denied')], ['all', mk(al, 'all')]] as const) {
    const d = await m.connect({ source: 'client', destination: 'server', port: 80 });
    const t = process.hrtime.bigint();
    for (let i = 0; i < 20000; i++) m.message(d.connection!, 'forward', data);
    console.log(name, Number(process.hrtime.bigint() - t) / 20000);
  }
  let t = process.hrtime.bigint();
  for (let i = 0; i < 20000; i++) al.append(entry as any);
  console.log('append', Number(process.hrtime.bigint() - t) / 20000);
  t = process.hrtime.bigint();
  for (let i = 0; i < 20000; i++) al.append(entry as any, d0);
  console.log('append fixed date', Number(process.hrtime.bigint() - t) / 20000);
  t = process.hrtime.bigint();
  for (let i = 0; i < 20000; i++) JSON.stringify(entry);
  console.log('stringify', Number(process.hrtime.bigint() - t) / 20000);
}
