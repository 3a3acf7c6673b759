import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, Machine } from '@tsvm/core';
import { MockBackend, outExit } from '@tsvm/core/testing';
import { Monitor } from '../monitor.js';
import { allow, deny } from '../decisions.js';
import { assumedTable } from '../calibration/table.js';
import { predict, report } from './model.js';
import { formatNs, renderJson, renderSvg, renderTable } from './render.js';

const pvm = assumedTable({ kernel: 't', cpu: 't', flavour: 'pvm' });

async function scenario() {
  const backend = new MockBackend();
  const steps = [];
  for (let i = 0; i < 10; i++) steps.push(outExit(0x3f8, 0x41), outExit(0x80, i));
  backend.script(...steps, { kind: 'hlt' });
  const vm = await Machine.create({ memory: 2 * 1024 * 1024, backend, name: 'costed' });
  vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
  vm.io.register({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
  const mon = new Monitor(vm, { calibration: pvm });
  mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => allow(), { name: 'uart-gate' });
  mon.mediate({ event: 'pio', ports: [0x80, 0x80] }, (ev) => (ev.event === 'pio' && ev.value === 99 ? deny() : allow()), { name: 'post-gate' });
  mon.observe({ event: 'exec', address: 0x1000, cpl: 3 }, () => {}, { name: 'entry' });
  return { vm, mon };
}

describe('cost model', () => {
  it('predict prices a plan from the table: exits that happen anyway cost only dispatch, probes cost in full', async () => {
    const { mon } = await scenario();
    const plan = mon.plan();
    expect(plan.map((p) => [p.name, p.mechanism, p.unitNs])).toEqual([['uart-gate', 'pio-exit', 11_000], ['post-gate', 'pio-exit', 11_000], ['entry', 'probe-breakpoint', 64_000]]);
    const p = predict(plan, { 'uart-gate': 100, entry: 10 }, pvm, { handlerNs: { 'uart-gate': 50 } });
    expect(p.hooks[0]?.overheadNs).toBe(100 * (300 + 50));
    expect(p.hooks[1]?.overheadNs).toBe(0);
    // 'entry' observes: an observer pays the observe dispatch (no decision pipeline).
    expect(p.hooks[2]?.overheadNs).toBe(10 * (64_000 + 200));
    expect(p.totalNs).toBe(35_000 + 642_000);
    expect(p.source).toBe('assumed');
    expect(() => predict(plan, { entry: -1 }, pvm)).toThrow(InvalidArgumentError);
  });

  it('a measured table prices probes, write-watch and MSR exits through the monitor: no dispatch on top', async () => {
    const { mon } = await scenario();
    const plan = mon.plan();
    const measured = { ...pvm, source: 'measured' as const };
    const p = predict(plan, { 'uart-gate': 100, entry: 10 }, measured);
    expect(p.hooks[0]?.overheadNs).toBe(100 * 300); // an exit that happens anyway: dispatch only
    expect(p.hooks[2]?.overheadNs).toBe(10 * 64_000); // the probe's unit price holds its delivery
  });

  it('report after a run: events, unit price, handler time from the counters, share, and the cheaper alternative', async () => {
    const { vm, mon } = await scenario();
    const stop = await vm.run();
    const r = report(mon, { run: stop });
    const uart = r.hooks.find((h) => h.name === 'uart-gate');
    expect(uart).toMatchObject({ mechanism: 'pio-exit', events: 10, unitNs: 11_000 });
    expect(uart?.handlerNs).toBeGreaterThan(0);
    expect(uart?.totalNs).toBeGreaterThanOrEqual(10 * 11_000);
    expect(uart?.alternative).toMatchObject({ mechanism: 'coalesced-pio', savesNs: 10 * (11_000 - 2_300) });
    expect(r.hooks.find((h) => h.name === 'entry')?.alternative).toBeUndefined(); // nothing cheaper works at CPL3 on PVM
    expect(r.runNs).toBeCloseTo(stop.elapsedMs * 1e6);
    const text = renderTable(r);
    expect(text).toMatch(/uart-gate\s+pio-exit\s+CPL0\s+10\s+11\.0 µs/);
    expect(text).toMatch(/observe instead of mediate .* would save 87\.0 µs/);
    const json = JSON.parse(renderJson(r)) as { hooks: unknown[] };
    expect(json.hooks).toHaveLength(3);
  });

  it('renders a self-contained SVG with axes, labels, legend and one bar pair per hook', async () => {
    const { vm, mon } = await scenario();
    const prediction = predict(mon.plan(), { 'uart-gate': 10, 'post-gate': 10, entry: 0 }, pvm);
    const r = report(mon, { run: await vm.run() });
    const svg = renderSvg(r, prediction, { title: 'Monitor cost <test>' });
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-svg-'));
    const file = join(dir, 'cost.svg');
    writeFileSync(file, svg);
    const text = readFileSync(file, 'utf8');
    expect(text.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
    expect(text.trimEnd().endsWith('</svg>')).toBe(true);
    expect(text).toContain('Monitor cost &lt;test&gt;');
    expect(text.match(/class="bar measured"/g)).toHaveLength(3);
    expect(text.match(/class="bar predicted"/g)).toHaveLength(3);
    expect(text.match(/class="axis"/g)).toHaveLength(2);
    expect(text).toContain('cost per run (µs)');
    expect(text).toContain('predicted overhead');
    expect(text).toContain('measured total');
    expect(text).not.toMatch(/NaN|undefined|<script|href=/);
    // Balanced tags (a cheap well-formedness check without an XML parser).
    const opens = (text.match(/<(rect|text|g|svg|title)(\s[^>]*)?>/g) ?? []).filter((t) => !t.endsWith('/>')).length;
    const closes = (text.match(/<\/(rect|text|g|svg|title)>/g) ?? []).length;
    expect(opens).toBe(closes);
  });

  it('formats nanoseconds for people', () => {
    expect([formatNs(850), formatNs(12_300), formatNs(4_560_000), formatNs(1.2e9), formatNs(NaN)]).toEqual(['850 ns', '12.3 µs', '4.56 ms', '1.20 s', '—']);
  });
});
