import { describe, expect, it } from 'vitest';
import { MmioReg } from './constants.js';
import { attach } from './devices.fixture.js';
import { decodeVsockHeader, encodeVsockHeader, VirtioVsock, VSOCK_HEADER_SIZE, VsockOp, type VsockPacket } from './vsock.js';
import { VsockTestGuest } from '../net/vsock-test-guest.js';

const pkt = (p: Partial<VsockPacket>): VsockPacket => ({
  srcCid: 3, dstCid: 2, srcPort: 1000, dstPort: 80, type: 1, op: VsockOp.Rw, flags: 0, bufAlloc: 4096, fwdCnt: 0, payload: new Uint8Array(0), ...p,
});

describe('vsock header', () => {
  it('is the 44-byte little-endian virtio_vsock_hdr', () => {
    const h = encodeVsockHeader(pkt({ srcCid: 0x0102, dstCid: 2, srcPort: 0x11223344, dstPort: 5, op: 6, flags: 3, bufAlloc: 0x1000, fwdCnt: 0xfffffffe, payload: new Uint8Array(7) }));
    expect(h.length).toBe(VSOCK_HEADER_SIZE);
    expect([...h.subarray(0, 2)]).toEqual([0x02, 0x01]);
    expect([...h.subarray(16, 20)]).toEqual([0x44, 0x33, 0x22, 0x11]);
    expect(h[24]).toBe(7); // len
    expect(h[28]).toBe(1); // type
    expect(h[30]).toBe(6); // op
    expect(h[32]).toBe(3); // flags
    expect([...h.subarray(36, 40)]).toEqual([0, 0x10, 0, 0]);
    expect([...h.subarray(40, 44)]).toEqual([0xfe, 0xff, 0xff, 0xff]);
    const d = decodeVsockHeader(h);
    expect(d).toMatchObject({ ok: true, len: 7, header: { srcCid: 0x102, srcPort: 0x11223344, fwdCnt: 0xfffffffe } });
    expect(decodeVsockHeader(h.subarray(0, 43))).toMatchObject({ ok: false });
  });
});

describe('VirtioVsock', () => {
  it('is device 19 with three queues and the guest CID in config space', () => {
    const { drv } = attach(new VirtioVsock({ cid: 0x12345 }));
    expect(drv.read32(MmioReg.DeviceId)).toBe(19);
    expect(drv.read32(0x100)).toBe(0x12345);
    expect(drv.read32(0x104)).toBe(0);
    expect(drv.queues).toHaveLength(3);
    expect(() => new VirtioVsock({ cid: 2 })).toThrow(/cid/);
  });

  it('hands well-formed packets up and drops malformed ones, counting why', () => {
    const g = new VsockTestGuest({ cid: 3 });
    const got: VsockPacket[] = [];
    g.device.setUplink({ transmit: (p) => got.push(p), deviceReset: () => {} });
    g.send({ op: VsockOp.Rw, dstCid: 2, payload: new Uint8Array([1, 2, 3]) });
    g.sendRaw(new Uint8Array(20));
    const truncated = encodeVsockHeader(pkt({ payload: new Uint8Array(100) }));
    g.sendRaw(new Uint8Array([...truncated, 1, 2, 3]));
    const huge = encodeVsockHeader(pkt({}));
    new DataView(huge.buffer).setUint32(24, 0x10001, true);
    g.sendRaw(huge);
    g.send({ op: VsockOp.Request, srcCid: 4 });
    const wide = encodeVsockHeader(pkt({}));
    new DataView(wide.buffer).setUint32(12, 1, true); // dst_cid bit 32
    g.sendRaw(wide);
    expect(got).toHaveLength(1);
    expect([...(got[0] as VsockPacket).payload]).toEqual([1, 2, 3]);
    expect(g.device.stats.txDropped).toEqual({ 'short-header': 1, truncated: 1, oversized: 1, 'spoofed-source': 1, 'bad-cid': 1 });
    expect(g.driver.needsReset()).toBe(false);
  });

  it('splits a payload over rx buffers and bounds its backlog', () => {
    const g = new VsockTestGuest({ cid: 3, rxBuffers: 2, rxBufferSize: 44 + 100 });
    const data = Uint8Array.from({ length: 250 }, (_, i) => i);
    expect(g.device.deliver(pkt({ srcCid: 2, dstCid: 3, payload: data }))).toBe(true);
    const first = g.receive();
    expect(first.map((p) => p.payload.length)).toEqual([100, 100]);
    const rest = g.receive();
    expect(rest.map((p) => p.payload.length)).toEqual([50]);
    expect([...first[0]!.payload, ...first[1]!.payload, ...rest[0]!.payload]).toEqual([...data]);

    const small = new VirtioVsock({ cid: 5, maxBacklog: 4 });
    for (let i = 0; i < 4; i++) expect(small.deliver(pkt({}))).toBe(true);
    expect(small.deliver(pkt({}))).toBe(false);
    expect(small.stats.rxOverflow).toBe(1);
  });
});
