import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '@tsvm/core';
import { kvmAvailability } from '@tsvm/core/testing';
import { verifyAuditLog } from '@tsvm/monitor';
import { Sandbox, type ScanReport } from './scan.js';
import { SAMPLES, type AssembledSample } from './scan-samples.js';
import { DISK_SIZE } from './scan-sandbox.js';

const kvm = kvmAvailability();
// Generous: a benign sample finishes in a few ms, but this host is shared; only the spinners pay it.
const TIMEOUT_MS = 300;

describe.skipIf(!kvm.available)(`example: scan${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  let box: Sandbox;
  let samples: AssembledSample[];
  let fork: ScanReport;
  let reset: ScanReport;
  beforeAll(async () => {
    box = await Sandbox.create();
    samples = await box.assemble();
    fork = await box.scan(samples, { mode: 'fork', timeoutMs: TIMEOUT_MS });
    reset = await box.scan(samples, { mode: 'reset', timeoutMs: TIMEOUT_MS });
  }, 120_000);
  afterAll(() => box?.close());

  it('has at least 20 samples covering every kind of verdict', () => {
    expect(samples.length).toBeGreaterThanOrEqual(20);
    const kinds = new Set(SAMPLES.map((s) => s.expected.split(':')[0]));
    expect([...kinds].sort()).toEqual(['benign', 'crashed', 'malicious', 'timeout']);
    const reasons = new Set(SAMPLES.map((s) => s.expected).filter((v) => v.startsWith('malicious:')));
    expect([...reasons].sort()).toEqual(['malicious:device-access', 'malicious:forbidden-port', 'malicious:self-modifying-code', 'malicious:wild-read', 'malicious:wild-write']);
  });

  it('fork per sample: every verdict is the expected one, from what the monitor stopped', () => {
    expect(fork.samples.map((r) => [r.name, r.verdict])).toEqual(samples.map((s) => [s.name, s.expected]));
    for (const r of fork.samples) {
      // Each payload really came over the disk: the monitor saw the device's DMA of all of it.
      expect(r.delivered, r.name).toBe(DISK_SIZE);
      if (r.verdict.startsWith('malicious:')) {
        expect(r.stop, r.name).toBe('violation');
        expect(r.findings[0]?.kind, r.name).toBe(r.verdict.slice('malicious:'.length));
        // The deny that stopped it is the last line of its audit chain.
        expect(r.audit.lines.at(-1), r.name).toMatch(/"decision":"deny"/);
      } else {
        expect(r.findings, r.name).toEqual([]);
      }
    }
    const byName = new Map(fork.samples.map((r) => [r.name, r]));
    expect(byName.get('hello')?.printed).toBe('hello\n');
    expect(byName.get('rep-outsb')?.printed).toBe('bulk!\n');
    expect(byName.get('print-then-spin')?.printed).toBe('working...\n');
    expect(byName.get('cmos-read')?.findings[0]?.address).toBe(0x70n);
    expect(byName.get('beyond-ram')?.findings[0]?.address).toBe(0x100000n);
  });

  it('reset per sample gives the same verdicts, findings and output as fork per sample', () => {
    const view = (s: ScanReport) => s.samples.map((r) => ({ name: r.name, verdict: r.verdict, stop: r.stop, printed: r.printed, delivered: r.delivered, findings: r.findings.map((f) => [f.kind, f.address, f.rip]) }));
    expect(view(reset)).toEqual(view(fork));
    expect(reset.pagesCopied).toBeGreaterThan(0);
  });

  it('every audit chain verifies against its head, and tampering with one is detected', () => {
    for (const r of [...fork.samples, ...reset.samples]) {
      expect(r.verification, r.name).toEqual({ ok: true, count: r.audit.lines.length, head: r.audit.head });
      expect(r.audit.lines.length, r.name).toBeGreaterThan(0);
    }
    const cmos = fork.samples.find((r) => r.name === 'cmos-read');
    if (!cmos) throw new Error('no cmos-read sample');
    const edited = cmos.audit.lines.map((l) => l.replace('"decision":"deny"', '"decision":"allow"'));
    expect(verifyAuditLog(edited, { head: cmos.audit.head }).ok).toBe(false);
    expect(verifyAuditLog(cmos.audit.lines.slice(0, -1), { head: cmos.audit.head }).ok).toBe(false);
  });

  it('the verdict ignores what a sample claims about itself: a mislabelled sample gets the observed verdict', async () => {
    const lying = samples.filter((s) => s.name === 'hello' || s.name === 'cmos-read').map((s) => ({ ...s, expected: 'timeout' as const }));
    const r = await box.scan(lying, { mode: 'reset', timeoutMs: TIMEOUT_MS });
    expect(r.samples.map((x) => x.verdict)).toEqual(['benign', 'malicious:forbidden-port']);
  });

  it('bad scan options are typed errors, before any machine is made', async () => {
    await expect(box.scan(samples, { mode: 'spawn' as 'fork' })).rejects.toThrow(InvalidArgumentError);
    await expect(box.scan(samples, { mode: 'reset', timeoutMs: -1 })).rejects.toThrow(/timeoutMs/);
    await expect(box.assemble([SAMPLES[0]!, SAMPLES[0]!])).rejects.toThrow(/two samples are named 'hello'/);
  });

  it('reports samples/s for both modes', () => {
    for (const s of [fork, reset]) {
      expect(s.samplesPerSecond).toBeGreaterThan(0);
      expect(s.samplesPerSecond).toBeCloseTo((1000 * s.samples.length) / s.elapsedMs, 6);
    }
  });
});
