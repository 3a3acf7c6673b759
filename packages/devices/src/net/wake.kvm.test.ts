// Prompt cross-machine wake-ups on real KVM: a receiver halted in `hlt` (IF = 1, in-kernel
// irqchip) wakes for a vsock message without waiting for the sender's slice to expire. Two
// machines share this thread and run alternately, so the receiver is never inside KVM_RUN when
// the sender's exit delivers into its rx queue: the interrupt stays pending until the receiver's
// run loop gets its turn, which the router's `yieldSlice()` gives it at once.
import { Machine } from '@tsvm/core';
import { asm, kvmAvailability } from '@tsvm/core/testing';
import { describe, expect, it } from 'vitest';
import { allowAllMediator, VsockRouter, type VsockHostStream } from './vsock-router.js';
import { buildVsockGuest, VSOCK_GUEST, vsockGuestMachine, vsockGuestToolchain } from './vsock-guest.fixture.js';

const kvm = kvmAvailability();
const cc = vsockGuestToolchain();
const skip = !kvm.available ? kvm.reason : !cc.available ? cc.reason : '';
const SLICE_MS = 10;
const MESSAGES = 20;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;

describe.skipIf(skip !== '')(`cross-machine wake-up on real KVM${skip ? ` (SKIPPED: ${skip})` : ''}`, () => {
  it(`a message to a machine halted in hlt wakes it far sooner than one ${SLICE_MS} ms slice`, async () => {
    const elf = await buildVsockGuest();
    const router = new VsockRouter({ mediator: allowAllMediator });
    const rx = await vsockGuestMachine(elf, { role: 'halt-rx', cid: 3, peerCid: 2, port: 9000, count: MESSAGES });
    await using receiver = rx.vm;
    router.attach(rx.device, 'receiver');
    let stream: VsockHostStream | undefined;
    router.listen(9000, 'host', (s) => { stream = s; });

    // The receiver's progress: 1 = connected and going to sleep, 2 = its interrupt handler runs,
    // 3 = it consumed the message (the next may be sent).
    let ready = false, sentAt: number | undefined, canSend = false;
    const latencies: number[] = [];
    let awake = 0;
    receiver.attach({ port: VSOCK_GUEST.wakePort, size: 1 }, {
      name: 'wake-probe',
      write: (_o, v) => {
        if (v === 1) { ready = true; canSend = true; }
        if (v === 2 && sentAt !== undefined) { latencies.push(performance.now() - sentAt); sentAt = undefined; }
        if (v === 3) {
          // Taken without an interrupt: the host preempted the receiver between its last look at
          // the ring and its `hlt` (a loaded host ends slices anywhere), so it was never asleep.
          if (sentAt !== undefined) { awake++; sentAt = undefined; }
          canSend = true;
        }
      },
    });

    // The sender: a ring-3 guest that computes and checks in through a port now and then; the
    // host endpoint writes to the receiver from inside that exit, i.e. during the sender's slice.
    await using sender = await Machine.create({ memory: 2 << 20 });
    sender.loadFlat(await asm('l: out 0x80, al\n mov ecx, 20000\n d: dec ecx\n jnz d\n jmp l', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    let sent = 0;
    sender.attach({ port: 0x80, size: 1 }, {
      name: 'send-when-ready',
      write: () => {
        if (!ready || !canSend || stream === undefined || sent >= MESSAGES) return;
        canSend = false;
        sent++;
        sentAt = performance.now();
        stream.write(new Uint8Array(64).fill(sent));
      },
    });

    const done = new AbortController();
    const [rs, ss] = await Promise.all([
      receiver.run({ timeout: 30_000, sliceMs: SLICE_MS }).finally(() => done.abort()),
      sender.run({ timeout: 30_000, sliceMs: SLICE_MS, signal: done.signal }),
    ]);
    router.close();
    const r = rx.results();
    process.stderr.write(`[tsvm] wake-up latency send → receiver's handler, ${SLICE_MS} ms slices: ${latencies.map((l) => `${(l * 1000).toFixed(0)} µs`).join(', ')} (median ${(median(latencies) * 1000).toFixed(0)} µs${awake ? `; ${awake} taken awake` : ''})\n`);
    expect(rs.reason, JSON.stringify(rs, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString(16) : v))).toBe('debug-exit');
    expect(rs.reason === 'debug-exit' && rs.code).toBe(1);
    expect(ss.reason).toBe('aborted');
    expect(r).toMatchObject({ messages: MESSAGES, error: 0, bytes: 64 * MESSAGES });
    expect(latencies.length + awake).toBe(MESSAGES);
    expect(latencies.length).toBeGreaterThanOrEqual(MESSAGES / 2);
    // Without the yield the message waits for the rest of the sender's slice (~SLICE_MS).
    expect(median(latencies)).toBeLessThan(SLICE_MS / 4);
  });

  it('a machine halted in hlt with nothing to do takes short slices: a busy machine on the same thread keeps most of it', async () => {
    const elf = await buildVsockGuest();
    const router = new VsockRouter({ mediator: allowAllMediator });
    const rx = await vsockGuestMachine(elf, { role: 'halt-rx', cid: 3, peerCid: 2, port: 9000, count: 1 });
    await using idle = rx.vm;
    router.attach(rx.device, 'idle');
    router.listen(9000, 'host', () => {});
    await using busy = await Machine.create({ memory: 2 << 20 });
    busy.loadFlat(await asm('l: out 0x80, al\n mov ecx, 2000000\n d: dec ecx\n jnz d\n jmp l', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    busy.attach({ port: 0x80, size: 1 }, { name: 'tick', write: () => {} });
    const ran = (vm: Machine) => Object.values(vm.stats().byKind).reduce((n, k) => n + k.runNs, 0) / 1e6;
    // From the moment the idle machine sleeps: how much of the wall time each one spent in KVM_RUN.
    let from: { t: number; busy: number; idle: number } | undefined;
    idle.attach({ port: VSOCK_GUEST.wakePort, size: 1 }, { name: 'ready', write: (_o, v) => { if (v === 1) from = { t: performance.now(), busy: ran(busy), idle: ran(idle) }; } });
    const [is, bs] = await Promise.all([idle.run({ timeout: 1500, sliceMs: SLICE_MS }), busy.run({ timeout: 1500, sliceMs: SLICE_MS })]);
    router.close();
    expect(is.reason).toBe('timeout');
    expect(rx.results()).toMatchObject({ messages: 0, error: 0 }); // still waiting, nothing went wrong
    expect(bs.reason).toBe('timeout');
    expect(from).toBeDefined();
    const wall = performance.now() - (from?.t ?? 0);
    const busyShare = (ran(busy) - (from?.busy ?? 0)) / wall;
    const idleShare = (ran(idle) - (from?.idle ?? 0)) / wall;
    process.stderr.write(`[tsvm] share of the thread while one machine sleeps in hlt: busy ${(busyShare * 100).toFixed(0)} %, sleeping ${(idleShare * 100).toFixed(0)} %\n`);
    // Full slices in turn would split the thread about evenly; 10 ms against 1 ms gives the
    // sleeper ~1/11 (JS between slices, slower on a loaded host, is in neither share).
    expect(idleShare).toBeLessThan(0.3);
    expect(busyShare).toBeGreaterThan(2 * idleShare);
  });
});
