import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { MockBackend, outExit } from '../testing/mock.js';
import { kvmAvailability } from '../testing/kvm-gate.js';

const kvm = kvmAvailability();

describe('Stop.cpuMs: the calling thread\'s CPU time in run()', () => {
  it('is absent where the backend has no thread clock (mock)', async () => {
    const backend = new MockBackend();
    backend.script(outExit(0xf4, 1));
    await using vm = await Machine.create({ memory: 1 << 16, backend });
    vm.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    const stop = await vm.run();
    expect(stop.reason).toBe('debug-exit');
    expect(stop.cpuMs).toBeUndefined();
  });

  describe.skipIf(!kvm.available)(`on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
    it('counts the exits\' host work: positive, at most the wall time, and it grows with the exits', async () => {
      const run = async (n: number) => {
        await using vm = await Machine.create({ memory: 1 << 20 });
        vm.io.register({ port: 0x3f8, size: 1 }, { name: 'sink', write: () => {} });
        vm.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
        // mov dx, 0x3f8; mov ecx, n; l: out dx, al; loop l; mov dx, 0xf4; out dx, al
        vm.loadFlat(Uint8Array.of(0x66, 0xba, 0xf8, 0x03, 0xb9, n & 0xff, (n >> 8) & 0xff, 0, 0, 0xee, 0xe2, 0xfd, 0x66, 0xba, 0xf4, 0x00, 0xee), { at: 0x1000, mode: 'long', ring: 3 });
        return await vm.run({ timeout: 10_000 });
      };
      const small = await run(100);
      const big = await run(4000);
      for (const s of [small, big]) {
        expect(s.reason).toBe('debug-exit');
        expect(s.cpuMs).toBeGreaterThan(0);
        // Both clocks are read around the same stretch; the thread cannot run longer than it took.
        expect(s.cpuMs as number).toBeLessThanOrEqual(s.elapsedMs + 0.5);
      }
      expect(big.exits).toBeGreaterThan(small.exits * 10);
      expect(big.cpuMs as number).toBeGreaterThan(small.cpuMs as number);
    });

    it('a fork of a snapshot has the clock too', async () => {
      await using vm = await Machine.create({ memory: 1 << 20 });
      vm.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
      vm.loadFlat(Uint8Array.of(0x66, 0xba, 0xf4, 0x00, 0xee, 0xee), { at: 0x1000, mode: 'long', ring: 3 });
      expect((await vm.run({ timeout: 5000 })).cpuMs).toBeGreaterThan(0);
      const snap = await vm.snapshot();
      try {
        await using child = await Machine.fork(snap, { devices: [] });
        child.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
        const stop = await child.run({ timeout: 5000 });
        expect(stop.reason).toBe('debug-exit');
        expect(stop.cpuMs).toBeGreaterThan(0);
      } finally {
        snap.close();
      }
    });
  });
});
