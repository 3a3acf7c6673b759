import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { RIP_ON_INSTRUCTION } from '@tsvm/core';
import { MockBackend } from '@tsvm/core/testing';
import { assumedTable, hostIdentity } from '@tsvm/monitor';
import { saveCalibration } from '@tsvm/monitor/calibrate';
import { doctor, renderDoctor } from './doctor.js';
import { program } from './program.js';

const dirs: string[] = [];
const tmp = (): string => { const d = mkdtempSync(join(tmpdir(), 'tsvm-doctor-')); dirs.push(d); return d; };
afterEach(() => { for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true }); });

describe('tsvm doctor', () => {
  it('reports flavour, capabilities and the learned I/O-exit RIP rule, and says when no calibration exists', () => {
    const backend = new MockBackend({ ioExitRip: { ...RIP_ON_INSTRUCTION, 'out-dx': 'after' } });
    const r = doctor({ backend, cachePath: join(tmp(), 'none.json') });
    expect(r.kvm).toMatchObject({ available: true, flavour: 'mock' });
    expect(r.calibration.present).toBe(false);
    const text = renderDoctor(r);
    expect(text).toMatch(/flavour mock/);
    expect(text).toMatch(/past the instruction for out-dx; on it otherwise/);
    expect(text).toMatch(/calibration: none for this host/);
  });

  it('reads this host\'s calibration table: what works at which CPL, and how old it is', () => {
    const path = join(tmp(), 'c.json');
    const table = { ...assumedTable(hostIdentity('pvm')), createdAt: '2026-12-01T10:00:00.000Z' };
    saveCalibration(table, { path });
    const r = doctor({ backend: new MockBackend({ flavour: 'pvm' }), cachePath: path, now: new Date('2026-12-01T13:00:00.000Z') });
    expect(r.calibration).toMatchObject({ present: true, measuredAt: '2026-12-01T10:00:00.000Z', ageHours: 3 });
    // HOST-FACTS: on PVM the probe works at CPL3, guest-debug breakpoints do not.
    expect(r.calibration.works?.['probe-breakpoint']).toEqual({ cpl0: true, cpl3: true });
    expect(r.calibration.works?.['sw-breakpoint']?.cpl3).toBe(false);
    expect(renderDoctor(r)).toMatch(/probe-breakpoint\s+CPL0 works\s+CPL3 works/);
  });

  it('an unusable KVM is a finding, not a crash', () => {
    expect(renderDoctor({ kvm: { available: false, reason: 'cannot open /dev/kvm: ENOENT' }, calibration: { path: '/x', present: false } }))
      .toMatch(/KVM: not usable — cannot open \/dev\/kvm: ENOENT/);
  });

  it('`tsvm doctor --json` prints the report as JSON; an unknown command exits with commander\'s code', async () => {
    const printed: string[] = [];
    await program((t) => printed.push(t)).parseAsync(['node', 'tsvm', 'doctor', '--json', '--cache', join(tmp(), 'none.json')]);
    const r = JSON.parse(printed.join('')) as { kvm: { available: boolean }; calibration: { present: boolean } };
    expect(typeof r.kvm.available).toBe('boolean');
    expect(r.calibration.present).toBe(false);
    await expect(program(() => {}).configureOutput({ writeErr: () => {} }).parseAsync(['node', 'tsvm', 'nonsense'])).rejects.toMatchObject({ exitCode: 1 });
  });
});
