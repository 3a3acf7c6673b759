import { describe, expect, it } from 'vitest';
import { AuditLog } from '../audit.js';
import { FlowMonitor } from './monitor.js';

const frame = (s: string) => { const f = new Uint8Array(14 + s.length); f.set(new TextEncoder().encode(s), 14); return f; };
const TOPO = { version: 1, principals: { a: { kind: 'machine' }, b: { kind: 'machine' }, c: { kind: 'machine', secrecy: ['x'] } } };
const POLICY = {
  version: 1,
  guards: { filter: {} },
  rules: [
    { id: 'a-b-ip', source: 'a', destination: 'b', port: 0x0800, service: 'ethernet', action: 'allow', guard: 'filter' },
    { id: 'b-a', source: 'b', destination: 'a', action: 'allow' },
  ],
};

function monitor() {
  const lines: string[] = [];
  const flow = new FlowMonitor({
    policy: POLICY, topology: TOPO, audit: new AuditLog(lines),
    guards: { filter: (d) => (new TextDecoder().decode(d).includes('evil') ? { action: 'block', reason: 'pattern' } : { action: 'allow' }) },
  });
  return { flow, lines: () => lines.map((l) => JSON.parse(l) as { event: string; decision: string; reason: string; flow: { from: string; to: string; port: number } }) };
}

describe('FlowMonitor.frame: L2 frames as messages on links', () => {
  it('decides the link once (EtherType as port, service ethernet), then each frame through the guard', async () => {
    const { flow, lines } = monitor();
    const d1 = await flow.frame({ source: 'a', destination: 'b', ethertype: 0x0800, data: frame('hello') });
    expect(d1.verdict).toBe('allow');
    const d2 = flow.frame({ source: 'a', destination: 'b', ethertype: 0x0800, data: frame('evil bytes') });
    expect(d2).not.toBeInstanceOf(Promise); // a known link with a synchronous guard stays synchronous
    expect(d2).toMatchObject({ verdict: 'deny', guard: 'filter', reason: expect.stringMatching(/pattern/) });
    expect(lines().map((l) => `${l.event} ${l.decision}`)).toEqual(['flow:connect allow', 'flow:frame allow', 'flow:frame deny']);
    const costs = flow.costs();
    expect(costs.rows.find((r) => r.name === 'filter')).toMatchObject({ kind: 'guard', frames: 2, messages: 0 });
    expect(costs.perGuardedFrameNs).toBeGreaterThan(0);
    expect(costs.hints.some((h) => h.includes('/frame'))).toBe(true);
  });

  it('deny by default: no rule for the EtherType or the pair; refusals are cached and every frame is audited', async () => {
    const { flow, lines } = monitor();
    expect(await flow.frame({ source: 'a', destination: 'b', ethertype: 0x0806, data: frame('arp') })).toMatchObject({ verdict: 'deny' });
    expect(flow.frame({ source: 'a', destination: 'b', ethertype: 0x0806, data: frame('arp') })).toMatchObject({ verdict: 'deny', reason: expect.stringMatching(/link refused/) });
    expect(await flow.frame({ source: 'a', destination: 'nobody', ethertype: 0x0800, data: frame('?') })).toMatchObject({ verdict: 'deny' });
    // A rule without `service` (b → a) covers frames too; the lattice still applies (c is secret).
    expect(await flow.frame({ source: 'b', destination: 'a', ethertype: 0x86dd, data: frame('v6') })).toMatchObject({ verdict: 'allow' });
    const l = lines();
    expect(l.filter((x) => x.event === 'flow:connect').map((x) => x.decision)).toEqual(['deny', 'deny', 'allow']);
    expect(l.filter((x) => x.event === 'flow:frame').map((x) => `${x.flow.from}>${x.flow.to}:${x.flow.port} ${x.decision}`)).toEqual(['a>b:2054 deny', 'a>b:2054 deny', 'a>nobody:2048 deny', 'b>a:34525 allow']);
  });

  it('concurrent first frames of one link share one decision; the link cache is bounded', async () => {
    const { flow, lines } = monitor();
    const ds = await Promise.all([1, 2, 3].map(() => flow.frame({ source: 'a', destination: 'b', ethertype: 0x0800, data: frame('x') })));
    expect(ds.map((d) => d.verdict)).toEqual(['allow', 'allow', 'allow']);
    expect(lines().filter((x) => x.event === 'flow:connect')).toHaveLength(1);
    for (let t = 0; t < 5000; t++) await flow.frame({ source: 'b', destination: 'a', ethertype: t, data: frame('y') });
    expect(flow.openConnections).toBeLessThanOrEqual(4096);
  });
});
