import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { InvalidArgumentError, Machine } from '@tsvm/core';
import { MockBackend, outExit } from '@tsvm/core/testing';
import { Monitor } from '../monitor.js';
import { allow, deny } from '../decisions.js';
import { assumedTable } from '../calibration/table.js';
import { predict, report } from './model.js';
import { costRows, formatNs, formatOverhead, formatPlan, formatReport, planRows, renderJson, renderSvg, renderTable } from './render.js';
import { CHART, renderChart } from './chart.js';

const dirs: string[] = [];
afterEach(() => { for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true }); });

const pvm = assumedTable({ kernel: 't', cpu: 't', flavour: 'pvm' });

async function scenario() {
  const backend = new MockBackend();
  const steps = [];
  for (let i = 0; i < 10; i++) steps.push(outExit(0x3f8, 0x41), outExit(0x80, i));
  backend.script(...steps, { kind: 'hlt' });
  const vm = await Machine.create({ memory: 2 * 1024 * 1024, backend, name: 'costed' });
  vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
  vm.io.register({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
  // A movable instruction at the exec hook's address: one exit per hit (see PlanEntry.exitsPerHit).
  vm.loadFlat(Uint8Array.of(0x90, 0x90, 0xf4), { at: 0x1000, mode: 'long', ring: 0 });
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
    expect(plan.map((p) => [p.name, p.mechanism, p.unitNs])).toEqual([['uart-gate', 'pio-exit', 11_000], ['post-gate', 'pio-exit', 11_000], ['entry', 'probe-breakpoint', 32_000]]);
    const p = predict(plan, { 'uart-gate': 100, entry: 10 }, pvm, { handlerNs: { 'uart-gate': 50 } });
    expect(p.hooks[0]?.overheadNs).toBe(100 * (300 + 50));
    expect(p.hooks[1]?.overheadNs).toBe(0);
    // 'entry' observes: an observer pays the observe dispatch (no decision pipeline).
    expect(p.hooks[2]?.overheadNs).toBe(10 * (32_000 + 200));
    expect(p.totalNs).toBe(35_000 + 322_000);
    expect(p.source).toBe('assumed');
    expect(() => predict(plan, { entry: -1 }, pvm)).toThrow(InvalidArgumentError);
  });

  it('a measured table prices probes, write-watch and MSR exits through the monitor: no dispatch on top', async () => {
    const { mon } = await scenario();
    const plan = mon.plan();
    const measured = { ...pvm, source: 'measured' as const };
    const p = predict(plan, { 'uart-gate': 100, entry: 10 }, measured);
    expect(p.hooks[0]?.overheadNs).toBe(100 * 300); // an exit that happens anyway: dispatch only
    expect(p.hooks[2]?.overheadNs).toBe(10 * 32_000); // the probe's unit price holds its delivery
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
    expect(text).toMatch(/uart-gate\s+pio-exit\s+CPL0\s+10\s+11\.0 µs\s+300 ns/);
    expect(text).toMatch(/observe instead of mediate .* would save 87\.0 µs/);
    const json = JSON.parse(renderJson(r)) as { hooks: unknown[] };
    expect(json.hooks).toHaveLength(3);
  });

  it('renders a self-contained SVG of predicted vs measured overhead per hook: like with like, value labels, nothing off the canvas', async () => {
    const { vm, mon } = await scenario();
    const prediction = predict(mon.plan(), { 'uart-gate': 10, 'post-gate': 10, entry: 0 }, pvm);
    const r = report(mon, { run: await vm.run() });
    const svg = renderSvg(r, prediction, { title: 'Monitor cost <test>' });
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-svg-'));
    dirs.push(dir);
    const file = join(dir, 'cost.svg');
    writeFileSync(file, svg);
    const text = readFileSync(file, 'utf8');
    expect(text.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
    expect(text.trimEnd().endsWith('</svg>')).toBe(true);
    expect(text).toContain('Monitor cost &lt;test&gt;');
    // Measured bars are the report's *overheads* (not totals), predicted bars the prediction's.
    const ns = (cls: string): number[] => [...text.matchAll(new RegExp(`class="bar ${cls}"[^>]*data-ns="(-?\\d+)"`, 'g'))].map((m) => Number(m[1]));
    expect(ns('measured')).toEqual(r.hooks.map((h) => Math.round(h.overheadNs)));
    expect(ns('predicted')).toEqual(prediction.hooks.map((h) => Math.round(h.overheadNs)));
    expect(text).toContain('overhead per run (µs)');
    expect(text).not.toMatch(/NaN|undefined|<script|href=/);
    const opens = (text.match(/<(rect|text|g|svg|title)(\s[^>]*)?>/g) ?? []).filter((t) => !t.endsWith('/>')).length;
    const closes = (text.match(/<\/(rect|text|g|svg|title)>/g) ?? []).length;
    expect(opens).toBe(closes);
  });

  it('chart: bars, value labels in the axis unit, error bars from repeats, savings left of zero, no clipped label', () => {
    const rows = [
      { label: 'pio-loop + mediate pio', detail: 'pio-exit, CPL3, 6000 events', predictedNs: 4.03e6, measuredNs: 4.35e6, spread: { lowNs: 3.56e6, highNs: 4.76e6, n: 9 }, note: '|err| 7 %' },
      { label: 'pio-loop + observe pio', detail: 'coalesced-pio, CPL3', predictedNs: -113.7e6, measuredNs: -138.4e6, spread: { lowNs: -151.4e6, highNs: -131.4e6, n: 9 } },
      { label: 'a label far too long to fit in the label column of any reasonable chart, really', predictedNs: 600e3, measuredNs: 69.02e6 },
    ];
    const svg = renderChart({ title: 'T', rows, footnote: 'measured prices' });
    const W = Number(/<svg[^>]*width="(\d+)"/.exec(svg)?.[1]);
    expect(W).toBe(CHART.width);
    expect(svg.match(/class="bar predicted"/g)).toHaveLength(3);
    expect(svg.match(/class="bar measured"/g)).toHaveLength(3);
    expect(svg.match(/class="errorbar"/g)).toHaveLength(2);
    const values = [...svg.matchAll(/<text class="value (\w+)" x="([-\d.]+)"[^>]*text-anchor="(\w+)" data-chars="(\d+)">([^<]*)</g)].map((m) => ({ cls: m[1], x: Number(m[2]), anchor: m[3], chars: Number(m[4]), text: m[5] }));
    expect(values.map((v) => v.text)).toEqual(['4.03 ms', '4.35 ms  |err| 7 %', '−114 ms', '−138 ms', '0.60 ms', '69.0 ms']);
    // Every value label lies inside the canvas, right of the label column.
    const left = Number(/class="axis" x1="([\d.]+)"/.exec(svg)?.[1]);
    for (const v of values) {
      const [a, b] = v.anchor === 'end' ? [v.x - v.chars * CHART.charWidth, v.x] : [v.x, v.x + v.chars * CHART.charWidth];
      expect(a).toBeGreaterThanOrEqual(left);
      expect(b).toBeLessThanOrEqual(W);
    }
    // Savings point left of the zero line, costs right of it.
    const zero = Number(/class="zero" x1="([\d.]+)"/.exec(svg)?.[1]);
    const bars = [...svg.matchAll(/class="bar measured" x="([\d.]+)" y="[\d.]+" width="([\d.]+)"/g)].map((m) => [Number(m[1]), Number(m[2])] as const);
    expect(bars[0]?.[0]).toBeCloseTo(zero, 0);
    expect((bars[1]?.[0] ?? 0) + (bars[1]?.[1] ?? 0)).toBeCloseTo(zero, 0);
    // The error bar spans the spread, on the same scale as the bars.
    const eb = /class="errorbar" data-low-ns="(\d+)" data-high-ns="(\d+)"><line x1="([\d.]+)"[^>]*x2="([\d.]+)"/.exec(svg);
    expect([Number(eb?.[1]), Number(eb?.[2])]).toEqual([3.56e6, 4.76e6]);
    expect(Number(eb?.[4])).toBeGreaterThan(Number(eb?.[3]));
    // Labels: truncated with an ellipsis (full text in a tooltip), and the label column fits the longest shown.
    const labels = [...svg.matchAll(/<text class="label" x="([\d.]+)"[^>]*data-chars="(\d+)">([^<]*)/g)].map((m) => ({ x: Number(m[1]), chars: Number(m[2]), text: m[3] as string }));
    expect(labels).toHaveLength(3);
    expect(labels[2]?.text.endsWith('…')).toBe(true);
    for (const l of labels) expect(l.x - l.chars * CHART.charWidth).toBeGreaterThanOrEqual(0);
    expect(svg).toContain('overhead per run (ms); left of 0: the hook saves time');
    expect(svg).toContain('spread over repeats');
  });

  it('formats nanoseconds for people, and savings as savings', () => {
    expect([formatNs(850), formatNs(12_300), formatNs(4_560_000), formatNs(1.2e9), formatNs(NaN)]).toEqual(['850 ns', '12.3 µs', '4.56 ms', '1.20 s', '—']);
    expect([formatOverhead(1_200_000), formatOverhead(-124_950_000), formatOverhead(NaN)]).toEqual(['+1.20 ms', 'saves 124.95 ms', '—']);
  });

  it('plan and report as flat rows for console.table, and as text tables', async () => {
    const { vm, mon } = await scenario();
    const rows = planRows(mon.plan());
    expect(rows).toHaveLength(3);
    for (const row of rows) for (const v of Object.values(row)) expect(['string', 'number']).toContain(typeof v);
    expect(rows[0]).toMatchObject({ hook: 'uart-gate', mode: 'mediate', cpl: 'CPL0', mechanism: 'pio-exit', unit: '11.0 µs' });
    expect(rows[0]?.rejected).toMatch(/coalesced-pio: /);
    expect(formatPlan(mon.plan()).split('\n')).toHaveLength(2 + 3);
    const r = report(mon, { run: await vm.run() });
    const cr = costRows(r);
    for (const row of cr) for (const v of Object.values(row)) expect(['string', 'number']).toContain(typeof v);
    expect(cr.find((c) => c.hook === 'uart-gate')).toMatchObject({ events: 10, unit: '11.0 µs', dispatch: '300 ns', share: expect.stringMatching(/%$/) });
    expect(cr.find((c) => c.hook === 'uart-gate')?.cheaper).toMatch(/coalesced-pio.*saves 87\.0 µs/);
    const uart = r.hooks.find((h) => h.name === 'uart-gate');
    expect(uart?.perEventNs).toBeCloseTo((uart?.totalNs ?? 0) / 10);
    const text = formatReport(r);
    expect(text).toContain(`run ${formatNs(r.runNs)} (Stop.elapsedMs, wall time of run())`);
    expect(text.match(new RegExp(`run ${formatNs(r.runNs).replace('.', '\\.')}`, 'g'))).toHaveLength(1);
  });

  it('an observe hook that replaces an exit by the coalesced ring is reported as a saving, not a negative overhead', async () => {
    const backend = new MockBackend();
    backend.script(...Array.from({ length: 20 }, (_, i) => outExit(0x80, i)), { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * 1024 * 1024, backend, name: 'saver' });
    vm.io.register({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'pio', ports: [0x80, 0x80], direction: 'out' }, () => {}, { name: 'post-log' });
    const p = predict(mon.plan(), { 'post-log': 1000 }, pvm);
    expect(p.hooks[0]?.mechanism).toBe('coalesced-pio');
    expect(p.hooks[0]?.overheadNs).toBe(1000 * (2_300 - 11_000 + 200));
    expect(p.hooks[0]?.savesNs).toBe(1000 * (11_000 - 2_300 - 200));
    const r = report(mon, { run: await vm.run() });
    const h = r.hooks[0];
    expect(h?.overheadNs).toBeLessThan(0);
    expect(h?.savesNs).toBe(-(h?.overheadNs ?? 0));
    expect(costRows(r)[0]?.['vs no hook']).toBe(formatOverhead(h?.overheadNs ?? 0));
    expect(formatReport(r)).toMatch(/post-log .* saves /);
    expect(formatReport(r)).not.toMatch(/ -\d/);
  });

  it('one-time costs are no event\'s price: a deny whose audit write blocks 30 ms charges the hook only unit + dispatch + handler', async () => {
    const backend = new MockBackend();
    backend.script(outExit(0x70, 1), { kind: 'hlt' });
    const vm = await Machine.create({ memory: 2 * 1024 * 1024, backend, name: 'denied' });
    vm.io.register({ port: 0x70, size: 2 }, { name: 'rtc', write: () => {} });
    const slowSink = (): void => { const t = performance.now(); while (performance.now() - t < 30) { /* a blocking audit sink */ } };
    const mon = new Monitor(vm, { calibration: pvm, audit: slowSink });
    mon.mediate({ event: 'pio', ports: [0x70, 0x71] }, () => deny({ reason: 'CMOS' }), { name: 'cmos' });
    const stop = await vm.run();
    expect(stop.reason).toBe('violation');
    const r = report(mon, { run: stop });
    const h = r.hooks[0];
    expect(h?.events).toBe(1);
    expect(h?.dispatchNs).toBe(300);
    expect(h?.totalNs).toBe(11_000 + 300 + (h?.handlerNs ?? NaN));
    expect(h?.handlerNs).toBeLessThan(5e6); // the function, not the deny path around it
    // The 30 ms is in the run's exit handling, charged to no hook.
    expect(r.run.vmmNs).toBeGreaterThanOrEqual(30e6);
    expect(r.run.unchargedVmmNs).toBeGreaterThanOrEqual(30e6 - (h?.handlerNs ?? 0) - 300);
    expect(h?.share).toBeLessThan(0.2);
    expect(r.run.ns).toBe(r.runNs);
    expect(r.run.source).toBe('stop');
    expect(r.run.oneTimeNs).toBeCloseTo(Math.max(0, r.runNs - r.run.guestNs - r.run.vmmNs));
  });
});
