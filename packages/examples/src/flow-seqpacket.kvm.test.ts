// SEQPACKET guest to guest under a FlowMonitor, on real KVM: the freestanding vsock driver
// (net/guest/vsock.c; set-up at ring 0, the data path at ring 3) negotiates
// VIRTIO_VSOCK_F_SEQPACKET and sends every message as several RW fragments, EOM on the last. The
// router collects fragments to EOM, so the monitor decides and audits each message once, whole;
// a guard catches a pattern no single fragment holds; and the receiving guest takes each message
// only whole (exactly its size, ending at EOM), so two messages sent back to back arrive as two.
import { kvmAvailability } from '@tsvm/core/testing';
import { AuditLog, FlowMonitor, type GuardFn } from '@tsvm/monitor';
import { rpcPolicy, rpcTopology, stopCode } from './flow-rpc.fixture.js';
import { describe, expect, it } from 'vitest';
import { buildVsockGuest, guestMessage, POISON, runGuestPair, vsockGuestToolchain } from '../../devices/src/net/vsock-guest.fixture.js';

const kvm = kvmAvailability();
const cc = vsockGuestToolchain();
const skip = !kvm.available ? kvm.reason : !cc.available ? cc.reason : '';
const F_SEQPACKET = 1 << 1;

const topology = rpcTopology;
const policy = rpcPolicy;
const code = stopCode;
type Line = { event: string; decision: string; reason?: string; flow?: { from: string; to: string; bytes?: number } };
const parse = (lines: string[]): Line[] => lines.map((l) => JSON.parse(l) as Line);
const indexOf = (hay: Uint8Array, needle: Uint8Array): number => {
  for (let i = 0; i + needle.length <= hay.length; i++) if (needle.every((b, k) => hay[i + k] === b)) return i;
  return -1;
};

describe.skipIf(skip !== '')(`SEQPACKET vsock guest to guest under a FlowMonitor on real KVM${skip ? ` (SKIPPED: ${skip})` : ''}`, () => {
  it('1000 B requests in 10 fragments and 300 B replies in 3 arrive whole and are mediated once each', async () => {
    const elf = await buildVsockGuest();
    const lines: string[] = [];
    const monitor = new FlowMonitor({ policy: policy(false), topology, audit: new AuditLog(lines), logMessages: 'all' });
    const N = 20;
    const r = await runGuestPair(elf, monitor, { count: N, msg: 1000, reply: 300, frag: 100, keepForward: true });
    expect([code(r.clientStop), code(r.serverStop)]).toEqual([1, 1]);
    // Both drivers negotiated SEQPACKET and sent each message as fragments (EOM on the last).
    expect(r.client.features & F_SEQPACKET).toBe(F_SEQPACKET);
    expect(r.server.features & F_SEQPACKET).toBe(F_SEQPACKET);
    expect(r.client).toMatchObject({ messages: N, error: 0, bytes: 300 * N, rsts: 0, rwSent: 10 * N, seqMessages: N });
    expect(r.server).toMatchObject({ messages: N, error: 0, bytes: 1000 * N, rsts: 0, rwSent: 3 * N, seqMessages: N });
    // The mediator got each request once, whole, with the bytes the client sent.
    expect(r.forward).toHaveLength(N);
    r.forward.forEach((m, i) => expect(m).toEqual(guestMessage(i, 1000)));
    const messages = parse(lines).filter((l) => l.event === 'flow:message');
    expect(messages).toHaveLength(2 * N);
    expect(messages.every((l) => l.decision === 'allow')).toBe(true);
    expect(messages.filter((l) => l.flow?.from === 'client').map((l) => l.flow?.bytes)).toEqual(Array(N).fill(1000));
    expect(messages.filter((l) => l.flow?.from === 'server').map((l) => l.flow?.bytes)).toEqual(Array(N).fill(300));
    expect(r.router).toMatchObject({ messagesDelivered: 2 * N, bytesDelivered: 1300 * N, partialMessagesDropped: 0 });
  });

  it('messages sent back to back arrive as separate messages, in both directions', async () => {
    const elf = await buildVsockGuest();
    const lines: string[] = [];
    const monitor = new FlowMonitor({ policy: policy(false), topology, audit: new AuditLog(lines), logMessages: 'all' });
    const N = 16;
    // Bursts of 4 requests of 64 B (4 fragments each) before the client reads any reply; each
    // receiver lets a burst pile up in its rx ring before it takes any of it.
    const r = await runGuestPair(elf, monitor, { count: N, msg: 64, reply: 48, frag: 16, burst: 4, keepForward: true });
    expect([code(r.clientStop), code(r.serverStop)]).toEqual([1, 1]);
    process.stderr.write(`[tsvm] SEQPACKET bursts of 4: at most ${r.server.queued} requests / ${r.client.queued} replies queued at once in the receiver's rx ring\n`);
    // The 4 messages of a burst were queued together at the receiver (one delivered packet each)…
    expect(r.server.queued).toBeGreaterThanOrEqual(4);
    expect(r.client.queued).toBeGreaterThanOrEqual(4);
    // …and each side still took exactly N messages, each ending at its EOM with exactly its size (the guest
    // fails step 70/74 or 60/62 if two ran together or one came short).
    expect(r.client).toMatchObject({ messages: N, error: 0, bytes: 48 * N, rwSent: 4 * N, seqMessages: N });
    expect(r.server).toMatchObject({ messages: N, error: 0, bytes: 64 * N, rwSent: 3 * N, seqMessages: N });
    r.forward.forEach((m, i) => expect(m).toEqual(guestMessage(i, 64)));
    const messages = parse(lines).filter((l) => l.event === 'flow:message');
    expect(messages.filter((l) => l.flow?.from === 'client').map((l) => l.flow?.bytes)).toEqual(Array(N).fill(64));
    expect(messages.filter((l) => l.flow?.from === 'server').map((l) => l.flow?.bytes)).toEqual(Array(N).fill(48));
  });

  it('a guard blocks the message whose forbidden pattern spans two fragments: the connection resets after 5 good round trips', async () => {
    const elf = await buildVsockGuest();
    const lines: string[] = [];
    const seen: number[] = [];
    const scan: GuardFn = (data, ctx) => {
      if (ctx.from === 'client') seen.push(data.length);
      return indexOf(data, POISON) >= 0 ? { action: 'block', reason: 'poison pattern' } : { action: 'allow' };
    };
    const monitor = new FlowMonitor({ policy: policy(true), topology, guards: { scan }, audit: new AuditLog(lines) });
    const r = await runGuestPair(elf, monitor, { count: 10, msg: 1000, reply: 64, frag: 100, poison: 5, timeoutMs: 20_000, keepForward: true });
    // finish(2) → debug-exit code 5: the client saw the RST waiting for reply 5, the server waiting for message 5.
    expect([code(r.clientStop), code(r.serverStop)]).toEqual([5, 5]);
    expect(r.client).toMatchObject({ messages: 5, error: 61, rsts: 1 });
    expect(r.server).toMatchObject({ messages: 5, error: 72, rsts: 1, bytes: 5 * 1000 });
    // The guard only ever saw whole requests; the blocked one holds the pattern across its first
    // fragment boundary, where neither 100-byte fragment alone holds it.
    expect(seen).toEqual(Array(6).fill(1000));
    const blocked = r.forward[5] as Uint8Array;
    expect(indexOf(blocked, POISON)).toBe(98);
    expect(indexOf(blocked.subarray(0, 100), POISON)).toBe(-1);
    expect(indexOf(blocked.subarray(100, 200), POISON)).toBe(-1);
    const denied = parse(lines).filter((l) => l.decision === 'deny');
    expect(denied).toMatchObject([{ event: 'flow:message', reason: expect.stringMatching(/poison pattern/), flow: { from: 'client', bytes: 1000 } }]);
    expect(r.router.messagesDenied).toBe(1);
  });
});
