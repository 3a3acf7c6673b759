// The routers end the running machine's slice when they deliver into another machine (so the
// receiver runs now), and not when a packet goes back to the machine being handled. On
// MockBackend: the "sender" is a mock machine whose port device makes a driver-side test guest
// transmit during the exit; the KVM version with a halted receiver is wake.kvm.test.ts.
import { Machine } from '@tsvm/core';
import { MockBackend, outExit } from '@tsvm/core/testing';
import { describe, expect, it } from 'vitest';
import { VsockOp } from '../virtio/vsock.js';
import { BROADCAST_MAC, ethernetFrame, NetTestGuest } from './net-test-guest.js';
import { allowAllFrames, VirtualSwitch } from './switch.js';
import { allowAllMediator, VsockRouter } from './vsock-router.js';
import { openVsockPair, VsockTestGuest } from './vsock-test-guest.js';

/** Exits in the first slice of a mock machine spinning on `out 0x80` that runs `act` at its third exit. */
async function firstSlice(act: () => void): Promise<number> {
  const backend = new MockBackend();
  backend.script().whenEmpty = outExit(0x80, 1);
  await using vm = await Machine.create({ memory: 2 << 20, backend });
  let n = 0;
  vm.attach({ port: 0x80, size: 1 }, { name: 'act', write: () => { if (++n === 3) act(); } });
  let first: number | undefined;
  vm.events.on('slice', () => { first ??= n; });
  await vm.run({ timeout: 15 });
  return first as number;
}

async function openPair() {
  const router = new VsockRouter({ mediator: allowAllMediator });
  return { router, ...(await openVsockPair(router)) };
}

describe('routers wake the receiving machine', () => {
  it('a vsock message for another machine ends the sender’s slice after that exit', async () => {
    const { a, b } = await openPair();
    const exits = await firstSlice(() => a.send({ op: VsockOp.Rw, dstCid: 4, srcPort: 1000, dstPort: 80, payload: new Uint8Array(64) }));
    expect(exits).toBe(3);
    expect(b.receive().map((p) => p.op)).toEqual([VsockOp.Rw]);
  });

  it('a reply to the machine being handled (RST for an unknown connection) does not end its slice', async () => {
    const { a } = await openPair();
    const exits = await firstSlice(() => a.send({ op: VsockOp.Rw, dstCid: 4, srcPort: 1001, dstPort: 80, payload: new Uint8Array(8) }));
    expect(a.receive().map((p) => p.op)).toEqual([VsockOp.Rst]);
    expect(exits).toBeGreaterThan(100);
  });

  it('a frame the switch delivers to another machine’s card ends the sender’s slice', async () => {
    const sw = new VirtualSwitch({ mediator: allowAllFrames });
    const a = new NetTestGuest({ mac: '02:00:00:00:00:0a' });
    const b = new NetTestGuest({ mac: '02:00:00:00:00:0b' });
    sw.attach(a.device, 'a');
    sw.attach(b.device, 'b');
    const exits = await firstSlice(() => a.send(ethernetFrame(BROADCAST_MAC, '02:00:00:00:00:0a', 0x0800, 'hi')));
    expect(exits).toBe(3);
    expect(b.receive()).toHaveLength(1);
  });

  it('a verdict that is a promise (an async guard) ends the sender’s slice, so it settles now', async () => {
    const router = new VsockRouter({
      mediator: { connect: () => ({ verdict: 'allow', connection: null, reason: '' }), message: async (_c, _d, data) => ({ verdict: 'allow', data }) },
    });
    const a = new VsockTestGuest({ cid: 3 });
    const b = new VsockTestGuest({ cid: 4 });
    router.attach(a.device, 'a');
    router.attach(b.device, 'b');
    a.send({ op: VsockOp.Request, dstCid: 4, srcPort: 1000, dstPort: 80 });
    b.receive();
    b.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
    a.receive();
    const exits = await firstSlice(() => a.send({ op: VsockOp.Rw, dstCid: 4, srcPort: 1000, dstPort: 80, payload: new Uint8Array(64) }));
    expect(exits).toBe(3);
    expect(b.receive().map((p) => p.op)).toEqual([VsockOp.Rw]);
  });
});
