import { InvalidArgumentError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { AuditLog } from '../audit.js';
import { FlowMonitor } from './monitor.js';
import type { FlowPolicy, Topology } from './policy.js';
import { calibrateFlowCosts, predictFlowCosts, type FlowCostModel } from './predict.js';

const topology: Topology = { version: 1, principals: { a: { kind: 'machine', cid: 3 }, b: { kind: 'machine', cid: 4 }, c: { kind: 'machine', cid: 5 } } };
const policy: FlowPolicy = {
  version: 1,
  guards: { scan: { declassify: [] } },
  rules: [
    { id: 'plain', source: 'a', destination: 'b', port: 1, action: 'allow' },
    { id: 'scanned', source: 'a', destination: 'c', port: 2, action: 'allow', guard: 'scan' },
    { id: 'scanned-too', source: 'b', destination: 'c', port: 2, action: 'allow', guard: 'scan' },
  ],
};
const model: FlowCostModel = { version: 1, source: 'given', connectionNs: 1000, messageNs: 100, messageByteNs: 0.5, auditLineNs: 50, guards: { scan: { messageNs: 300, byteNs: 2 } } };

describe('predictFlowCosts', () => {
  it('prices connections and unguarded messages per rule, inspections per guard over every rule naming it', () => {
    const p = predictFlowCosts(policy, {
      plain: { connections: 2, messages: 10, bytes: 1000 },
      scanned: { connections: 1, messages: 4, bytes: 400 },
      'scanned-too': { messages: 6, bytes: 600 },
    }, model);
    expect(p.rows).toEqual([
      { kind: 'rule', name: 'plain', connections: 2, messages: 10, bytes: 1000, predictedNs: 2 * 1000 + 10 * (100 + 50) + 1000 * 0.5 },
      { kind: 'rule', name: 'scanned', connections: 1, messages: 0, bytes: 0, predictedNs: 1000 },
      { kind: 'rule', name: 'scanned-too', connections: 0, messages: 0, bytes: 0, predictedNs: 0 },
      { kind: 'guard', name: 'scan', connections: 0, messages: 10, bytes: 1000, predictedNs: 10 * (300 + 50) + 1000 * 2 },
    ]);
    expect(p.totalNs).toBe(4000 + 1000 + 5500);
    expect(p.source).toBe('given');
    // Without per-message audit lines the audit price drops out.
    expect(predictFlowCosts(policy, { plain: { messages: 10 } }, model, { logMessages: 'denied' }).totalNs).toBe(1000);
  });

  it('rejects a rule the policy lacks, a negative count, a guard without a price and a malformed model', () => {
    expect(() => predictFlowCosts(policy, { nope: { messages: 1 } }, model)).toThrow(/no rule 'nope'/);
    expect(() => predictFlowCosts(policy, { plain: { messages: -1 } }, model)).toThrow(InvalidArgumentError);
    expect(() => predictFlowCosts(policy, { scanned: { messages: 1 } }, { ...model, guards: {} })).toThrow(/no price for guard 'scan'/);
    expect(() => predictFlowCosts(policy, {}, { ...model, connectionNs: Number.NaN })).toThrow(/model.connectionNs/);
    expect(() => predictFlowCosts(policy, {}, { ...model, version: 2 } as unknown as FlowCostModel)).toThrow(/version 1/);
  });
});

describe('a FlowMonitor with a cost model', () => {
  it("puts each row's predicted cost for its own counts beside the measured one", async () => {
    const m = new FlowMonitor({ policy, topology, guards: { scan: () => ({ action: 'allow' }) }, audit: new AuditLog(), costModel: model });
    const plain = await m.connect({ source: 'a', destination: 'b', port: 1 });
    const scanned = await m.connect({ source: 'a', destination: 'c', port: 2 });
    for (let i = 0; i < 3; i++) await m.message(plain.connection!, 'forward', new Uint8Array(100));
    for (let i = 0; i < 2; i++) await m.message(scanned.connection!, 'reverse', new Uint8Array(10));
    const rows = m.costs().rows;
    expect(rows.find((r) => r.name === 'plain')).toMatchObject({ messages: 3, predictedNs: 1000 + 3 * 150 + 300 * 0.5 });
    expect(rows.find((r) => r.name === 'scanned')).toMatchObject({ connections: 1, messages: 0, predictedNs: 1000 });
    expect(rows.find((r) => r.kind === 'guard')).toMatchObject({ name: 'scan', messages: 2, predictedNs: 2 * 350 + 20 * 2 });
    expect(() => new FlowMonitor({ policy, topology, guards: { scan: () => ({ action: 'allow' }) }, costModel: { ...model, auditLineNs: -1 } })).toThrow(/auditLineNs/);
    // Without a model the report has no predictions.
    const bare = new FlowMonitor({ policy, topology, guards: { scan: () => ({ action: 'allow' }) } });
    await bare.connect({ source: 'a', destination: 'b', port: 1 });
    expect(bare.costs().rows[0]?.predictedNs).toBeUndefined();
  });
});

describe('calibrateFlowCosts', () => {
  it('measures a guard that reads every byte as dearer per byte than one that reads none, and predicts a run within a few times', async () => {
    const sum = (d: Uint8Array) => { let s = 0; for (let i = 0; i < d.length; i++) s = (s + (d[i] as number) * 31 + i) | 0; return s; };
    const guards = { reader: (d: Uint8Array) => (sum(d) === 42 ? { action: 'block' as const } : { action: 'allow' as const }), blind: () => ({ action: 'allow' as const }) };
    const m = await calibrateFlowCosts({ guards, iterations: 500 });
    expect(m.source).toBe('measured');
    expect(m.connectionNs).toBeGreaterThan(0);
    expect(m.messageNs).toBeGreaterThan(0);
    const reader = m.guards['reader'], blind = m.guards['blind'];
    expect(reader && blind).toBeTruthy();
    // A JS loop over the bytes costs well above 0.1 ns/byte on any host; a guard that never
    // looks at them is a small fraction of that.
    expect(reader?.byteNs).toBeGreaterThan(0.1);
    expect(blind?.byteNs ?? Infinity).toBeLessThan((reader?.byteNs ?? 0) / 3);

    // The model against fresh runs of 4 KiB messages through the reading guard: five batches on
    // fresh monitors, the median ratio (a batch the shared host preempted says nothing).
    const p: FlowPolicy = { version: 1, guards: { reader: { declassify: [] } }, rules: [{ id: 'r', source: 'a', destination: 'b', port: 1, action: 'allow', guard: 'reader' }] };
    const data = new Uint8Array(4096);
    const ratios: number[] = [];
    for (let b = 0; b < 5; b++) {
      const mon = new FlowMonitor({ policy: p, topology, guards: { reader: guards.reader }, audit: new AuditLog(() => {}), logMessages: 'denied', costModel: m });
      const c = await mon.connect({ source: 'a', destination: 'b', port: 1 });
      for (let i = 0; i < 100; i++) await mon.message(c.connection!, 'forward', data);
      const row = mon.costs().rows.find((r) => r.kind === 'guard');
      ratios.push((row?.predictedNs ?? 0) / (row?.messageNs ?? 1));
    }
    const ratio = [...ratios].sort((x, y) => x - y)[2] as number;
    process.stderr.write(`[tsvm] flow cost model: reader guard ${reader?.messageNs.toFixed(0)} ns + ${reader?.byteNs.toFixed(2)} ns/B; 100 × 4 KiB predicted/measured = ${ratio.toFixed(2)} (median of 5 batches)\n`);
    expect(ratio).toBeGreaterThan(0.2);
    expect(ratio).toBeLessThan(5);
  });

  it('rejects bad sizes and iteration counts', async () => {
    await expect(calibrateFlowCosts({ sizes: [64, 64] })).rejects.toThrow(/sizes/);
    await expect(calibrateFlowCosts({ iterations: 3 })).rejects.toThrow(/iterations/);
  });
});
