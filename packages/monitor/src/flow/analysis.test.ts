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
    expect(b.reach('key', 'vault').paths).toEqual([{ hops: ['vault'], edges: [], guards: [], switches: [], declassifiedBy: null }]);
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

describe('analyzeFlows over switch links', () => {
  // vault reaches worker by vsock; worker and outside share switch `lan`; IPv4 frames pass the
  // `filter` guard (which may declassify the key), ARP is unguarded.
  const top: Topology = {
    version: 1,
    principals: {
      vault: { kind: 'machine', cid: 3, secrecy: ['key'] },
      worker: { kind: 'machine', cid: 4, secrecy: ['key'] },
      outside: { kind: 'machine', cid: 5 },
    },
    switches: { lan: { ports: ['worker', 'outside'] } },
  };
  const pol: FlowPolicy = {
    version: 1,
    guards: { filter: { declassify: ['key'] } },
    rules: [
      { id: 'key', source: 'vault', destination: 'worker', port: 1, action: 'allow' },
      { id: 'ipv4', source: '*', destination: '*', port: 0x0800, service: 'ethernet', action: 'allow', guard: 'filter' },
      { id: 'arp', source: '*', destination: '*', port: 0x0806, service: 'ethernet', action: 'allow' },
    ],
  };
  const a = analyzeFlows(pol, top);

  it('finds the path from the key through the switch, and the content filter on it', () => {
    const r = a.reach('key', 'outside');
    expect(r.paths.map((p) => `${p.hops.join('>')} via ${p.switches.join(',')} [${p.guards.join(',')}]`)).toEqual([
      'worker>outside via lan [filter]',
      'vault>worker>outside via lan [filter]',
    ]);
    expect(r.paths[0]?.edges[0]).toMatchObject({ channel: 'switch:lan', rule: 'ipv4', ports: ['0x800 (ethernet)'] });
    expect(a.onlyThrough('key', 'outside', 'filter')).toBe(true);
    expect(r.paths.every((p) => p.declassifiedBy === 'filter')).toBe(true);
  });

  it('frames flow only between ports of one switch, only one way per link, and never by vsock', () => {
    const frameEdges = a.edges.filter((e) => e.rule === 'ipv4' || e.rule === 'arp');
    expect(frameEdges.every((e) => e.channel === 'switch:lan' && e.direction === 'request')).toBe(true);
    // vault has no port on lan: no frame edge touches it, although the rules say `*`.
    expect(frameEdges.some((e) => e.from === 'vault' || e.to === 'vault')).toBe(false);
    // ARP worker → outside would lower secrecy without a guard: the lattice refuses it; outside → worker is fine.
    expect(frameEdges.filter((e) => e.rule === 'arp').map((e) => `${e.from}>${e.to}`)).toEqual(['outside>worker']);
    expect(a.edges.find((e) => e.rule === 'key')?.channel).toBe('vsock');
    expect(a.toDot()).toContain('[switch:lan]');
  });

  it('without the switch the key has no way out; with a second switch the path through a bridging machine is found', () => {
    const island = analyzeFlows(pol, { ...top, switches: { lan: { ports: ['vault', 'worker'] } } });
    expect(island.reach('key', 'outside').reachable).toBe(false);
    const two = analyzeFlows(pol, {
      ...top,
      principals: { ...top.principals, gw: { kind: 'machine', cid: 6 } },
      switches: { lan: { ports: ['worker', 'gw'] }, wan: { ports: ['gw', 'outside'] } },
    });
    const r = two.reach('key', 'outside');
    // gw → outside has two links (IPv4 through the filter, ARP unguarded): each chain is listed with both.
    expect(r.paths.map((p) => `${p.hops.join('>')} via ${p.switches.join(',')} [${p.guards.join(',')}]`)).toEqual([
      'worker>gw>outside via lan,wan [filter,filter]', 'worker>gw>outside via lan,wan [filter]',
      'vault>worker>gw>outside via lan,wan [filter,filter]', 'vault>worker>gw>outside via lan,wan [filter]',
    ]);
    expect(two.onlyThrough('key', 'outside', 'filter')).toBe(true);
  });

  it('a frame rule between principals that share no switch never matches', () => {
    const b = analyzeFlows({ ...pol, rules: [...pol.rules.slice(0, 1), { id: 'v-frames', source: 'vault', destination: 'outside', service: 'ethernet', action: 'allow' }] }, top);
    expect(b.findings.map((f) => `${f.kind} ${f.rule}`)).toContain('never-matches v-frames');
  });

  it('a malformed switch is a PolicyError naming its path', () => {
    const bad = (switches: unknown, path: string) => {
      try {
        analyzeFlows(pol, { ...top, switches });
      } catch (e) {
        expect(e).toBeInstanceOf(PolicyError);
        expect((e as PolicyError).message).toContain(path);
        return;
      }
      throw new Error(`accepted ${JSON.stringify(switches)}`);
    };
    bad([], 'topology.switches');
    bad({ lan: { ports: ['worker', 'printer'] } }, 'topology.switches.lan.ports[1]');
    bad({ lan: { ports: ['worker', 'worker'] } }, 'topology.switches.lan.ports[1]');
    bad({ lan: { ports: ['worker'], vlan: 3 } }, 'topology.switches.lan.vlan');
    bad({ lan: { ports: 'worker' } }, 'topology.switches.lan.ports');
    bad({ 'bad name!': { ports: [] } }, 'topology.switches');
  });
});
