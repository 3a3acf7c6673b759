import { describe, expect, it } from 'vitest';
import { Feature } from './constants.js';
import { NetFeature, NET_HEADER_SIZE, VirtioNet, formatMac, parseMac } from './net.js';
import { NetTestGuest, ethernetFrame } from '../net/net-test-guest.js';

const A = '02:00:00:00:00:0a';
const B = '02:00:00:00:00:0b';

function captured(g: NetTestGuest): Uint8Array[] {
  const out: Uint8Array[] = [];
  g.device.setUplink({ transmit: (f) => out.push(f) });
  return out;
}

describe('VirtioNet: registers and config space (virtio 1.2 §5.1)', () => {
  it('is device 1 with rx/tx queues, offering MAC, MTU, STATUS and VERSION_1 but no offloads', () => {
    const g = new NetTestGuest({ mac: A });
    expect(g.driver.read32(0x008)).toBe(1);
    const f = g.driver.deviceFeatures();
    expect(f).toBe(NetFeature.Mac | NetFeature.Mtu | NetFeature.Status | Feature.Version1 | (f & (Feature.RingEventIdx | Feature.RingIndirectDesc)));
    expect(f & 0b111n).toBe(0n); // CSUM, GUEST_CSUM, CTRL_GUEST_OFFLOADS
    expect(f & (1n << 15n)).toBe(0n); // MRG_RXBUF
    expect(g.device.queueMaxSizes).toHaveLength(2);
  });

  it('config space: mac[6], status (link up), max_virtqueue_pairs 1, mtu — and ignores writes', () => {
    const g = new NetTestGuest({ mac: A, mtu: 9000 });
    const cfg = [...Array(12).keys()].map((i) => g.device.readConfig(i, 1));
    expect(cfg.slice(0, 6)).toEqual([2, 0, 0, 0, 0, 0x0a]);
    expect(g.device.readConfig(6, 2)).toBe(1);
    expect(g.device.readConfig(8, 2)).toBe(1);
    expect(g.device.readConfig(10, 2)).toBe(9000);
    g.device.writeConfig(0, 0xff, 1);
    expect(g.device.readConfig(0, 1)).toBe(2);
  });

  it('rejects a multicast MAC, a bad MTU; parses and formats MACs', () => {
    expect(() => new VirtioNet({ mac: '01:00:5e:00:00:01' })).toThrow(/multicast/);
    expect(() => new VirtioNet({ mac: A, mtu: 10 })).toThrow(/mtu/);
    expect(() => new VirtioNet({ mac: 'nope' })).toThrow(/MAC/);
    expect(formatMac(parseMac('AA-bb-CC-dd-EE-ff'))).toBe('aa:bb:cc:dd:ee:ff');
  });
});

describe('VirtioNet: data path', () => {
  it('transmit strips the 12-byte header and hands the frame to the uplink', () => {
    const g = new NetTestGuest({ mac: A });
    const out = captured(g);
    const f = ethernetFrame(B, A, 0x0800, 'hello');
    g.send(f);
    expect(out).toEqual([f]);
    expect(g.device.stats).toMatchObject({ txFrames: 1, txBytes: f.length });
  });

  it('receive writes a header with num_buffers = 1 and the frame into one buffer', () => {
    const g = new NetTestGuest({ mac: A });
    const f = ethernetFrame(A, B, 0x0800, 'world');
    expect(g.device.deliver(f)).toBe(true);
    const [r] = g.receiveWithHeaders();
    expect(r?.frame).toEqual(f);
    expect([...(r?.header ?? [])]).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    expect(g.device.stats.rxFrames).toBe(1);
  });

  it('frames wait for rx buffers in a bounded backlog; beyond it they are dropped and counted', () => {
    const g = new NetTestGuest({ mac: A, rxBuffers: 0, maxBacklog: 4 });
    const f = ethernetFrame(A, B, 0x0800, 'x');
    const results = Array.from({ length: 10 }, () => g.device.deliver(f));
    expect(results.filter(Boolean)).toHaveLength(4);
    expect(g.device.backlog).toBe(4);
    expect(g.device.stats.rxOverflow).toBe(6);
  });

  it('snapshot/restore keeps MAC and MTU and refuses another card', () => {
    const a = new VirtioNet({ mac: A });
    const s = a.snapshot();
    expect(() => new VirtioNet({ mac: A }).restore(s)).not.toThrow();
    expect(() => new VirtioNet({ mac: B }).restore(s)).toThrow(/MAC/);
  });
});

describe('VirtioNet: hostile driver', () => {
  it('drops short headers, offload requests, runts and oversized frames; keeps working', () => {
    const g = new NetTestGuest({ mac: A });
    const out = captured(g);
    g.sendRaw(new Uint8Array(10)); // a legacy 10-byte header and nothing else
    const csum = new Uint8Array(NET_HEADER_SIZE + 60); csum[0] = 1; g.sendRaw(csum);
    const gso = new Uint8Array(NET_HEADER_SIZE + 60); gso[1] = 1; g.sendRaw(gso);
    g.sendRaw(new Uint8Array(NET_HEADER_SIZE + 13));
    g.send(ethernetFrame(B, A, 0x0800, new Uint8Array(1501)));
    // A descriptor describing 4 MiB: dropped without being read.
    g.sendDescriptor(0x100000n, 4 << 20);
    expect(g.device.stats.txDropped).toEqual({ 'short-header': 1, 'offload-not-negotiated': 2, runt: 1, oversized: 2 });
    expect(out).toHaveLength(0);
    expect(g.driver.needsReset()).toBe(false);
    g.send(ethernetFrame(B, A, 0x0800, new Uint8Array(1500)));
    g.send(ethernetFrame(B, A, 0x8100, new Uint8Array(1504))); // 802.1Q-tagged: 4 more bytes allowed
    expect(out).toHaveLength(2);
  });

  it('an rx buffer too small for the frame completes empty and the frame is dropped', () => {
    const g = new NetTestGuest({ mac: A, rxBufferSize: 40 });
    g.device.deliver(ethernetFrame(A, B, 0x0800, new Uint8Array(100)));
    g.device.deliver(ethernetFrame(A, B, 0x0800, 'ok'));
    expect(g.receive().map((f) => f.length)).toEqual([16]);
    expect(g.device.stats.rxTooSmall).toBe(1);
  });
});
