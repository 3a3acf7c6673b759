// Guest to guest through the flow monitor, on real KVM: two freestanding vsock guests (set-up at
// ring 0, the whole data path at ring 3: polling, one notify exit per packet sent) exchange 64 B
// requests and replies through a VsockRouter whose mediator is a FlowMonitor; every message is
// decided and audited before the receiver sees it. A content guard that blocks one message
// resets the connection and both guests see it.
import { kvmAvailability } from '@tsvm/core/testing';
import { AuditLog, FlowMonitor, type GuardFn } from '@tsvm/monitor';
import { rpcPolicy, rpcTopology, stopCode } from './flow-rpc.fixture.js';
import { describe, expect, it } from 'vitest';
import { buildVsockGuest, runGuestPair, vsockGuestToolchain } from '../../devices/src/net/vsock-guest.fixture.js';

const kvm = kvmAvailability();
const cc = vsockGuestToolchain();
const skip = !kvm.available ? kvm.reason : !cc.available ? cc.reason : '';
const ROUND_TRIPS = 300;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
const gaps = (ts: readonly number[]): number[] => ts.slice(1).map((t, i) => t - (ts[i] as number));

const topology = rpcTopology;
const policy = rpcPolicy;
const code = stopCode;

describe.skipIf(skip !== '')(`vsock guest to guest under a FlowMonitor on real KVM${skip ? ` (SKIPPED: ${skip})` : ''}`, () => {
  it(`${ROUND_TRIPS} round trips of 64 B, each message mediated and audited`, async () => {
    const elf = await buildVsockGuest();
    const lines: string[] = [];
    const monitor = new FlowMonitor({ policy: policy(false), topology, audit: new AuditLog(lines), logMessages: 'all' });
    const r = await runGuestPair(elf, monitor, { count: ROUND_TRIPS, msg: 64, reply: 64 });
    const rt = median(gaps(r.forwardAt));
    process.stderr.write(`[tsvm] CPL3 vsock guest↔guest under FlowMonitor: 64 B round trip median ${(rt * 1000).toFixed(0)} µs over ${ROUND_TRIPS}\n`);
    expect([code(r.clientStop), code(r.serverStop)]).toEqual([1, 1]);
    // The client checked every reply against its request, the server checked every request.
    expect(r.client).toMatchObject({ messages: ROUND_TRIPS, error: 0, bytes: 64 * ROUND_TRIPS, rsts: 0 });
    expect(r.server).toMatchObject({ messages: ROUND_TRIPS, error: 0, bytes: 64 * ROUND_TRIPS, rsts: 0 });
    const audit = lines.map((l) => JSON.parse(l) as { event: string; decision: string; flow?: { from: string; to: string } });
    expect(audit.filter((l) => l.event === 'flow:connect').map((l) => l.decision)).toEqual(['allow']);
    const messages = audit.filter((l) => l.event === 'flow:message');
    expect(messages).toHaveLength(2 * ROUND_TRIPS);
    expect(messages.every((l) => l.decision === 'allow')).toBe(true);
    expect(new Set(messages.map((l) => `${l.flow?.from}>${l.flow?.to}`))).toEqual(new Set(['client>server', 'server>client']));
    const rule = monitor.costs().rows.find((row) => row.kind === 'rule' && row.name === 'rpc');
    expect(rule).toMatchObject({ connections: 1, messages: 2 * ROUND_TRIPS, bytes: 128 * ROUND_TRIPS });
    // Without prompt wake-ups every hop waits for the other machine's 10 ms slice to expire.
    expect(rt).toBeLessThan(5);
  });

  it('a guard that blocks message 7 resets the connection: both guests stop with an error after 7 good round trips', async () => {
    const elf = await buildVsockGuest();
    const lines: string[] = [];
    // Message i starts with i (7-bit groups): block the client's 8th request.
    const scan: GuardFn = (data, ctx) => (ctx.from === 'client' && data[0] === 7 ? { action: 'block', reason: 'message 7' } : { action: 'allow' });
    const monitor = new FlowMonitor({ policy: policy(true), topology, guards: { scan }, audit: new AuditLog(lines) });
    const r = await runGuestPair(elf, monitor, { count: 20, msg: 64, reply: 64, timeoutMs: 20_000 });
    // finish(2) → debug-exit code 5; the client saw the RST while waiting for reply 7 (step 61).
    expect([code(r.clientStop), code(r.serverStop)]).toEqual([5, 5]);
    expect(r.client).toMatchObject({ messages: 7, error: 61, rsts: 1 });
    expect(r.server).toMatchObject({ messages: 7, error: 72, rsts: 1 });
    const denied = lines.map((l) => JSON.parse(l) as { event: string; decision: string; reason: string }).filter((l) => l.decision === 'deny');
    expect(denied).toMatchObject([{ event: 'flow:message', reason: expect.stringMatching(/message 7/) }]);
    expect(r.router.messagesDenied).toBe(1);
  });
});
