// SEQPACKET through the router (messages mediated whole, boundaries kept, hostile fragments
// bounded) and the event queue's TRANSPORT_RESET.
import { describe, expect, it } from 'vitest';
import { VSOCK_SEQ_EOM, VSOCK_SEQ_EOR, VSOCK_TYPE_SEQPACKET, VsockOp, VsockShutdown, type VsockPacket } from '../virtio/vsock.js';
import { allowAllMediator, VsockRouter, type VsockHostStream, type VsockMediator } from './vsock-router.js';
import { VsockTestGuest, type VsockTestGuestOptions } from './vsock-test-guest.js';

const SEQ = VSOCK_TYPE_SEQPACKET;
const flush = () => new Promise((r) => setImmediate(r));
const bytes = (n: number, seed = 0) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);
const rw = (ps: VsockPacket[]) => ps.filter((p) => p.op === VsockOp.Rw);
const concat = (ps: VsockPacket[]) => {
  const out = new Uint8Array(ps.reduce((n, p) => n + p.payload.length, 0));
  let at = 0;
  for (const p of ps) { out.set(p.payload, at); at += p.payload.length; }
  return out;
};

/** Records every message the mediator is asked about; `deny` decides by content. */
function recorder(deny?: (d: Uint8Array) => boolean) {
  const seen: Uint8Array[] = [];
  const requests: unknown[] = [];
  const m: VsockMediator<null> = {
    connect: (r) => { requests.push(r); return { verdict: 'allow', connection: null, reason: 'ok' }; },
    message: (_c, _d, data) => { seen.push(data.slice()); return deny?.(data) ? { verdict: 'deny', reason: 'content' } : { verdict: 'allow', data }; },
  };
  return { m, seen, requests };
}

async function openSeq<C>(router: VsockRouter<C>, a: Partial<VsockTestGuestOptions> = {}, b: Partial<VsockTestGuestOptions> = {}) {
  const ga = new VsockTestGuest({ cid: 3, ...a });
  const gb = new VsockTestGuest({ cid: 4, ...b });
  router.attach(ga.device, 'a');
  router.attach(gb.device, 'b');
  ga.send({ op: VsockOp.Request, type: SEQ, dstCid: 4, srcPort: 1000, dstPort: 80 });
  await flush();
  expect(gb.receive()).toMatchObject([{ op: VsockOp.Request, type: SEQ }]);
  gb.send({ op: VsockOp.Response, type: SEQ, dstCid: 3, srcPort: 80, dstPort: 1000 });
  expect(ga.receive()).toMatchObject([{ op: VsockOp.Response, type: SEQ }]);
  const aSend = (p: Partial<VsockPacket> & { op: number }) => ga.send({ type: SEQ, dstCid: 4, srcPort: 1000, dstPort: 80, ...p });
  return { a: ga, b: gb, aSend };
}

describe('VsockRouter: SEQPACKET', () => {
  it('the mediator decides a message once, whole; the receiver gets it with EOM and EOR on the last fragment', async () => {
    const { m, seen, requests } = recorder();
    const router = new VsockRouter({ mediator: m });
    const { b, aSend } = await openSeq(router);
    expect(requests).toMatchObject([{ source: 'a', destination: 'b', port: 80, socket: 'seqpacket' }]);
    const msg = bytes(3000);
    aSend({ op: VsockOp.Rw, payload: msg.subarray(0, 1000) });
    aSend({ op: VsockOp.Rw, payload: msg.subarray(1000, 2000) });
    expect(seen).toHaveLength(0); // no EOM yet: nothing is mediated, nothing delivered
    expect(rw(b.receive())).toHaveLength(0);
    aSend({ op: VsockOp.Rw, payload: msg.subarray(2000), flags: VSOCK_SEQ_EOM | VSOCK_SEQ_EOR });
    expect(seen).toEqual([msg]);
    const got = rw(b.receive());
    expect(concat(got)).toEqual(msg);
    expect(got.every((p) => p.type === SEQ)).toBe(true);
    expect(got.map((p) => p.flags)).toEqual([...got.slice(1).map(() => 0), VSOCK_SEQ_EOM | VSOCK_SEQ_EOR]);
  });

  it('keeps boundaries between back-to-back messages, and a zero-length message is one message', async () => {
    const { m, seen } = recorder();
    const router = new VsockRouter({ mediator: m });
    const { b, aSend } = await openSeq(router);
    aSend({ op: VsockOp.Rw, payload: bytes(10, 1), flags: VSOCK_SEQ_EOM });
    aSend({ op: VsockOp.Rw, flags: VSOCK_SEQ_EOM });
    aSend({ op: VsockOp.Rw, payload: bytes(20, 2), flags: VSOCK_SEQ_EOM });
    expect(seen.map((d) => d.length)).toEqual([10, 0, 20]);
    const got = rw(b.receive());
    expect(got.map((p) => [p.payload.length, p.flags])).toEqual([[10, VSOCK_SEQ_EOM], [0, VSOCK_SEQ_EOM], [20, VSOCK_SEQ_EOM]]);
  });

  it('a denied message never reaches the receiver, not even its first fragments', async () => {
    const { m } = recorder((d) => d.includes(0xee));
    const router = new VsockRouter({ mediator: m });
    const { a, b, aSend } = await openSeq(router);
    const secret = bytes(2000);
    secret[1999] = 0xee; // the give-away is in the last fragment
    aSend({ op: VsockOp.Rw, payload: secret.subarray(0, 1500) });
    aSend({ op: VsockOp.Rw, payload: secret.subarray(1500), flags: VSOCK_SEQ_EOM });
    const got = b.receive();
    expect(rw(got)).toHaveLength(0);
    expect(got.map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(a.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(router.stats.messagesDenied).toBe(1);
  });

  it('hostile: fragments without EOM are bounded by the window; at the bound the connection is reset', async () => {
    const { m, seen } = recorder();
    const router = new VsockRouter({ mediator: m, connectionBuffer: 8192 });
    const { a, b, aSend } = await openSeq(router);
    for (let i = 0; i < 2; i++) aSend({ op: VsockOp.Rw, payload: bytes(4096) });
    expect(seen).toHaveLength(0);
    expect(b.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(a.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(router.connections).toBe(0);
    expect(router.stats.partialMessagesDropped).toBe(1);
  });

  it('hostile: a SHUTDOWN or RST in the middle of a message discards it unmediated', async () => {
    const { m, seen } = recorder();
    const router = new VsockRouter({ mediator: m });
    const { b, aSend } = await openSeq(router);
    aSend({ op: VsockOp.Rw, payload: bytes(100) });
    aSend({ op: VsockOp.Shutdown, flags: VsockShutdown.Send });
    expect(seen).toHaveLength(0);
    expect(b.receive().map((p) => [p.op, p.flags])).toEqual([[VsockOp.Shutdown, VsockShutdown.Send]]);
    expect(router.stats.partialMessagesDropped).toBe(1);
    const r2 = recorder();
    const router2 = new VsockRouter({ mediator: r2.m });
    const p2 = await openSeq(router2);
    p2.aSend({ op: VsockOp.Rw, payload: bytes(100) });
    p2.aSend({ op: VsockOp.Rst });
    expect(r2.seen).toHaveLength(0);
    expect(rw(p2.b.receive())).toHaveLength(0);
    expect(router2.stats.partialMessagesDropped).toBe(1);
  });

  it('hostile: a flood of empty messages to a receiver that never reads is bounded (they use no credit)', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const { a, b, aSend } = await openSeq(router, {}, { rxBuffers: 1 });
    for (let i = 0; i < 6000; i++) aSend({ op: VsockOp.Rw, flags: VSOCK_SEQ_EOM }); // cap: 4096 held + what the device holds
    expect(router.connections).toBe(0);
    expect(a.receive().map((p) => p.op)).toContain(VsockOp.Rst);
    expect(b.device.backlog).toBeLessThanOrEqual(1025);
    expect(router.stats.messagesDelivered).toBeLessThan(6000);
  });

  it('a message larger than the receiver’s buf_alloc is refused (it could never be read whole)', async () => {
    const { m } = recorder();
    const router = new VsockRouter({ mediator: m });
    const { b, aSend } = await openSeq(router, {}, { bufAlloc: 4096 });
    aSend({ op: VsockOp.Rw, payload: bytes(5000), flags: VSOCK_SEQ_EOM });
    const got = b.receive();
    expect(rw(got)).toHaveLength(0);
    expect(got.map((p) => p.op)).toEqual([VsockOp.Rst]);
  });

  it('hostile: SEQPACKET without the feature, to a guest without it, or on a stream connection → RST, nobody else hears', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const plain = new VsockTestGuest({ cid: 3, seqpacket: false });
    const seq = new VsockTestGuest({ cid: 4 });
    const old = new VsockTestGuest({ cid: 5, seqpacket: false });
    router.attach(plain.device, 'plain');
    router.attach(seq.device, 'seq');
    router.attach(old.device, 'old');
    expect(plain.device.seqpacket).toBe(false);
    expect(seq.device.seqpacket).toBe(true);
    plain.send({ op: VsockOp.Request, type: SEQ, dstCid: 4, srcPort: 1, dstPort: 80 });
    await flush();
    expect(plain.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(seq.receive()).toHaveLength(0);
    seq.send({ op: VsockOp.Request, type: SEQ, dstCid: 5, srcPort: 2, dstPort: 80 });
    await flush();
    expect(seq.receive()).toMatchObject([{ op: VsockOp.Rst, type: SEQ }]);
    expect(old.receive()).toHaveLength(0);
    // A stream connection, then a SEQPACKET RW on it: the connection is reset.
    seq.send({ op: VsockOp.Request, dstCid: 3, srcPort: 3, dstPort: 80 });
    await flush();
    expect(plain.receive().map((p) => p.op)).toEqual([VsockOp.Request]);
    plain.send({ op: VsockOp.Response, dstCid: 4, srcPort: 80, dstPort: 3 });
    seq.receive();
    seq.send({ op: VsockOp.Rw, type: SEQ, dstCid: 3, srcPort: 3, dstPort: 80, payload: bytes(8), flags: VSOCK_SEQ_EOM });
    expect(plain.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(router.connections).toBe(0);
    await expect(router.connect('host', 3, 80, { seqpacket: true })).rejects.toThrow(/did not negotiate/);
  });

  it('host SEQPACKET listener: each onData is one message, each write one message; a stream request is refused', async () => {
    const { m, seen } = recorder();
    const router = new VsockRouter({ mediator: m });
    const g = new VsockTestGuest({ cid: 3 });
    router.attach(g.device, 'g');
    const got: Uint8Array[] = [];
    let stream: VsockHostStream | undefined;
    router.listen(9000, 'svc', (s) => { stream = s; s.onData = (d) => got.push(d); }, { seqpacket: true });
    g.send({ op: VsockOp.Request, dstCid: 2, srcPort: 7, dstPort: 9000 });
    await flush();
    expect(g.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    g.send({ op: VsockOp.Request, type: SEQ, dstCid: 2, srcPort: 7, dstPort: 9000 });
    await flush();
    expect(g.receive()).toMatchObject([{ op: VsockOp.Response, type: SEQ }]);
    g.send({ op: VsockOp.Rw, type: SEQ, dstCid: 2, srcPort: 7, dstPort: 9000, payload: bytes(300, 1) });
    g.send({ op: VsockOp.Rw, type: SEQ, dstCid: 2, srcPort: 7, dstPort: 9000, payload: bytes(200, 2), flags: VSOCK_SEQ_EOM });
    expect(got.map((d) => d.length)).toEqual([500]);
    expect(seen.map((d) => d.length)).toEqual([500]);
    // 10000 bytes to a guest whose rx buffers hold 4096: the device splits; EOM only on the last piece.
    expect(stream?.write(bytes(10000, 3))).toBe(true);
    const back = rw(g.receive());
    expect(back.length).toBeGreaterThan(2);
    expect(concat(back)).toEqual(bytes(10000, 3));
    expect(back.map((p) => p.flags)).toEqual([...back.slice(1).map(() => 0), VSOCK_SEQ_EOM]);
  });
});

describe('virtio-vsock event queue', () => {
  it('a restore tells the restored driver its connections are gone (TRANSPORT_RESET), once', async () => {
    const g = new VsockTestGuest({ cid: 3 });
    expect(g.events()).toEqual([]);
    g.transport.restore(g.transport.snapshot());
    await flush(); // the transport kicks every ready queue after a restore
    expect(g.events()).toEqual([0]);
    expect(g.device.stats.events).toBe(1);
    expect(g.events()).toEqual([]);
  });

  it('transportReset() ends the guest’s connections in the router too: the peer sees RST, the guest an event', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const { a, b } = await openSeq(router);
    a.device.transportReset();
    expect(a.events()).toEqual([0]);
    expect(b.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(router.connections).toBe(0);
  });

  it('with no event buffer posted the event waits; a device reset drops it', async () => {
    const g = new VsockTestGuest({ cid: 3, eventBuffers: 0 });
    g.device.transportReset();
    expect(g.device.eventPending).toBe(true);
    g.device.reset();
    expect(g.device.eventPending).toBe(false);
  });
});
