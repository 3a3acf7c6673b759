import { describe, expect, it } from 'vitest';
import { AuditLog, verifyAuditLog } from '../audit.js';
import { learnPolicy } from './learning.js';
import { FlowMonitor } from './monitor.js';
import type { FlowPolicy, Topology } from './policy.js';

const topology: Topology = {
  version: 1,
  principals: {
    vault: { kind: 'machine', secrecy: ['key'] },
    worker: { kind: 'machine', secrecy: ['key'] },
    outside: { kind: 'machine' },
    printer: { kind: 'machine', secrecy: ['pii'] },
  },
};
const permissive: FlowPolicy = { version: 1, lattice: false, rules: [{ id: 'anything', source: '*', destination: '*', action: 'allow' }] };

describe('learnPolicy', () => {
  it('the learned policy admits every observed flow and denies a new one', async () => {
    const lines: string[] = [];
    const learn = new FlowMonitor({ policy: permissive, topology, mode: 'learn', audit: new AuditLog(lines) });
    const observed = [
      { source: 'vault', destination: 'worker', port: 1 },
      { source: 'vault', destination: 'worker', port: 2 },
      { source: 'vault', destination: 'worker', port: 1 },
      { source: 'worker', destination: 'outside', port: 80 },
      { source: 'outside', destination: 'worker', port: 9, service: 'jobs' },
    ];
    for (const r of observed) expect((await learn.connect(r)).verdict).toBe('allow');
    // Even what enforcement would refuse is allowed (and recorded as such) while learning.
    const out = await learn.connect({ source: 'worker', destination: 'printer', port: 5 });
    expect(out).toMatchObject({ verdict: 'allow', wouldBe: 'allow' });
    expect(verifyAuditLog(lines).ok).toBe(true);
    expect(JSON.parse(lines[0] as string).flow.mode).toBe('learn');

    const learned = learnPolicy(learn.observations.slice(0, 5), { current: permissive, guards: { dlp: { declassify: ['key'] } } });
    expect(learned.policy.rules).toEqual([
      { id: 'vault-worker-1_2', source: 'vault', destination: 'worker', port: [1, 2], action: 'allow' },
      { id: 'worker-outside-80', source: 'worker', destination: 'outside', port: 80, action: 'allow', guard: 'dlp' },
      { id: 'outside-worker-9-jobs', source: 'outside', destination: 'worker', port: 9, service: 'jobs', action: 'allow' },
    ]);
    expect(learned.diff).toContain('- {"id":"anything"');
    expect(learned.diff).toContain("lattice needs guard 'dlp'");
    expect(learned.unresolved).toEqual([]);

    const enforce = new FlowMonitor({ policy: JSON.stringify(learned.policy), topology, guards: { dlp: () => ({ action: 'allow', declassify: ['key'] }) } });
    for (const r of observed) expect((await enforce.connect(r)).verdict).toBe('allow');
    for (const r of [
      { source: 'vault', destination: 'worker', port: 3 },
      { source: 'vault', destination: 'outside', port: 80 },
      { source: 'outside', destination: 'worker', port: 9 },
      { source: 'worker', destination: 'printer', port: 5 },
    ]) expect((await enforce.connect(r)).verdict).toBe('deny');
  });

  it('lists flows the lattice refuses and no guard may declassify', async () => {
    const learn = new FlowMonitor({ policy: { version: 1, rules: [] }, topology, mode: 'learn' });
    await learn.connect({ source: 'printer', destination: 'outside', port: 631 });
    const d = await learn.connect({ source: 'nobody', destination: 'outside', port: 1 });
    expect(d.verdict).toBe('deny');
    const l = learnPolicy(learn.observations, { guards: { dlp: { declassify: ['key'] } } });
    expect(l.policy.rules).toEqual([]);
    expect(l.unresolved).toEqual([{ source: 'printer', destination: 'outside', port: 631, reason: expect.stringMatching(/secrecy \{pii\}/) }]);
    expect(l.diff).toMatch(/! printer → outside:631 not admitted/);
  });
});
