import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '@tsvm/core';
import { AuditLog, decisionChannel, verifyAuditLog } from '../audit.js';
import { PolicyError } from '../errors.js';
import { explain } from './explain.js';
import { canFlow, declassify, latticeGap, makeLabel } from './labels.js';
import { FlowMonitor, type FlowConnection } from './monitor.js';
import { compileFlowPolicy, compileTopology, type FlowPolicy, type Topology } from './policy.js';

const topology: Topology = {
  version: 1,
  principals: {
    vault: { kind: 'machine', cid: 3, secrecy: ['key'] },
    worker: { kind: 'machine', cid: 4, secrecy: ['key'] },
    outside: { kind: 'machine', cid: 5 },
    signer: { kind: 'host', cid: 2, integrity: ['signed'] },
  },
};
const policy: FlowPolicy = {
  version: 1,
  guards: { dlp: { declassify: ['key'], timeoutMs: 30 } },
  rules: [
    { id: 'no-vault-out', source: 'vault', destination: 'outside', action: 'deny', reason: 'never' },
    { id: 'key', source: 'vault', destination: 'worker', port: 1, action: 'allow' },
    { id: 'out', source: 'worker', destination: 'outside', port: [80, 90], action: 'allow', guard: 'dlp' },
    { id: 'raw-out', source: 'worker', destination: 'outside', action: 'allow' },
    { id: 'ask', source: 'outside', destination: 'worker', action: 'ask' },
  ],
};
const dlp = (d: Uint8Array) => (new TextDecoder().decode(d).includes('SECRET') ? { action: 'block' as const, reason: 'key material' } : { action: 'allow' as const, declassify: ['key'] });
const text = (s: string) => new TextEncoder().encode(s);

function mk(extra: Partial<ConstructorParameters<typeof FlowMonitor>[0]> = {}) {
  const lines: string[] = [];
  const mon = new FlowMonitor({ policy, topology, guards: { dlp }, audit: new AuditLog(lines), ...extra });
  return { mon, lines };
}

describe('labels', () => {
  it('allows flows that neither lower secrecy nor raise integrity', () => {
    const secret = makeLabel(['key']), pub = makeLabel(), signed = makeLabel([], ['signed']);
    expect(canFlow(pub, secret)).toBe(true);
    expect(canFlow(secret, pub)).toBe(false);
    expect(canFlow(signed, pub)).toBe(true);
    expect(canFlow(pub, signed)).toBe(false);
    expect(latticeGap(secret, signed)).toEqual({ secrecy: ['key'], integrity: ['signed'] });
    expect(canFlow(declassify(secret, ['key']), pub)).toBe(true);
  });
});

describe('flow policy schema', () => {
  const bad: [unknown, string][] = [
    ['{', '$'],
    [{ version: 2, rules: [] }, 'version'],
    [{ version: 1, rules: {} }, 'rules'],
    [{ version: 1, extra: 1, rules: [] }, 'extra'],
    [{ version: 1, rules: [{ id: 'a', source: 'x', destination: 'y', action: 'maybe' }] }, 'rules[0].action'],
    [{ version: 1, rules: [{ id: 'a', source: '@nope', destination: 'y', action: 'allow' }] }, 'rules[0].source'],
    [{ version: 1, rules: [{ id: 'a', source: 'x', destination: 'y', port: [9, 2], action: 'allow' }] }, 'rules[0].port'],
    [{ version: 1, rules: [{ id: 'a', source: 'x', destination: 'y', port: [1, -2], action: 'allow' }] }, 'rules[0].port[1]'],
    [{ version: 1, rules: [{ id: 'a', source: 'x', destination: 'y', action: 'allow', guard: 'g' }] }, 'rules[0].guard'],
    [{ version: 1, rules: [{ id: 'a', source: 'x', destination: 'y', action: 'allow' }, { id: 'a', source: 'x', destination: 'y', action: 'deny' }] }, 'rules[1].id'],
    [{ version: 1, guards: { g: { timeoutMs: 0 } }, rules: [] }, 'guards.g.timeoutMs'],
    [{ version: 1, guards: { g: { declassify: [3] } }, rules: [] }, 'guards.g.declassify[0]'],
  ];
  it.each(bad)('rejects %j naming %s', (doc, path) => {
    expect(() => compileFlowPolicy(doc)).toThrow(PolicyError);
    try { compileFlowPolicy(doc); } catch (e) { expect((e as PolicyError).path).toBe(path); }
  });

  it('rejects malformed topologies naming the path', () => {
    const cases: [unknown, string][] = [
      [{ version: 1, principals: { a: { kind: 'vm' } } }, 'topology.principals.a.kind'],
      [{ version: 1, principals: { a: { kind: 'machine', cid: 2 } } }, 'topology.principals.a.cid'],
      [{ version: 1, principals: { a: { kind: 'machine', cid: 3 }, b: { kind: 'machine', cid: 3 } } }, 'topology.principals.b.cid'],
      [{ version: 1, principals: { a: { kind: 'machine', secrecy: ['ok', ''] } } }, 'topology.principals.a.secrecy[1]'],
      [{ version: 1, principals: { a: { kind: 'host' } }, links: [['a', 'zz']] }, 'topology.links[0][1]'],
    ];
    for (const [doc, path] of cases) expect(() => compileTopology(doc)).toThrow(expect.objectContaining({ path }));
  });

  it('round-trips through JSON', () => {
    const c = compileFlowPolicy(JSON.stringify(policy));
    expect(compileFlowPolicy(JSON.parse(JSON.stringify(c.source))).rules).toEqual(c.rules);
  });

  it('needs code for every declared guard and no code for undeclared ones', () => {
    expect(() => new FlowMonitor({ policy, topology })).toThrow(expect.objectContaining({ path: 'guards.dlp' }));
    expect(() => new FlowMonitor({ policy, topology, guards: { dlp, other: dlp } })).toThrow(expect.objectContaining({ path: 'guards.other' }));
  });
});

describe('FlowMonitor connections', () => {
  it('first match wins, deny by default, and every decision is in the audit chain', async () => {
    const { mon, lines } = mk();
    expect((await mon.connect({ source: 'vault', destination: 'outside', port: 80 })).rule).toBe('no-vault-out');
    const key = await mon.connect({ source: 'vault', destination: 'worker', port: 1 });
    expect(key.verdict).toBe('allow');
    expect((await mon.connect({ source: 'vault', destination: 'worker', port: 2 })).reason).toMatch(/deny by default/);
    const out = await mon.connect({ source: 'worker', destination: 'outside', port: 80 });
    expect(out).toMatchObject({ verdict: 'allow', rule: 'out', guard: 'dlp' });
    expect((await mon.connect({ source: 'nobody', destination: 'outside', port: 80 })).reason).toMatch(/unknown principal/);
    expect(lines).toHaveLength(5);
    expect(verifyAuditLog(lines)).toMatchObject({ ok: true, count: 5 });
    const l = JSON.parse(lines[3] as string);
    expect(l).toMatchObject({ event: 'flow:connect', decision: 'allow', hook: 'out', flow: { rule: 'out', guard: 'dlp', fromLabel: { secrecy: ['key'] } } });
  });

  it('an allow rule cannot lower secrecy without a guard that may declassify', async () => {
    const { mon } = mk();
    const d = await mon.connect({ source: 'worker', destination: 'outside', port: 443 });
    expect(d.verdict).toBe('deny');
    expect(d.rule).toBe('raw-out');
    expect(d.reason).toMatch(/would lower secrecy \{key\}/);
    expect(explain(d)).toMatch(/rule 'out': skipped, port 443 is outside 80-90/);
  });

  it('ask: the callback decides; a throw, a timeout or no callback denies', async () => {
    const req = { source: 'outside', destination: 'worker', port: 7 };
    expect((await mk({ ask: () => true }).mon.connect(req)).verdict).toBe('allow');
    expect((await mk({ ask: async () => false }).mon.connect(req)).verdict).toBe('deny');
    expect((await mk({ ask: () => { throw new Error('x'); } }).mon.connect(req)).reason).toMatch(/ask threw/);
    expect((await mk({ ask: () => new Promise(() => {}), askTimeoutMs: 10 }).mon.connect(req)).reason).toMatch(/did not answer/);
    expect((await mk().mon.connect(req)).reason).toMatch(/no ask callback/);
  });
});

describe('FlowMonitor messages', () => {
  async function open(extra: Partial<ConstructorParameters<typeof FlowMonitor>[0]> = {}) {
    const m = mk(extra);
    const c = (await m.mon.connect({ source: 'worker', destination: 'outside', port: 80 })).connection as FlowConnection;
    return { ...m, c };
  }

  it('a guard declassifies, blocks, and fails closed on throw, timeout, or an ungranted tag', async () => {
    const { mon, c, lines } = await open();
    const ok = await mon.message(c, 'forward', text('hello'));
    expect(ok).toMatchObject({ verdict: 'allow', declassified: ['key'], label: { secrecy: [] } });
    expect(explain(ok)).toMatch(/ALLOW\n  guard 'dlp' inspected it\n  delivered with label \{s: -; i: -\}\n  declassified \{key\}/);
    expect(await mon.message(c, 'forward', text('the SECRET'))).toMatchObject({ verdict: 'deny', reason: expect.stringMatching(/blocked: key material/) });
    expect(verifyAuditLog(lines).ok).toBe(true);
    const denied = JSON.parse(lines.at(-1) as string);
    expect(denied).toMatchObject({ event: 'flow:message', decision: 'deny', hook: 'out', flow: { guard: 'dlp', bytes: 10 } });

    const cases: [(d: Uint8Array) => unknown, RegExp][] = [
      [() => { throw new Error('boom'); }, /threw: boom/],
      [() => Promise.reject(new Error('late boom')), /threw: late boom/],
      [() => new Promise(() => {}), /did not settle within 30 ms/],
      [() => ({ action: 'allow', declassify: ['pii'] }), /does not grant/],
      [() => ({ action: 'allow' }), /would lower secrecy/],
      [() => 42, /not a verdict/],
      [() => ({ action: 'rewrite', data: 'str' }), /not bytes/],
    ];
    for (const [g, re] of cases) {
      const o = await open({ guards: { dlp: g as never } });
      const d = await o.mon.message(o.c, 'forward', text('x'));
      expect(d.verdict).toBe('deny');
      expect(d.reason).toMatch(re);
      expect(JSON.parse(o.lines.at(-1) as string).reason).toMatch(re);
    }
  });

  it('a guard may rewrite', async () => {
    const { mon, c } = await open({ guards: { dlp: (d) => ({ action: 'rewrite', data: d.map((b) => (b === 0x35 ? 0x2a : b)), declassify: ['key'] }) } });
    const d = await mon.message(c, 'reverse', text('5'));
    expect(d).toMatchObject({ verdict: 'allow', rewritten: true });
    if (d.verdict === 'allow') expect(new TextDecoder().decode(d.data)).toBe('*');
  });

  it('unguarded connections decide synchronously and check the reverse direction too', async () => {
    const lines: string[] = [];
    const mon = new FlowMonitor({
      policy: { version: 1, rules: [{ id: 'up', source: 'outside', destination: 'signer', action: 'allow' }, { id: 'in', source: 'outside', destination: 'vault', action: 'allow' }] },
      topology, audit: new AuditLog(lines),
    });
    // outside → signer raises integrity: refused at set-up.
    expect((await mon.connect({ source: 'outside', destination: 'signer', port: 1 })).reason).toMatch(/raise integrity \{signed\}/);
    const c = (await mon.connect({ source: 'outside', destination: 'vault', port: 1 })).connection as FlowConnection;
    const fwd = mon.message(c, 'forward', text('hi'));
    expect(fwd).not.toBeInstanceOf(Promise);
    expect((fwd as { verdict: string }).verdict).toBe('allow');
    // The vault's reply would carry `key` to `outside`.
    expect(mon.message(c, 'reverse', text('key'))).toMatchObject({ verdict: 'deny', reason: expect.stringMatching(/lower secrecy \{key\}/) });
    mon.close(c);
    expect(mon.message(c, 'forward', text('late'))).toMatchObject({ verdict: 'deny', reason: 'unknown or closed connection' });
    expect(mon.stats).toMatchObject({ connectionsAllowed: 1, connectionsDenied: 1, messagesAllowed: 1, messagesDenied: 2 });
    expect(verifyAuditLog(lines)).toMatchObject({ ok: true, count: 5 });
  });
});

describe('FlowMonitor per-message audit lines', () => {
  it('a plain allowed message\'s line from the connection\'s template is byte for byte the general path\'s (bar the chain), both ways', async () => {
    const run = async (subscribe: boolean) => {
      const lines: string[] = [];
      const mon = new FlowMonitor({ policy: { version: 1, rules: [{ id: 'in', source: 'outside', destination: 'vault', action: 'allow' }] }, topology, audit: new AuditLog(lines) });
      // A diagnostics-channel subscriber sends every line down the general path.
      const sub = () => undefined;
      if (subscribe) decisionChannel.subscribe(sub);
      try {
        const c = (await mon.connect({ source: 'outside', destination: 'vault', port: 7 })).connection as FlowConnection;
        for (const n of [1, 200, 0]) mon.message(c, 'forward', new Uint8Array(n));
        mon.message(c, 'reverse', new Uint8Array(3)); // refused: the general path either way
        mon.message(c, 'forward', new Uint8Array(5));
      } finally {
        if (subscribe) decisionChannel.unsubscribe(sub);
      }
      expect(verifyAuditLog(lines)).toMatchObject({ ok: true, count: 6 });
      return lines.map((l) => { const { time: _t, hash: _h, prev: _p, ...rest } = JSON.parse(l) as Record<string, unknown>; return JSON.stringify(rest); });
    };
    const fast = await run(false);
    const general = await run(true);
    expect(fast).toEqual(general);
    expect(JSON.parse(fast[2] as string)).toMatchObject({ event: 'flow:message', decision: 'allow', flow: { port: 7, bytes: 200, mode: 'enforce' } });
  });

  it('AuditLog.appendJson chains given JSON as append would, and refuses what is not an object\'s JSON', () => {
    const a: string[] = [], b: string[] = [];
    const t = new Date(1_700_000_000_000);
    const e = { machine: 'm', vcpu: 0, rip: '0x1', event: 'pio', address: '0x3f8', hook: 'h', decision: 'allow', reason: 'r', exit: 1 } as const;
    new AuditLog(a).append(e, t);
    new AuditLog(b).appendJson(JSON.stringify(e), t);
    expect(b).toEqual(a);
    const log = new AuditLog([]);
    for (const bad of ['', '[1]', 'x', 42 as never, null as never]) expect(() => log.appendJson(bad, t)).toThrow(InvalidArgumentError);
    expect(log.length).toBe(0);
  });
});

describe('FlowMonitor costs', () => {
  it('prices connection decisions, unguarded and guarded messages per rule and guard', async () => {
    const { mon } = mk();
    const out = (await mon.connect({ source: 'worker', destination: 'outside', port: 80 })).connection as FlowConnection;
    const key = (await mon.connect({ source: 'vault', destination: 'worker', port: 1 })).connection as FlowConnection;
    await mon.connect({ source: 'vault', destination: 'worker', port: 9 });
    for (let i = 0; i < 5; i++) await mon.message(out, 'forward', text('fine'));
    for (let i = 0; i < 3; i++) mon.message(key, 'forward', text('k'));
    const c = mon.costs();
    expect(c.rows.find((r) => r.kind === 'guard' && r.name === 'dlp')).toMatchObject({ messages: 5, bytes: 20 });
    expect(c.rows.find((r) => r.kind === 'rule' && r.name === 'key')).toMatchObject({ connections: 1, messages: 3, bytes: 3 });
    expect(c.rows.find((r) => r.name === 'default')).toMatchObject({ connections: 1, messages: 0 });
    expect(c.perConnectionNs).toBeGreaterThan(0);
    expect(c.perGuardedMessageNs).toBeGreaterThan(0);
    expect(c.hints.join('\n')).toMatch(/guard 'dlp': .*\/message/);
  });
});

describe('guard signals', () => {
  it('a guard that looks at its signal sees it abort when the inspection times out; one that does not pays for no controller', async () => {
    const topo = { version: 1, principals: { a: { kind: 'machine', cid: 3 }, b: { kind: 'machine', cid: 4 } } };
    const pol = { version: 1, guards: { slow: { declassify: [], timeoutMs: 20 } }, rules: [{ id: 'r', source: 'a', destination: 'b', port: 1, action: 'allow', guard: 'slow' }] };
    let aborted = false;
    const slow = (_d: Uint8Array, ctx: { signal: AbortSignal }) => new Promise<{ action: 'allow' }>((resolve) => {
      ctx.signal.addEventListener('abort', () => { aborted = true; resolve({ action: 'allow' }); });
    });
    const m = new FlowMonitor({ policy: pol, topology: topo, guards: { slow } });
    const c = await m.connect({ source: 'a', destination: 'b', port: 1 });
    const d = await m.message(c.connection!, 'forward', new Uint8Array(4));
    expect(d).toMatchObject({ verdict: 'deny', reason: expect.stringMatching(/did not settle within 20 ms/) });
    expect(aborted).toBe(true);
    // A synchronous guard that never reads `signal` still gets a verdict through.
    const quick = new FlowMonitor({ policy: pol, topology: topo, guards: { slow: () => ({ action: 'allow' }) } });
    const q = await quick.connect({ source: 'a', destination: 'b', port: 1 });
    expect(await quick.message(q.connection!, 'forward', new Uint8Array(4))).toMatchObject({ verdict: 'allow' });
  });
});

describe('FlowMonitor: disposable principals', () => {
  const topology = { version: 1, principals: { a: { kind: 'machine', cid: 3 }, scanner: { kind: 'machine', cid: 5, disposable: 'scan' }, other: { kind: 'machine', cid: 6 } } };

  it('@dispvm:<template> matches the template’s principal only; served() audits the instance', async () => {
    const lines: string[] = [];
    const flow = new FlowMonitor({ policy: { version: 1, rules: [{ id: 'to-scan', source: 'a', destination: '@dispvm:scan', action: 'allow' }, { id: 'any-disp', source: 'other', destination: '@dispvm', action: 'allow' }] }, topology, audit: new AuditLog(lines) });
    const ok = await flow.connect({ source: 'a', destination: 'scanner', port: 80 });
    expect(ok.verdict).toBe('allow');
    expect((await flow.connect({ source: 'a', destination: 'other', port: 80 })).verdict).toBe('deny');
    expect((await flow.connect({ source: 'other', destination: 'scanner', port: 80 })).rule).toBe('any-disp');
    flow.served(ok.connection as FlowConnection, 'scanner~7');
    flow.served(9999, 'ghost'); // unknown connection: nothing logged
    const served = lines.map((l) => JSON.parse(l) as { event: string; flow: { instance?: string; connection: number } }).filter((e) => e.event === 'flow:disposable');
    expect(served).toEqual([expect.objectContaining({ flow: expect.objectContaining({ instance: 'scanner~7', connection: ok.connection?.id }) })]);
  });

  it('bad input: a disposable host, a bad template name, an unknown @dispvm form → PolicyError naming the path', () => {
    const bad = (policy: unknown, topo: unknown, path: string) => expect(() => new FlowMonitor({ policy, topology: topo })).toThrow(path);
    const rules = { version: 1, rules: [] };
    bad(rules, { version: 1, principals: { h: { kind: 'host', disposable: 'x' } } }, 'topology.principals.h.disposable');
    bad(rules, { version: 1, principals: { m: { kind: 'machine', disposable: 'no spaces' } } }, 'topology.principals.m.disposable');
    bad({ version: 1, rules: [{ id: 'r', source: 'a', destination: '@dispvm:', action: 'allow' }] }, topology, 'rules[0].destination');
    bad({ version: 1, rules: [{ id: 'r', source: '@dispvms', destination: 'a', action: 'allow' }] }, topology, 'rules[0].source');
  });
});

describe('guarded messages and the lattice', () => {
  it('a guard that allows without declassifying what the lattice needs is refused, every time; declassifying lets it through; the other direction needs nothing', async () => {
    const flow = new FlowMonitor({
      policy: { version: 1, guards: { dlp: { declassify: ['key'] } }, rules: [{ id: 'out', source: 'vault', destination: 'outside', action: 'allow', guard: 'dlp' }] },
      topology: { version: 1, principals: { vault: { kind: 'machine', secrecy: ['key'] }, outside: { kind: 'machine' } } },
      guards: { dlp: (d) => (d[0] === 1 ? { action: 'allow', declassify: ['key'] } : { action: 'allow' }) },
    });
    const c = (await flow.connect({ source: 'vault', destination: 'outside', port: 1 })).connection as FlowConnection;
    for (let i = 0; i < 2; i++) {
      const d = flow.message(c, 'forward', Uint8Array.of(0)) as { verdict: string; reason: string };
      expect(d.verdict).toBe('deny');
      expect(d.reason).toMatch(/guard 'dlp' allowed, but/);
    }
    expect(flow.message(c, 'forward', Uint8Array.of(1))).toMatchObject({ verdict: 'allow', declassified: ['key'], reason: "guard 'dlp' allowed, declassifying {key}" });
    for (let i = 0; i < 2; i++) expect(flow.message(c, 'reverse', Uint8Array.of(0))).toMatchObject({ verdict: 'allow', declassified: [], reason: "guard 'dlp' allowed" });
  });
});
