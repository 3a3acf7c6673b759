// Property: whatever two hostile guests transmit (any op, type, CID, port, credit fields, length),
// the router never throws, never holds more than its per-connection bound, and a third machine
// that only talks to the host keeps working.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { VsockOp, VSOCK_HOST_CID, type VsockPacket } from '../virtio/vsock.js';
import { allowAllMediator, VsockRouter, type VsockMediator } from './vsock-router.js';
import { VsockTestGuest } from './vsock-test-guest.js';

const cidArb = fc.constantFrom(0, 1, 2, 3, 4, 5, 99, 0xffffffff);
const portArb = fc.constantFrom(0, 1, 80, 1000, 0xffffffff);
const pktArb = fc.record({
  from: fc.constantFrom(0, 1),
  dstCid: cidArb,
  srcPort: portArb,
  dstPort: portArb,
  type: fc.constantFrom(1, 1, 1, 0, 2, 0xffff),
  op: fc.integer({ min: 0, max: 9 }),
  flags: fc.constantFrom(0, 1, 2, 3, 0xffffffff),
  bufAlloc: fc.constantFrom(0, 1, 4096, 0x7fffffff, 0xffffffff),
  fwdCnt: fc.constantFrom(0, 10, 0xffffffff),
  len: fc.constantFrom(0, 1, 100, 4096, 20000),
});

describe('VsockRouter under random hostile traffic', () => {
  it('never throws, stays bounded, and an unrelated machine keeps working', async () => {
    // A mediator that is sometimes slow, sometimes says no, sometimes throws.
    let n = 0;
    const flaky: VsockMediator<number> = {
      connect: (r) => {
        n++;
        if (n % 7 === 0) throw new Error('mediator bug');
        if (n % 5 === 0) return Promise.resolve({ verdict: 'deny', connection: null, reason: 'no' });
        return { verdict: 'allow', connection: n, reason: r.destination };
      },
      message: (_c, _d, data) => (data.length % 3 === 0 ? Promise.resolve({ verdict: 'allow', data }) : data.length % 11 === 0 ? { verdict: 'deny', reason: 'x' } : { verdict: 'allow', data }),
    };
    await fc.assert(fc.asyncProperty(fc.array(pktArb, { minLength: 1, maxLength: 60 }), fc.boolean(), async (pkts, useFlaky) => {
      const router = new VsockRouter<number | null>({ mediator: useFlaky ? flaky : allowAllMediator, connectionBuffer: 8192, maxConnectionsPerPeer: 4 });
      const guests = [new VsockTestGuest({ cid: 3 }), new VsockTestGuest({ cid: 4 })];
      guests.forEach((g, i) => router.attach(g.device, `g${i}`));
      const bystander = new VsockTestGuest({ cid: 5 });
      router.attach(bystander.device, 'bystander');
      router.listen(80, 'svc', (s) => { s.onData = (d) => { s.write(d); }; });
      for (const p of pkts) {
        const g = guests[p.from] as VsockTestGuest;
        const fields: Partial<VsockPacket> & { op: number } = { ...p, payload: new Uint8Array(p.len) };
        g.send(fields);
        if (p.op === VsockOp.Rw && p.len > 0) await Promise.resolve();
        for (const x of guests) x.receive();
      }
      await new Promise((r) => setImmediate(r));
      for (const x of guests) {
        x.receive();
        expect(x.device.backlogBytes).toBeLessThanOrEqual(2 * 8192 * 4);
      }
      expect(router.connections).toBeLessThanOrEqual(2 * 4 + 2 * 4);
      // The bystander (which the hostile guests may also have tried to reach) connects to the
      // host service and gets its echo.
      bystander.receive();
      bystander.send({ op: VsockOp.Request, dstCid: VSOCK_HOST_CID, srcPort: 7, dstPort: 80 });
      await new Promise((r) => setImmediate(r));
      await new Promise((r) => setImmediate(r));
      const resp = bystander.receive().filter((x) => x.dstPort === 7);
      if (!useFlaky) {
        expect(resp.map((x) => x.op)).toEqual([VsockOp.Response]);
        bystander.send({ op: VsockOp.Rw, dstCid: VSOCK_HOST_CID, srcPort: 7, dstPort: 80, payload: new Uint8Array([1, 2]) });
        expect(bystander.receive().filter((x) => x.dstPort === 7).map((x) => x.payload.length)).toEqual([2]);
      }
      router.close();
    }), { numRuns: 60 });
  });
});
