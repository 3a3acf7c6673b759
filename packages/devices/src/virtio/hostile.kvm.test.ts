// A real guest against a hostile ring: the guest spins kicking a virtio-console queue whose
// chains describe its RAM thousands of times over. The run must still end at its deadline,
// the Node event loop must keep turning, and another machine in the process must not stall.
import { Machine } from '@tsvm/core';
import { asm, kvmAvailability } from '@tsvm/core/testing';
import { describe, expect, it } from 'vitest';
import { RecordingIrq } from '../testing/fakes.js';
import { VirtioMmioTestDriver } from '../testing/virtio-driver.js';
import { VirtioConsole } from './console.js';
import { DescFlag, MmioReg } from './constants.js';
import { VirtioMmio } from './mmio.js';

const kvm = kvmAvailability();
const MiB = 1 << 20;
const BASE = 0xd000_0000n;

describe.skipIf(!kvm.available)(`hostile virtio ring on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('a guest kicking a ring that describes RAM 65536 times over stops at its deadline; the event loop and a second machine keep going', async () => {
    await using vm = await Machine.create({ memory: 8 * MiB });
    let out = 0;
    const device = new VirtioConsole({ sink: (b) => { out += b.length; }, output: { autoFlush: false } });
    const mmio = new VirtioMmio({ device, memory: vm.memory, irq: new RecordingIrq() });
    vm.attachDevice(mmio.mappings(BASE));
    // Driver set-up from the host (as a guest driver would), then 256 chains × 256 descriptors × 2 MiB.
    const drv = new VirtioMmioTestDriver(mmio, vm.memory);
    drv.init();
    const q = drv.queue(1);
    for (let i = 0; i < q.size; i++) q.writeDesc(i, { addr: 0x400000n, len: 2 * MiB, flags: i < q.size - 1 ? DescFlag.Next : 0, next: i + 1 });
    for (let i = 0; i < q.size; i++) q.publish(0);
    // The guest: kick queue 1 forever.
    vm.loadFlat(await asm(`mov rax, ${BASE + BigInt(MmioReg.QueueNotify)}\n l: mov dword ptr [rax], 1\n jmp l`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });

    await using other = await Machine.create({ memory: 2 * MiB });
    other.loadFlat(await asm('l: jmp l', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });

    let ticks = 0;
    let last = performance.now(), maxGap = 0;
    const iv = setInterval(() => { ticks++; const t = performance.now(); maxGap = Math.max(maxGap, t - last); last = t; }, 5);
    let slices = 0, maxSlice = 0, s0 = performance.now();
    vm.events.on('started', () => { s0 = performance.now(); });
    vm.events.on('slice', () => { const t = performance.now(); maxSlice = Math.max(maxSlice, t - s0); s0 = t; slices++; });
    const t0 = performance.now();
    const [stop, stop2] = await Promise.all([vm.run({ timeout: 200 }), other.run({ timeout: 200 })]);
    const elapsed = performance.now() - t0;
    clearInterval(iv);
    device.flush();
    process.stderr.write(`[tsvm] hostile ring: ${elapsed.toFixed(0)} ms, ${stop.exits} exits, ${out} bytes out, ${mmio.stats.deferrals} deferrals, ${ticks} timer ticks (max gap ${maxGap.toFixed(0)} ms), ${slices} slices (max ${maxSlice.toFixed(0)} ms)\n`);
    expect(stop.reason).toBe('timeout');
    expect(stop2.reason).toBe('timeout');
    // 200 ms plus a few 10 ms slices and the slack of a shared 2-core host — far from "seconds".
    expect(elapsed).toBeLessThan(800);
    expect(stop2.elapsedMs).toBeLessThan(800);
    // The event loop kept turning during the run (a stall inside one exit would starve it; under
    // nested TCG a turn takes ~100 ms, so only "at least once" holds on every host).
    expect(ticks).toBeGreaterThanOrEqual(1);
    // Work was bounded per turn, not skipped: output flowed, later turns continued it.
    expect(out).toBeGreaterThan(0);
    expect(mmio.stats.deferrals).toBeGreaterThan(0);
  });
});
