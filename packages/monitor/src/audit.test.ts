import { createHash } from 'node:crypto';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { describe, expect, it } from 'vitest';
import { Machine } from '@tsvm/core';
import { MockBackend, outExit } from '@tsvm/core/testing';
import { AuditLog, DECISION_CHANNEL, verifyAuditLog } from './audit.js';
import { Monitor } from './monitor.js';
import { allow, deny } from './decisions.js';

function sample(n: number): string[] {
  const lines: string[] = [];
  const log = new AuditLog(lines);
  for (let i = 0; i < n; i++) log.append({ machine: 'm', vcpu: 0, rip: `0x${(0x1000 + i).toString(16)}`, event: 'pio', address: '0x3f8', hook: 'h', decision: 'allow', exit: i });
  return lines;
}

describe('hash-chained audit log', () => {
  it('verifies an intact log and detects removed, reordered, edited and truncated lines', () => {
    const lines = sample(5);
    const ok = verifyAuditLog(lines);
    expect(ok).toMatchObject({ ok: true, count: 5 });
    const head = ok.ok ? ok.head : '';
    expect(verifyAuditLog(lines.filter((_, i) => i !== 2))).toMatchObject({ ok: false, line: 2 });
    expect(verifyAuditLog([lines[0], lines[2], lines[1], lines[3], lines[4]] as string[])).toMatchObject({ ok: false, line: 1 });
    const edited = lines.slice();
    edited[3] = (edited[3] as string).replace('"allow"', '"deny"');
    expect(verifyAuditLog(edited)).toMatchObject({ ok: false, line: 3, problem: expect.stringMatching(/edited/) });
    expect(verifyAuditLog(lines.slice(0, 4))).toMatchObject({ ok: true });
    expect(verifyAuditLog(lines.slice(0, 4), { head })).toMatchObject({ ok: false, problem: expect.stringMatching(/removed from the end/) });
    expect(verifyAuditLog(['{not json'])).toMatchObject({ ok: false, line: 0 });
  });

  it('a stream sink gets newline-terminated lines', () => {
    let text = '';
    const log = new AuditLog({ write: (s: string) => { text += s; } });
    log.append({ machine: 'm', vcpu: 0, rip: '0x0', event: 'halt', address: null, hook: 'h', decision: 'allow', exit: 1 });
    expect(text.endsWith('\n')).toBe(true);
    expect(verifyAuditLog(text.split('\n'))).toMatchObject({ ok: true, count: 1 });
  });

  it('the monitor logs every mediate decision with machine, vCPU, RIP, event, hook, decision and time; and publishes on diagnostics_channel', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script(outExit(0x3f8, 1), outExit(0x3f9, 2));
    vcpu.regs.rip = 0x4242n;
    const vm = await Machine.create({ memory: 1024 * 1024, backend, name: 'audited' });
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
    const lines: string[] = [];
    const mon = new Monitor(vm, { audit: lines });
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => allow(), { name: 'ok' });
    mon.mediate({ event: 'pio', ports: [0x3f9, 0x3f9] }, () => deny({ reason: 'nope' }), { name: 'no' });
    const published: unknown[] = [];
    const onMsg = (m: unknown): void => { published.push(m); };
    subscribe(DECISION_CHANNEL, onMsg);
    try {
      expect((await vm.run()).reason).toBe('violation');
    } finally {
      unsubscribe(DECISION_CHANNEL, onMsg);
    }
    expect(lines).toHaveLength(2);
    const [a, b] = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(a).toMatchObject({ machine: 'audited', vcpu: 0, rip: '0x4242', event: 'pio', address: '0x3f8', hook: 'ok', decision: 'allow', seq: 0 });
    expect(b).toMatchObject({ hook: 'no', decision: 'deny', effect: 'stop', reason: expect.stringMatching(/^nope/) });
    expect(typeof a?.['time']).toBe('string');
    expect(verifyAuditLog(lines)).toMatchObject({ ok: true, count: 2 });
    expect(published).toHaveLength(2);
    expect(mon.audit?.length).toBe(2);
  });

  it('each line is canonical JSON with the hash last, over text with quotes and unicode', () => {
    const lines: string[] = [];
    const log = new AuditLog(lines);
    log.append({ machine: 'm "q" é', vcpu: 0, rip: '0x1', event: 'pio', hook: 'h\\n', decision: 'allow' } as never, new Date(0));
    log.append({ machine: 'm', vcpu: 0, rip: '0x2', event: 'pio', hook: 'h', decision: 'deny' } as never, new Date(0));
    for (const l of lines) {
      const parsed = JSON.parse(l) as Record<string, unknown>;
      expect(JSON.stringify(parsed)).toBe(l);
      expect(Object.keys(parsed).at(-1)).toBe('hash');
    }
    expect(verifyAuditLog(lines)).toMatchObject({ ok: true, count: 2, head: log.head });
  });

  it('builds each line with the same bytes as stringifying the spread entry, reserved keys included', () => {
    const cases: Array<Record<string, unknown>> = [{}, { a: 1, b: 'x"y', c: [1, { d: null }] }, { time: 'mine', z: 2 }, { hash: 'h' }];
    for (const entry of cases) {
      const lines: string[] = [];
      const log = new AuditLog(lines);
      const at = new Date(1234567);
      const prev = log.head;
      const line = log.append(entry as never, at);
      // The reference: the spread-and-stringify construction, byte for byte.
      const body = { ...entry, time: at.toISOString(), seq: 0, prev };
      const hash = createHash('sha256').update(prev + JSON.stringify(body)).digest('hex');
      expect(line).toBe(JSON.stringify({ ...body, hash }));
      if (!Object.hasOwn(entry, 'hash') && !Object.hasOwn(entry, 'seq') && !Object.hasOwn(entry, 'prev')) expect(verifyAuditLog(lines)).toMatchObject({ ok: true, count: 1 });
    }
  });
});
