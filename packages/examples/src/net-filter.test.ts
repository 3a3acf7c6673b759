import { describe, expect, it } from 'vitest';
import { main, runNetFilter } from './net-filter.js';

describe('example: net-filter (two host-level machines on the virtual switch)', () => {
  it('drops every frame matching the pattern, delivers the rest, audits and prices each frame', async () => {
    const r = await runNetFilter(100);
    expect(r.leaked).toBe(false);
    expect(r.matching).toBe(20);
    expect(r.denied).toEqual({ alice: 11, bob: 10 }); // alice's extra one: IPv6, no rule (deny by default)
    expect(r.received).toEqual({ bob: 1 + 100 + 90, alice: 1 + 90 });
    expect(r.verification.ok).toBe(true);
    const denials = r.audit.map((l) => JSON.parse(l)).filter((l) => l.event === 'flow:frame' && l.decision === 'deny');
    expect(denials).toHaveLength(21);
    expect(denials[0]).toMatchObject({ hook: 'ipv4', reason: expect.stringMatching(/filter' blocked: payload matches/), flow: { guard: 'filter', port: 0x800 } });
    const g = r.costs.rows.find((x) => x.name === 'filter');
    expect(g).toMatchObject({ kind: 'guard', frames: 200 });
    expect(g?.perFrameNs).toBeGreaterThan(0);
    expect(g?.perFrameByteNs).toBeGreaterThan(0);
  });

  it('main() prints the report and succeeds', async () => {
    expect(await main()).toBe(0);
  });
});
