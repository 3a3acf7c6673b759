import { describe, expect, it } from 'vitest';
import { runFlowLearn } from './flow-learn.js';
import { runFlowVault } from './flow-vault.js';

describe('example: flow-vault (host-level machines on a vsock router)', () => {
  it('the key reaches outside only through dlp; the exfiltration is blocked and audited', async () => {
    const r = await runFlowVault();
    expect(r.onlyThroughDlp).toBe(true);
    expect(r.reach.paths.map((p) => p.hops.join('>'))).toEqual(['worker>outside', 'vault>worker>outside']);
    expect(r.outsideReceived).toBe('result computed with a 20-char key: 42\n');
    expect(r.exfiltrationReset).toBe(true);
    expect(r.direct.verdict).toBe('deny');
    expect(r.directViaRouterRefused).toBe(true);
    expect(r.verification.ok).toBe(true);
    const blocked = r.audit.map((l) => JSON.parse(l)).find((l) => l.decision === 'deny' && l.event === 'flow:message');
    expect(blocked).toMatchObject({ hook: 'publish', reason: expect.stringMatching(/dlp' blocked: key material/), flow: { from: 'worker', to: 'outside', guard: 'dlp', fromLabel: { secrecy: ['key'] } } });
    expect(r.dot).toContain('shape=diamond, label="dlp"');
  });
});

describe('example: flow-learn', () => {
  it('the learned policy admits every observed flow and denies a new one', async () => {
    const r = await runFlowLearn();
    expect(r.observed.map((o) => `${o.request.source}>${o.request.destination}:${o.request.port}`)).toEqual(['worker>vault:1', 'worker>outside:80']);
    expect(r.observed.every((o) => o.admitted)).toBe(true);
    expect(r.unseen.admitted).toBe(false);
    expect(r.learned.policy.rules).toContainEqual(expect.objectContaining({ source: 'worker', destination: 'outside', port: 80, guard: 'dlp' }));
  });
});
