import { describe, expect, it } from 'vitest';
import { kvmAvailability } from '@tsvm/core/testing';
import { runObserveVsMediate } from './observe-vs-mediate.js';

const kvm = kvmAvailability();

describe.skipIf(!kvm.available)(`example: observe-vs-mediate${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('both ways see the same stream; observing through the coalesced ring is cheaper per event', async () => {
    const r = await runObserveVsMediate({ events: 2000, repeats: 3 });
    process.stderr.write(`[observe-vs-mediate] mediate ${r.mediate.perEventNs.toFixed(0)} ns/event (${r.mediate.mechanism}), observe ${r.observe.perEventNs.toFixed(0)} ns/event (${r.observe.mechanism}), ratio ${r.ratio.toFixed(2)}\n`);
    expect(r.mediate.mechanism).toBe('pio-exit');
    expect(r.observe.mechanism).toBe('coalesced-pio');
    expect(r.mediate.events).toBe(2000);
    expect(r.observe.events).toBe(2000);
    expect(r.observe.checksum).toBe(r.mediate.checksum);
    expect(r.ratio).toBeGreaterThan(1);
    for (const w of [r.mediate, r.observe]) {
      // One run figure: the printed run is the reported run.
      expect(w.runMs).toBe(w.report.runNs / 1e6);
      expect(w.report.run.source).toBe('stop');
      expect(w.runs.min).toBeLessThanOrEqual(w.runMs);
      expect(w.runs.max).toBeGreaterThanOrEqual(w.runMs);
      expect(w.perEvent.min).toBeLessThanOrEqual(w.perEvent.max);
      expect(w.pricedPerEventNs).toBeCloseTo(w.report.hooks[0]?.perEventNs ?? NaN);
    }
    // Observing through the ring replaces the exit the write makes anyway: reported as a saving.
    expect(r.observe.report.hooks[0]?.savesNs).toBeGreaterThan(0);
  });
});
