import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { assumedTable, priceOf, resultOf, MECHANISMS, type CalibrationTable } from './table.js';
import { loadCalibration, saveCalibration, validateTable } from './cache.js';
import { hostIdentity, hostKey } from './host.js';
import { measureHookDispatch } from './calibrate.js';
import { selectMechanism } from '../mechanisms.js';
import { normaliseSpec } from '../events.js';
import { MockBackend } from '@tsvm/core/testing';

const dirs: string[] = [];
const tmp = (): string => { const d = mkdtempSync(join(tmpdir(), 'tsvm-cal-')); dirs.push(d); return join(d, 'sub', 'calibration.json'); };
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }); });

describe('calibration tables and cache', () => {
  it('the assumed PVM table matches HOST-FACTS: what works per CPL and the figures', () => {
    const t = assumedTable({ kernel: 'k', cpu: 'c', flavour: 'pvm' });
    expect(priceOf(t, 'pio-exit', 0)).toBe(11_000);
    expect(priceOf(t, 'pio-exit', 3)).toBe(31_000);
    expect(resultOf(t, 'single-step', 3)).toMatchObject({ works: false, failure: expect.stringMatching(/#DB/) });
    expect(resultOf(t, 'sw-breakpoint', 0)).toMatchObject({ works: false, failure: expect.stringMatching(/INTERNAL_ERROR/) });
    expect(resultOf(t, 'hw-breakpoint', 3)).toMatchObject({ works: false });
    expect(resultOf(t, 'msr-exit', 3).works).toBe(false);
    // Dirty rings exist on PVM (core's measureDirtyTracking prices them for reset).
    expect(resultOf(t, 'dirty-ring-harvest', 3)).toMatchObject({ works: true, note: expect.stringMatching(/4 pages/) });
    expect(validateTable(JSON.parse(JSON.stringify(t)))).toEqual(t);
  });

  it('stores one table per host identity and never reuses another host\'s', () => {
    const path = tmp();
    const a = { ...assumedTable({ kernel: '6.1', cpu: 'X', flavour: 'pvm' }), source: 'measured' as const };
    const b = { ...assumedTable({ kernel: '6.8', cpu: 'X', flavour: 'vmx' }), source: 'measured' as const };
    saveCalibration(a, { path });
    saveCalibration(b, { path });
    expect(loadCalibration(a.host, { path })).toEqual(a);
    expect(loadCalibration(b.host, { path })).toEqual(b);
    expect(loadCalibration({ kernel: '6.2', cpu: 'X', flavour: 'pvm' }, { path })).toBeUndefined();
    expect(Object.keys((JSON.parse(readFileSync(path, 'utf8')) as { tables: object }).tables)).toEqual([a.host, b.host].map((h) => expect.stringContaining(hostKey(h))));
  });

  it('a corrupt or malformed cache is ignored, and malformed tables are refused naming the field', () => {
    const path = tmp();
    saveCalibration(assumedTable(hostIdentity('pvm')), { path });
    writeFileSync(path, '{ truncated');
    expect(loadCalibration(hostIdentity('pvm'), { path })).toBeUndefined();
    const t = assumedTable(hostIdentity('pvm'));
    const broken = { ...t, results: { ...t.results, 'pio-exit': { cpl0: { works: true }, cpl3: t.results['pio-exit'].cpl3 } } };
    expect(() => validateTable(broken)).toThrow(/results\.pio-exit/);
    expect(() => saveCalibration(broken as unknown as CalibrationTable, { path })).toThrow(/TSVM|calibration table/);
  });

  it('mechanism selection follows an injected table, per CPL', () => {
    const caps = new MockBackend().capabilities;
    const t = assumedTable({ kernel: 'k', cpu: 'c', flavour: 'pvm' });
    const base = { caps, table: t, mediatedOverlap: false, devicesCover: true, freeDebugRegs: 4, mode: 'observe' as const };
    const exec = normaliseSpec({ event: 'exec', address: 0x1000 });
    expect(selectMechanism({ ...base, spec: exec, cpl: 3 }).mechanism).toBe('probe-breakpoint');
    // At CPL0 on PVM hw breakpoints work but cost 52 µs vs the probe's 24 µs: the probe wins.
    expect(selectMechanism({ ...base, spec: exec, cpl: 0 }).rejected).toContainEqual({ mechanism: 'hw-breakpoint', why: expect.stringMatching(/dearer/) });
    const cheapHw: CalibrationTable = { ...t, results: { ...t.results, 'hw-breakpoint': { cpl0: { works: true, ns: 5_000 }, cpl3: { works: false, failure: 'x' } } } };
    expect(selectMechanism({ ...base, table: cheapHw, spec: exec, cpl: 0 }).mechanism).toBe('hw-breakpoint');
    expect(selectMechanism({ ...base, table: cheapHw, spec: exec, cpl: 0, freeDebugRegs: 0 }).mechanism).toBe('probe-breakpoint');
    const pio = normaliseSpec({ event: 'pio', ports: [0x3f8, 0x3ff] });
    expect(selectMechanism({ ...base, spec: pio, cpl: 0 }).mechanism).toBe('coalesced-pio');
    expect(selectMechanism({ ...base, spec: pio, cpl: 0, devicesCover: false }).why).toMatch(/no device covers/);
    expect(selectMechanism({ ...base, spec: pio, cpl: 0, caps: { ...caps, coalescedPio: false } }).mechanism).toBe('pio-exit');
    expect(selectMechanism({ ...base, spec: normaliseSpec({ event: 'pio', ports: [0x60, 0x60], direction: 'in' }), cpl: 0 }).why).toMatch(/only carries writes/);
    expect(() => selectMechanism({ ...base, mode: 'mediate', spec: normaliseSpec({ event: 'write-watch', range: [0, 4095] }), cpl: 0, caps: { ...caps, readonlyMemory: false } })).toThrow(/read-only memslots/);
    expect(MECHANISMS.every((m) => t.results[m] !== undefined)).toBe(true);
  });

  it('measures hook dispatch overhead on the mock backend', async () => {
    const ns = await measureHookDispatch(3_000);
    expect(ns).toBeGreaterThanOrEqual(0);
    expect(ns).toBeLessThan(1e6);
  });
});
