import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { record, replay } from '@tsvm/core';
import { kvmAvailability } from '@tsvm/core/testing';
import { calibrate } from '@tsvm/monitor/calibrate';
import { guest, ramHash, execAnalysis, ROUNDS } from '../bench/replay.js';

const kvm = kvmAvailability();

describe.skipIf(!kvm.available)(`replay under a heavier monitor on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('record without a monitor, replay with an exec hook on the loop: same guest behaviour, and the hook fires every round', async () => {
    const calibration = await calibrate({ quick: true, cachePath: join(mkdtempSync(join(tmpdir(), 'tsvm-cal-')), 'c.json') });
    const vm = await guest(true);
    const rec = await record(vm, { timeout: 30_000 });
    expect(rec.stop).toMatchObject({ reason: 'debug-exit', code: 7 });
    const regs = vm.vcpu(0).getRegs();
    const data = vm.memory.read(0x100000n, 0x2000);
    const hash = ramHash(vm);
    await vm.close();
    const a = execAnalysis(calibration);
    const r = await replay(rec, { monitor: a.setup });
    try {
      // The probe's own exits (PROBE_PORT) are not guest exits: nothing diverges.
      expect(r.divergence).toBeUndefined();
      expect(r.exits).toBe(ROUNDS * 2 + 1);
      expect(a.hits()).toBe(ROUNDS);
      expect(r.machine.vcpu(0).getRegs()).toEqual(regs);
      // The data the guest computed; code pages may hold the analysis' probe bytes.
      expect(r.machine.memory.read(0x100000n, 0x2000)).toEqual(data);
    } finally {
      await r.machine.close();
    }
    // And a bare replay reproduces all of RAM.
    const bare = await replay(rec);
    expect(bare.divergence).toBeUndefined();
    expect(ramHash(bare.machine)).toBe(hash);
    await bare.machine.close();
    rec.snapshot.close();
  });
});
