import { describe, expect, it } from 'vitest';
import { VsockOp, VsockShutdown, VSOCK_HOST_CID, type VsockPacket } from '../virtio/vsock.js';
import { allowAllMediator, VsockRouter, type VsockHostStream, type VsockMediator } from './vsock-router.js';
import { VsockTestGuest } from './vsock-test-guest.js';

const text = (s: string) => new TextEncoder().encode(s);
const str = (b: Uint8Array) => new TextDecoder().decode(b);
const ops = (ps: VsockPacket[]) => ps.map((p) => p.op);
const flush = () => new Promise((r) => setImmediate(r));

/** A mediator that records calls and follows simple rules. */
function recording(opts: { denyConnect?: (dst: string) => boolean; denyMessage?: (d: Uint8Array) => boolean; delay?: number } = {}) {
  const calls: string[] = [];
  const m: VsockMediator<number> = {
    connect: async (r) => {
      calls.push(`connect ${r.source}->${r.destination}:${r.port}`);
      if (opts.delay) await new Promise((res) => setTimeout(res, opts.delay));
      return opts.denyConnect?.(r.destination) ? { verdict: 'deny', connection: null, reason: 'no' } : { verdict: 'allow', connection: calls.length, reason: 'ok' };
    },
    message: (c, d, data) => {
      calls.push(`msg ${c} ${d} ${str(data)}`);
      const deny = opts.denyMessage?.(data) ?? false;
      if (opts.delay) return new Promise((res) => setTimeout(() => res(deny ? { verdict: 'deny', reason: 'content' } : { verdict: 'allow', data }), opts.delay));
      return deny ? { verdict: 'deny', reason: 'content' } : { verdict: 'allow', data };
    },
    close: (c) => { calls.push(`close ${c}`); },
  };
  return { m, calls };
}

function pair<C>(router: VsockRouter<C>) {
  const a = new VsockTestGuest({ cid: 3 });
  const b = new VsockTestGuest({ cid: 4 });
  router.attach(a.device, 'a');
  router.attach(b.device, 'b');
  return { a, b };
}

async function openGuestToGuest<C>(router: VsockRouter<C>) {
  const { a, b } = pair(router);
  a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 1000, dstPort: 80 });
  await flush();
  const req = b.receive();
  expect(req).toMatchObject([{ op: VsockOp.Request, srcCid: 3, srcPort: 1000, dstCid: 4, dstPort: 80 }]);
  b.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
  expect(ops(a.receive())).toEqual([VsockOp.Response]);
  const aSend = (p: Partial<VsockPacket> & { op: number }) => a.send({ dstCid: 4, srcPort: 1000, dstPort: 80, ...p });
  const bSend = (p: Partial<VsockPacket> & { op: number }) => b.send({ dstCid: 3, srcPort: 80, dstPort: 1000, ...p });
  return { a, b, aSend, bSend };
}

describe('VsockRouter: guest to guest', () => {
  it('mediates the request before the listener sees it, then every message', async () => {
    const { m, calls } = recording();
    const router = new VsockRouter({ mediator: m });
    const { a, b, aSend, bSend } = await openGuestToGuest(router);
    aSend({ op: VsockOp.Rw, payload: text('ping') });
    await flush();
    const got = b.receive();
    expect(got).toMatchObject([{ op: VsockOp.Rw, srcCid: 3, dstCid: 4 }]);
    expect(str(got[0]!.payload)).toBe('ping');
    bSend({ op: VsockOp.Rw, payload: text('pong') });
    expect(str(a.receive()[0]!.payload)).toBe('pong');
    expect(calls).toEqual(['connect a->b:80', 'msg 1 forward ping', 'msg 1 reverse pong']);
    expect(router.stats).toMatchObject({ messagesDelivered: 2, bytesDelivered: 8 });
    aSend({ op: VsockOp.Rst });
    expect(ops(b.receive())).toEqual([VsockOp.Rst]);
    expect(calls.at(-1)).toBe('close 1');
    expect(router.connections).toBe(0);
  });

  it('a refused connection is an RST to the requester; the listener hears nothing', async () => {
    const { m } = recording({ denyConnect: (d) => d === 'b' });
    const router = new VsockRouter({ mediator: m });
    const { a, b } = pair(router);
    a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 1, dstPort: 80 });
    await flush();
    expect(ops(a.receive())).toEqual([VsockOp.Rst]);
    expect(b.receive()).toEqual([]);
    expect(router.stats.connectionsRefused).toBe(1);
  });

  it('a denied message resets the connection (or is dropped with onDeny: drop) and never reaches the peer', async () => {
    for (const onDeny of ['reset', 'drop'] as const) {
      const { m } = recording({ denyMessage: (d) => str(d).includes('SECRET') });
      const router = new VsockRouter({ mediator: m, onDeny });
      const { a, b, aSend } = await openGuestToGuest(router);
      aSend({ op: VsockOp.Rw, payload: text('the SECRET') });
      await flush();
      const seen = b.receive();
      expect(seen.every((p) => !str(p.payload).includes('SECRET'))).toBe(true);
      expect(router.stats.messagesDenied).toBe(1);
      if (onDeny === 'reset') {
        expect(ops(seen)).toEqual([VsockOp.Rst]);
        expect(ops(a.receive())).toEqual([VsockOp.Rst]);
      } else {
        expect(seen).toEqual([]);
        // The sender gets its credit back, so it is not stalled by the dropped bytes.
        aSend({ op: VsockOp.CreditRequest });
        expect(a.receive()).toMatchObject([{ op: VsockOp.CreditUpdate, fwdCnt: 10 }]);
      }
    }
  });

  it('an async mediator keeps message order', async () => {
    const { m } = recording({ delay: 2 });
    const router = new VsockRouter({ mediator: m });
    const { a, b, aSend } = await (async () => {
      const r = pair(router);
      r.a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 1000, dstPort: 80 });
      await new Promise((res) => setTimeout(res, 10));
      r.b.receive();
      r.b.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
      r.a.receive();
      return { ...r, aSend: (p: Partial<VsockPacket> & { op: number }) => r.a.send({ dstCid: 4, srcPort: 1000, dstPort: 80, ...p }) };
    })();
    for (const w of ['1', '2', '3', '4']) aSend({ op: VsockOp.Rw, payload: text(w) });
    await new Promise((res) => setTimeout(res, 40));
    expect(b.receive().map((p) => str(p.payload)).join('')).toBe('1234');
    void a;
  });

  it('shutdown is forwarded after the data before it', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const { b, aSend } = await openGuestToGuest(router);
    aSend({ op: VsockOp.Rw, payload: text('last') });
    aSend({ op: VsockOp.Shutdown, flags: VsockShutdown.Send });
    expect(ops(b.receive())).toEqual([VsockOp.Rw, VsockOp.Shutdown]);
  });
});

describe('VsockRouter: host endpoints', () => {
  it('routes a guest connect to a host listener and back, with host writes mediated', async () => {
    const { m, calls } = recording();
    const router = new VsockRouter({ mediator: m });
    const g = new VsockTestGuest({ cid: 3 });
    router.attach(g.device, 'worker');
    const streams: VsockHostStream[] = [];
    const data: string[] = [];
    router.listen(9000, 'keysvc', (s) => {
      streams.push(s);
      s.onData = (d) => { data.push(str(d)); s.write(text(`echo ${str(d)}`)); };
    }, { service: 'keys' });
    g.send({ op: VsockOp.Request, dstCid: VSOCK_HOST_CID, srcPort: 5, dstPort: 9000 });
    await flush();
    expect(ops(g.receive())).toEqual([VsockOp.Response]);
    expect(streams[0]?.peer).toBe('worker');
    g.send({ op: VsockOp.Rw, dstCid: 2, srcPort: 5, dstPort: 9000, payload: text('hi') });
    expect(data).toEqual(['hi']);
    const back = g.receive();
    expect(str(back.find((p) => p.op === VsockOp.Rw)!.payload)).toBe('echo hi');
    expect(calls).toEqual(['connect worker->keysvc:9000', 'msg 1 forward hi', 'msg 1 reverse echo hi']);
    let closed = '';
    streams[0]!.onClose = (why) => { closed = why; };
    g.send({ op: VsockOp.Rst, dstCid: 2, srcPort: 5, dstPort: 9000 });
    expect(closed).toMatch(/reset by worker/);
  });

  it('a host endpoint connects to a guest listener', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const g = new VsockTestGuest({ cid: 7 });
    router.attach(g.device, 'svc');
    const p = router.connect('client', 7, 22);
    await flush();
    const [req] = g.receive();
    expect(req).toMatchObject({ op: VsockOp.Request, srcCid: 2, dstPort: 22 });
    g.send({ op: VsockOp.Response, dstCid: 2, srcPort: 22, dstPort: req!.srcPort });
    const s = await p;
    expect(s.write(text('x'))).toBe(true);
    expect(str(g.receive()[0]!.payload)).toBe('x');
    const refused = router.connect('client', 7, 23);
    await flush();
    const [r2] = g.receive();
    g.send({ op: VsockOp.Rst, dstCid: 2, srcPort: 23, dstPort: r2!.srcPort });
    await expect(refused).rejects.toThrow(/reset by svc/);
    await expect(router.connect('client', 99, 1)).rejects.toThrow(/no machine with CID 99/);
  });
});

describe('VsockRouter: hostile guests', () => {
  it('answers unroutable packets with RST and never throws', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const { a } = pair(router);
    a.send({ op: VsockOp.Request, dstCid: 42, srcPort: 1, dstPort: 1 }); // unknown CID
    a.send({ op: VsockOp.Request, dstCid: 3, srcPort: 1, dstPort: 1 }); // itself
    a.send({ op: VsockOp.Request, dstCid: 2, srcPort: 1, dstPort: 1 }); // no host listener
    a.send({ op: VsockOp.Rw, dstCid: 4, srcPort: 9, dstPort: 9, payload: text('x') }); // no connection
    a.send({ op: VsockOp.Request, type: 3, dstCid: 4, srcPort: 1, dstPort: 1 }); // no such socket type (SEQPACKET is vsock-seqpacket.test.ts)
    a.send({ op: VsockOp.Rst, dstCid: 4, srcPort: 9, dstPort: 9 }); // RST is never answered
    await flush();
    expect(ops(a.receive())).toEqual([3, 3, 3, 3, 3]);
    expect(router.stats.rstUnroutable).toBe(5);
  });

  it('resets a connection on an unknown op, an unexpected RESPONSE, or a second REQUEST', async () => {
    for (const bad of [{ op: 99 }, { op: VsockOp.Response }, { op: VsockOp.Request }]) {
      const router = new VsockRouter({ mediator: allowAllMediator });
      const { a, b, aSend } = await openGuestToGuest(router);
      aSend(bad);
      expect(ops(a.receive())).toEqual([VsockOp.Rst]);
      expect(ops(b.receive())).toEqual([VsockOp.Rst]);
      expect(router.connections).toBe(0);
    }
  });

  it('a sender beyond its credit is reset', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator, connectionBuffer: 8192 });
    const { a, b, aSend } = await openGuestToGuest(router);
    b.bufAlloc = 1024; // b never reads past 1 KiB
    b.send({ op: VsockOp.CreditUpdate, dstCid: 3, srcPort: 80, dstPort: 1000 });
    aSend({ op: VsockOp.Rw, payload: new Uint8Array(4096) });
    aSend({ op: VsockOp.Rw, payload: new Uint8Array(4096) });
    expect(router.stats.creditViolations).toBe(0);
    aSend({ op: VsockOp.Rw, payload: new Uint8Array(1) });
    expect(router.stats.creditViolations).toBe(1);
    expect(ops(a.receive())).toContain(VsockOp.Rst);
    expect(ops(b.receive())).toContain(VsockOp.Rst);
  });

  it('a peer that never reads gets only its window; the sender is back-pressured, host memory stays bounded', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator, connectionBuffer: 16384 });
    const { a, b, aSend } = await openGuestToGuest(router);
    b.bufAlloc = 2048;
    b.send({ op: VsockOp.CreditUpdate, dstCid: 3, srcPort: 80, dstPort: 1000 });
    let sent = 0;
    let fwd = 0;
    // a sends only within the credit the router grants it, as a correct driver would.
    for (let i = 0; i < 100; i++) {
      for (const p of a.receive()) if (p.op === VsockOp.CreditUpdate || p.op === VsockOp.Rw) fwd = p.fwdCnt;
      const room = 16384 - (sent - fwd);
      if (room < 1024) continue;
      aSend({ op: VsockOp.Rw, payload: new Uint8Array(1024) });
      sent += 1024;
    }
    const got = b.receive().reduce((n, p) => n + p.payload.length, 0);
    expect(got).toBe(2048);
    expect(sent).toBeLessThanOrEqual(2048 + 16384);
    expect(b.device.backlogBytes).toBe(0);
    expect(router.stats.creditViolations).toBe(0);
    // Now b reads: credit flows again and the stall ends.
    b.fwdCnt = 2048;
    b.send({ op: VsockOp.CreditUpdate, dstCid: 3, srcPort: 80, dstPort: 1000 });
    expect(b.receive().reduce((n, p) => n + p.payload.length, 0)).toBe(2048);
  });

  it('a connection flood is capped per machine without asking the mediator', async () => {
    const { m, calls } = recording();
    const router = new VsockRouter({ mediator: m, maxConnectionsPerPeer: 8 });
    const { a, b } = pair(router);
    for (let i = 0; i < 200; i++) a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 10000 + i, dstPort: 80 });
    await flush();
    expect(calls.filter((c) => c.startsWith('connect'))).toHaveLength(8);
    expect(router.stats.connectionsOverLimit).toBe(192);
    expect(router.connections).toBe(8);
    expect(b.receive().length).toBeGreaterThan(0);
    expect(a.receive().filter((p) => p.op === VsockOp.Rst).length).toBeGreaterThan(0);
  });

  it('a device reset or detach resets its connections at the peers', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const { a, b } = await openGuestToGuest(router);
    a.driver.write32(0x070, 0); // Status = 0: device reset
    expect(ops(b.receive())).toEqual([VsockOp.Rst]);
    expect(router.connections).toBe(0);
    void a;
  });
});
