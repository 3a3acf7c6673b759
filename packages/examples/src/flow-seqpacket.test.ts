// A content guard on a SEQPACKET connection sees each message whole, once, before the receiver
// gets any fragment of it (host-level: driver-side test guests over real virtio-mmio transports,
// the router and the FlowMonitor a real guest meets).
import { VSOCK_SEQ_EOM, VSOCK_TYPE_SEQPACKET, VsockOp, VsockRouter, VsockTestGuest, type VsockPacket } from '@tsvm/devices';
import { AuditLog, FlowMonitor, type GuardFn } from '@tsvm/monitor';
import { describe, expect, it } from 'vitest';

const SEQ = VSOCK_TYPE_SEQPACKET;
const text = (s: string) => new TextEncoder().encode(s);

describe('SEQPACKET under a FlowMonitor guard', () => {
  it('the guard sees whole messages; a message whose secret is split across fragments is blocked before any fragment arrives', async () => {
    const seen: string[] = [];
    const dlp: GuardFn = (data) => {
      const s = new TextDecoder().decode(data);
      seen.push(s);
      return s.includes('SECRET') ? { action: 'block', reason: 'secret' } : { action: 'allow' };
    };
    const lines: string[] = [];
    const flow = new FlowMonitor({
      policy: { version: 1, guards: { dlp: {} }, rules: [{ id: 'rpc', source: 'a', destination: 'b', port: 80, action: 'allow', guard: 'dlp' }] },
      topology: { version: 1, principals: { a: { kind: 'machine', cid: 3 }, b: { kind: 'machine', cid: 4 } } },
      guards: { dlp }, audit: new AuditLog(lines),
    });
    const router = new VsockRouter({ mediator: flow, onDeny: 'drop' });
    const a = new VsockTestGuest({ cid: 3 });
    const b = new VsockTestGuest({ cid: 4 });
    router.attach(a.device, 'a');
    router.attach(b.device, 'b');
    a.send({ op: VsockOp.Request, type: SEQ, dstCid: 4, srcPort: 1000, dstPort: 80 });
    await new Promise((r) => setImmediate(r)); // the FlowMonitor decides connections asynchronously
    b.receive();
    b.send({ op: VsockOp.Response, type: SEQ, dstCid: 3, srcPort: 80, dstPort: 1000 });
    a.receive();
    const send = (s: string, flags = 0) => a.send({ op: VsockOp.Rw, type: SEQ, dstCid: 4, srcPort: 1000, dstPort: 80, payload: text(s), flags });
    // "SECRET" split over two fragments: a per-fragment guard would see "SEC" and "RET" and pass both.
    send('hello SEC');
    send('RET world', VSOCK_SEQ_EOM);
    send('plain ');
    send('message', VSOCK_SEQ_EOM);
    const got = b.receive().filter((p: VsockPacket) => p.op === VsockOp.Rw);
    expect(seen).toEqual(['hello SECRET world', 'plain message']);
    expect(got.map((p) => new TextDecoder().decode(p.payload))).toEqual(['plain message']);
    expect(got[0]?.flags).toBe(VSOCK_SEQ_EOM);
    const denied = lines.map((l) => JSON.parse(l) as { event: string; decision: string; reason: string; flow: { bytes?: number } }).filter((e) => e.decision === 'deny');
    expect(denied).toMatchObject([{ event: 'flow:message', reason: "guard 'dlp' blocked: secret", flow: { bytes: 18 } }]);
  });
});
