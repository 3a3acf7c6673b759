/**
 * `vcpuThreads: 'parallel'` on real KVM: the BSP starts two APs with INIT/SIPI, they reach ring 3
 * and run at the same time on their own runner threads, while every exit of every vCPU is still
 * handled on the calling thread through the one pipeline (mediate hook before the device).
 */
import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import { SMP_GUEST as G, expectedSum, loadSmpGuest } from './smp-guest.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;

/** Counts the APs' done writes; with all `aps` in, stops as a debug exit with code `aps`. */
function doneDevice(vm: Machine, aps: number, log?: number[]): void {
  let done = 0;
  vm.attach({ address: G.DONE_MMIO, size: 4 }, {
    name: 'done',
    write: (_o, v, _s, a) => { log?.push(v); if (++done === aps) a.requestStop({ reason: 'debug-exit', code: done }); },
  });
}

const threads = (): number => readdirSync('/proc/self/task').length;

/** The thread count once runner threads of machines closed earlier have exited. */
async function settledThreads(): Promise<number> {
  let last = threads();
  for (let i = 0; i < 40; i++) {
    await new Promise((r) => setTimeout(r, 25));
    const now = threads();
    if (now === last && i > 3) return now;
    last = now;
  }
  return last;
}

describe.skipIf(!kvm.available)(`parallel vCPUs on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('two APs started by INIT/SIPI play 20 000 ping-pong rounds through memory and compute correct sums', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3, vcpuThreads: 'parallel' });
    doneDevice(vm, 2);
    const n = 1_000_000n;
    await loadSmpGuest(vm, { iterations: n, pingPong: 20_000n });
    const stop = await vm.run({ timeout: 20_000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect([1, 2]).toContain(stop.vcpu);
    // Each handoff needs the other AP to be running at that moment: taking turns by slices
    // (below) would need ~one slice per round.
    expect(vm.memory.readU64(G.COUNTER)).toBe(40_000n);
    expect([vm.memory.readU64(G.result(0)), vm.memory.readU64(G.result(1))]).toEqual([expectedSum(0, n), expectedSum(1, n)]);
  }, 30_000);

  it.each(['parallel', 'shared'] as const)('an IPI storm from the BSP (%s): the APs still compute right, a timeout ends it on time, the event loop keeps ticking', async (mode) => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3, vcpuThreads: mode });
    doneDevice(vm, 2);
    const n = 100_000n;
    await loadSmpGuest(vm, { iterations: n, ipiStorm: true });
    let ticks = 0;
    const iv = setInterval(() => { ticks++; }, 5);
    // The APs run with IF=0 at ring 3: the IPIs pile up in their IRRs and are never taken.
    const done = await vm.run({ timeout: 20_000 });
    expect(done).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect([vm.memory.readU64(G.result(0)), vm.memory.readU64(G.result(1))]).toEqual([expectedSum(0, n), expectedSum(1, n)]);
    // The storm goes on (the BSP never stops): a bounded run ends it as a timeout, promptly.
    const t0 = performance.now();
    const stop = await vm.run({ timeout: 300 });
    clearInterval(iv);
    expect(stop.reason).toBe('timeout');
    expect(performance.now() - t0).toBeLessThan(1500);
    expect(ticks).toBeGreaterThan(10);
  }, 30_000);

  it('the same guest taking turns on one thread does not get through the ping-pong in 2 s (the test can fail)', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3 });
    doneDevice(vm, 2);
    await loadSmpGuest(vm, { iterations: 1000n, pingPong: 20_000n });
    const stop = await vm.run({ timeout: 2000 });
    expect(stop.reason).toBe('timeout');
    expect(vm.memory.readU64(G.COUNTER)).toBeLessThan(40_000n);
  }, 30_000);

  it('every exit of both APs reaches the mediate hook before the device, one at a time, naming its vCPU', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3, vcpuThreads: 'parallel' });
    const log: string[] = [];
    let inHook = 0;
    let overlap = false;
    const vcpuOf = new Map<number, number>(); // ticket -> vCPU
    vm.attach({ address: G.POST_MMIO, size: 4 }, { name: 'post', write: (_o, v) => { log.push(`dev ${v}`); } });
    vm.addHook({
      name: 'see-all', mode: 'mediate',
      matches: (e) => e.kind === 'mmio',
      handle: (e, info) => {
        if (inHook++ > 0) overlap = true;
        if (e.kind === 'mmio' && e.address === BigInt(G.POST_MMIO)) {
          const v = new DataView(e.data.buffer, e.data.byteOffset).getUint32(0, true);
          const k = v >>> 16;
          if (vcpuOf.get(k) === undefined) vcpuOf.set(k, info.vcpu);
          if (vcpuOf.get(k) !== info.vcpu) log.push(`wrong vcpu ${info.vcpu} for ticket ${k}`);
          log.push(`hook ${v}`);
        }
        inHook--;
      },
    });
    doneDevice(vm, 2);
    const posts = 300;
    await loadSmpGuest(vm, { iterations: 1000n, posts });
    const stop = await vm.run({ timeout: 30_000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect(overlap).toBe(false);
    expect(log.filter((l) => l.startsWith('wrong'))).toEqual([]);
    expect(log).toHaveLength(4 * posts);
    for (let i = 0; i < log.length; i += 2) {
      expect(log[i]?.startsWith('hook ')).toBe(true);
      expect(log[i + 1]).toBe(log[i]?.replace('hook', 'dev'));
    }
    // Both APs' posts, each AP's in its program order, from two distinct vCPUs.
    for (const k of [0, 1]) {
      const mine = log.filter((l) => l.startsWith('dev ')).map((l) => Number(l.slice(4))).filter((v) => v >>> 16 === k);
      expect(mine).toEqual(Array.from({ length: posts }, (_, j) => (k << 16) | j));
    }
    expect(new Set(vcpuOf.values())).toEqual(new Set([1, 2]));
  }, 60_000);

  it('timeout, abort and a device stop end both spinning APs promptly; runs resume where they were', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3, vcpuThreads: 'parallel' });
    doneDevice(vm, 2);
    await loadSmpGuest(vm, { iterations: 1n << 62n });
    const t = await vm.run({ timeout: 300 });
    expect(t).toMatchObject({ reason: 'timeout', vcpu: 0 });
    expect(t.elapsedMs).toBeLessThan(1500);
    // Both APs got past the trampoline and into the compute loop (ring 3) on their own threads.
    expect(vm.vcpus.slice(1).map((v) => Number(v.getSregs().cs.selector))).toEqual([0x2b, 0x2b]);
    const rcx = vm.vcpus.slice(1).map((v) => v.getRegs().rcx);
    const a = await vm.run({ signal: AbortSignal.timeout(300) });
    expect(a).toMatchObject({ reason: 'aborted' });
    expect(a.elapsedMs).toBeLessThan(1500);
    // Both kept counting down across the two runs.
    vm.vcpus.slice(1).forEach((v, i) => expect(v.getRegs().rcx).toBeLessThan(rcx[i] as bigint));
  }, 30_000);

  it('a stop caused by one AP names that vCPU while the other spins; close ends the runner threads', async () => {
    const before = await settledThreads();
    const vm = await Machine.create({ memory: 2 * MiB, irqchip: true, vcpus: 3, vcpuThreads: 'parallel' });
    expect(threads()).toBeGreaterThanOrEqual(before + 3);
    // Ticket 1 finishes a short sum and writes the done register, which nobody handles here;
    // ticket 0 would need 2^62 iterations.
    let poster = -1;
    vm.addHook({ name: 'who', mode: 'mediate', matches: (e) => e.kind === 'mmio', handle: (_e, info) => { poster = info.vcpu; } });
    await loadSmpGuest(vm, { iterations: 1n << 62n });
    // Ticket 0 is whichever AP arrives first; give the other a short count once both are in.
    vm.memory.writeU64(G.ITERATIONS, 1n << 62n);
    const first = await vm.run({ timeout: 300 });
    expect(first.reason).toBe('timeout');
    const late = vm.vcpus.slice(1).find((v) => v.getRegs().r12 === 1n);
    expect(late).toBeDefined();
    late?.setRegs({ rcx: 1000n });
    const stop = await vm.run({ timeout: 10_000 });
    expect(stop).toMatchObject({ reason: 'unhandled-exit', kind: 'mmio', address: BigInt(G.DONE_MMIO), vcpu: late?.id });
    expect(poster).toBe(late?.id);
    await vm.close();
    for (let i = 0; i < 100 && threads() > before; i++) await new Promise((r) => setTimeout(r, 20));
    expect(threads()).toBeLessThanOrEqual(before);
  }, 30_000);
});
