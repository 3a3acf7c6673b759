import { describe, expect, it } from 'vitest';
import { PolicyError } from '../errors.js';
import { analyzeFlows } from './analysis.js';
import type { FlowPolicy, Topology } from './policy.js';

const topology: Topology = {
  version: 1,
  principals: {
    vault: { kind: 'machine', cid: 3, secrecy: ['key'] },
    worker: { kind: 'machine', cid: 4, secrecy: ['key'] },
    relay: { kind: 'machine', cid: 6, secrecy: ['key'] },
    outside: { kind: 'machine', cid: 5 },
  },
};
const policy: FlowPolicy = {
  version: 1,
  guards: { dlp: { declassify: ['key'] }, audit: { declassify: ['key'] } },
  rules: [
    { id: 'key', source: 'vault', destination: 'worker', port: 1, action: 'allow' },
    { id: 'relay', source: 'worker', destination: 'relay', action: 'allow' },
    { id: 'out', source: 'worker', destination: 'outside', port: 80, action: 'allow', guard: 'dlp' },
    { id: 'relay-out', source: 'relay', destination: 'outside', action: 'ask', guard: 'audit' },
    { id: 'raw', source: 'worker', destination: 'outside', action: 'allow' },
    { id: 'dup', source: 'vault', destination: 'worker', port: 1, action: 'deny' },
    { id: 'ghost', source: 'printer', destination: 'worker', action: 'allow' },
    { id: 'tag-in', source: '@tag:key', destination: 'vault', action: 'allow' },
  ],
};

describe('analyzeFlows', () => {
  const a = analyzeFlows(policy, topology);

  it('lists every path from the tag to a machine, shortest first, with the guards on it', () => {
    const r = a.reach('key', 'outside');
    expect(r.sources).toEqual(['vault', 'worker', 'relay']);
    expect(r.reachable).toBe(true);
    const hops = r.paths.map((p) => p.hops.join('>'));
    expect(hops.slice(0, 2)).toEqual(['worker>outside', 'relay>outside']);
    expect(hops).toContain('vault>worker>outside');
    expect(hops).toContain('vault>worker>relay>outside');
    for (let i = 1; i < r.paths.length; i++) expect(r.paths[i]?.hops.length).toBeGreaterThanOrEqual(r.paths[i - 1]?.hops.length ?? 0);
    expect(r.paths.every((p) => p.declassifiedBy !== null)).toBe(true);
    expect(a.onlyThrough('key', 'outside', 'dlp')).toBe(false);
    expect(r.paths.find((p) => p.hops.join('>') === 'relay>outside')?.edges[0]).toMatchObject({ ask: true, guard: 'audit' });
  });

  it('the lattice removes the unguarded rule from the graph', () => {
    expect(a.edges.some((e) => e.rule === 'raw')).toBe(false);
    expect(a.findings).toContainEqual(expect.objectContaining({ kind: 'lattice-refuses', rule: 'raw' }));
  });

  it('finds never-matching, shadowed and contradicted rules', () => {
    expect(a.findings).toContainEqual(expect.objectContaining({ kind: 'never-matches', rule: 'ghost' }));
    expect(a.findings).toContainEqual(expect.objectContaining({ kind: 'shadowed', rule: 'dup', by: ['key'] }));
    // `raw` matches port 80 too, where `out` (guarded) decides first.
    expect(a.findings).toContainEqual(expect.objectContaining({ kind: 'contradicted', rule: 'raw', by: ['out'] }));
    // `tag-in` matches worker→vault and relay→vault; but vault→vault is never a connection.
    expect(a.findings.find((f) => f.rule === 'tag-in')).toBeUndefined();
  });

  it('the only path from the key to outside passes dlp when relay cannot go out', () => {
    const p2 = { ...policy, rules: policy.rules.filter((r) => r.id !== 'relay-out') };
    const b = analyzeFlows(p2, topology);
    expect(b.onlyThrough('key', 'outside', 'dlp')).toBe(true);
    const hops = b.reach('key', 'outside').paths.map((p) => p.hops.join('>'));
    expect(hops.slice(0, 3).sort()).toEqual(['relay>worker>outside', 'vault>worker>outside', 'worker>outside']);
    expect(hops.slice(3).sort()).toEqual(['relay>vault>worker>outside', 'vault>relay>worker>outside']);
  });

  it('an unreachable target has no paths', () => {
    const b = analyzeFlows({ version: 1, rules: [] }, topology);
    expect(b.reach('key', 'outside')).toMatchObject({ reachable: false, paths: [] });
    expect(b.reach('key', 'vault').paths).toEqual([{ hops: ['vault'], edges: [], guards: [], declassifiedBy: null }]);
    expect(() => b.reach('key', 'nobody')).toThrow(PolicyError);
  });

  it('renders DOT with guard diamonds and reply edges', () => {
    const dot = a.toDot();
    expect(dot).toMatch(/^digraph flows \{/);
    expect(dot).toContain('"guard:dlp:worker:outside" [shape=diamond, label="dlp"]');
    expect(dot).toContain('"worker" -> "guard:dlp:worker:outside"');
    expect(dot).toMatch(/"worker" -> "vault" \[style=dotted, label="key \(reply\): 1"\]/);
  });

  it('renders a standalone SVG with every principal and guard', () => {
    const svg = a.toSvg();
    expect(svg).toMatch(/^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    for (const n of ['vault', 'worker', 'relay', 'outside', 'dlp', 'audit']) expect(svg).toContain(`>${n}</text>`);
    expect(svg.trim().endsWith('</svg>')).toBe(true);
    expect(svg).not.toContain('NaN');
  });

  it('caps path enumeration', () => {
    const principals: Record<string, { kind: 'machine'; secrecy: string[] }> = {};
    for (let i = 0; i < 8; i++) principals[`m${i}`] = { kind: 'machine', secrecy: ['t'] };
    const b = analyzeFlows({ version: 1, rules: [{ id: 'all', source: '*', destination: '*', action: 'allow' }] }, { version: 1, principals }, { maxPaths: 50 });
    const r = b.reach('t', 'm7');
    expect(r.paths).toHaveLength(50);
    expect(r.truncated).toBe(true);
    expect(b.onlyThrough('t', 'm7', 'x')).toBe(false);
  });
});
