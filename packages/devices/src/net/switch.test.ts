import { describe, expect, it } from 'vitest';
import { ETHERNET_HEADER_SIZE } from '../virtio/net.js';
import { BROADCAST_MAC, NetTestGuest, ethernetFrame } from './net-test-guest.js';
import { VirtualSwitch, allowAllFrames, type FrameMediator, type SwitchFrame } from './switch.js';

const MAC = { a: '02:00:00:00:00:0a', b: '02:00:00:00:00:0b', c: '02:00:00:00:00:0c' } as const;
const text = (b: Uint8Array) => new TextDecoder().decode(b.subarray(ETHERNET_HEADER_SIZE));
const flush = () => new Promise((r) => setImmediate(r));

function lan(mediator: FrameMediator = allowAllFrames, opts: { bRx?: number } = {}) {
  const sw = new VirtualSwitch({ mediator });
  const a = new NetTestGuest({ mac: MAC.a });
  const b = new NetTestGuest({ mac: MAC.b, ...(opts.bRx !== undefined ? { rxBuffers: opts.bRx } : {}) });
  const c = new NetTestGuest({ mac: MAC.c });
  sw.attach(a.device, 'a');
  sw.attach(b.device, 'b');
  sw.attach(c.device, 'c');
  return { sw, a, b, c };
}

describe('VirtualSwitch: forwarding', () => {
  it('floods unknown unicast and broadcast, learns sources, then forwards to one port', () => {
    const { sw, a, b, c } = lan();
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'who?'));
    expect(b.receive().map(text)).toEqual(['who?']);
    expect(c.receive().map(text)).toEqual(['who?']);
    b.send(ethernetFrame(MAC.a, MAC.b, 0x0800, 'me'));
    expect(a.receive().map(text)).toEqual(['me']);
    expect(c.receive()).toEqual([]);
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'hi b'));
    expect(b.receive().map(text)).toEqual(['hi b']);
    expect(c.receive()).toEqual([]);
    c.send(ethernetFrame(BROADCAST_MAC, MAC.c, 0x0806, 'arp'));
    expect([a.receive().map(text), b.receive().map(text)]).toEqual([['arp'], ['arp']]);
    expect(sw.macTable()).toEqual(new Map([[MAC.a, 'a'], [MAC.b, 'b'], [MAC.c, 'c']]));
    expect(sw.stats).toMatchObject({ framesIn: 4, flooded: 2, delivered: 6 });
  });

  it('host endpoints send and receive; their queue is bounded', () => {
    const sw = new VirtualSwitch({ mediator: allowAllFrames });
    const a = new NetTestGuest({ mac: MAC.a });
    sw.attach(a.device, 'a');
    const h = sw.hostPort('svc', { mac: MAC.c, queueLimit: 2 });
    let woke = 0;
    h.onFrame = () => { woke++; };
    h.send(ethernetFrame(MAC.a, MAC.c, 0x0800, 'from host'));
    expect(a.receive().map(text)).toEqual(['from host']);
    for (let i = 0; i < 5; i++) a.send(ethernetFrame(MAC.c, MAC.a, 0x0800, `m${i}`));
    expect(h.receive().map(text)).toEqual(['m0', 'm1']);
    expect(woke).toBe(2);
    expect(h.stats.dropped.congested).toBe(3);
    h.close();
    h.close();
    a.send(ethernetFrame(MAC.c, MAC.a, 0x0800, 'gone'));
    expect(sw.portStats('svc')).toBeUndefined();
  });

  it('asks the mediator once per receiving port, in order, also when verdicts are async', async () => {
    const seen: string[] = [];
    const m: FrameMediator = {
      frame: (f: SwitchFrame) => {
        seen.push(`${f.source}>${f.destination} ${f.ethertype.toString(16)} ${f.flooded} ${text(f.data)}`);
        const v = f.destination === 'c' ? { verdict: 'deny' as const, reason: 'no c' } : { verdict: 'allow' as const, data: f.data };
        return text(f.data).startsWith('slow') ? new Promise((r) => setTimeout(() => r(v), 5)) : v;
      },
    };
    const { sw, a, b, c } = lan(m);
    a.send(ethernetFrame(BROADCAST_MAC, MAC.a, 0x0806, 'slow1'));
    a.send(ethernetFrame(BROADCAST_MAC, MAC.a, 0x0806, 'fast2'));
    for (let i = 0; i < 200 && seen.length < 4; i++) await new Promise((r) => setTimeout(r, 5));
    expect(sw.portStats('a')?.dropped.denied).toBe(2);
    expect(seen).toEqual(['a>b 806 true slow1', 'a>c 806 true slow1', 'a>b 806 true fast2', 'a>c 806 true fast2']);
    expect(b.receive().map(text)).toEqual(['slow1', 'fast2']);
    expect(c.receive()).toEqual([]);
    await flush();
  });

  it('a rewriting mediator is checked again (runt / oversized rewrites are dropped)', () => {
    const { sw, a, b } = lan({ frame: (f) => ({ verdict: 'allow', data: text(f.data) === 'shrink' ? new Uint8Array(3) : text(f.data) === 'grow' ? new Uint8Array(3000) : f.data }) });
    sw.macTable();
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'shrink'));
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'grow'));
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'fine'));
    expect(b.receive().map(text)).toEqual(['fine']);
    expect(sw.portStats('a')?.dropped).toMatchObject({ runt: 2, oversized: 2 });
  });
});

describe('VirtualSwitch: hostile input', () => {
  it('drops runts, oversized, multicast and spoofed sources, hairpins; nothing throws', () => {
    const sw = new VirtualSwitch({ mediator: allowAllFrames });
    const a = new NetTestGuest({ mac: MAC.a, mtu: 9000 }); // the card allows jumbo frames, the switch does not
    const b = new NetTestGuest({ mac: MAC.b });
    sw.attach(a.device, 'a');
    sw.attach(b.device, 'b');
    const h = sw.hostPort('raw');
    h.send(new Uint8Array(5));
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, new Uint8Array(1501)));
    a.send(ethernetFrame(MAC.b, '01:00:5e:00:00:01', 0x0800, 'multicast source'));
    a.send(ethernetFrame(MAC.b, MAC.c, 0x0800, 'spoofed'));
    b.send(ethernetFrame(MAC.a, MAC.b, 0x0800, 'learn b'));
    a.receive();
    b.send(ethernetFrame(MAC.b, MAC.b, 0x0800, 'to myself'));
    expect(sw.portStats('a')?.dropped).toMatchObject({ oversized: 1, 'bad-source': 1, spoofed: 1 });
    expect(sw.portStats('b')?.dropped.hairpin).toBe(1);
    expect(sw.portStats('raw')?.dropped.runt).toBe(1);
    expect(b.receive()).toEqual([]);
    expect(sw.macTable().has(MAC.c)).toBe(false);
  });

  it('a MAC flood from an unlocked port evicts only its own entries', () => {
    const sw = new VirtualSwitch({ mediator: allowAllFrames, maxMacsPerPort: 8, maxMacs: 10 });
    const a = new NetTestGuest({ mac: MAC.a });
    const b = new NetTestGuest({ mac: MAC.b });
    sw.attach(a.device, 'a');
    sw.attach(b.device, 'b');
    b.send(ethernetFrame(MAC.a, MAC.b, 0x0800, 'b is here'));
    const flood = sw.hostPort('flooder', { mac: null });
    for (let i = 0; i < 1000; i++) flood.send(ethernetFrame(MAC.a, `02:ff:00:00:${(i >> 8).toString(16).padStart(2, '0')}:${(i & 255).toString(16).padStart(2, '0')}`, 0x0800, 'x'));
    const t = sw.macTable();
    expect(t.size).toBeLessThanOrEqual(10);
    expect(t.get(MAC.b)).toBe('b');
    expect([...t.values()].filter((p) => p === 'flooder')).toHaveLength(8);
    expect(sw.stats.macEvictions).toBeGreaterThan(900);
  });

  it('a peer that never reads loses frames (congested) while the others keep talking', () => {
    const { sw, a, b, c } = lan(allowAllFrames, { bRx: 0 });
    b.send(ethernetFrame(MAC.a, MAC.b, 0x0800, 'b exists'));
    a.receive();
    for (let i = 0; i < 2000; i++) a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, `to b ${i}`));
    expect(b.device.backlog).toBe(256);
    expect(sw.portStats('b')?.dropped.congested).toBe(2000 - 256);
    a.send(ethernetFrame(MAC.c, MAC.a, 0x0800, 'to c'));
    expect(c.receive().map(text)).toEqual(['b exists', 'to c']);
  });

  it('a mediator that throws or never settles denies; the pending queue per port is bounded', async () => {
    let n = 0;
    const m: FrameMediator = {
      frame: () => {
        n++;
        if (n === 1) throw new Error('boom');
        return new Promise(() => {});
      },
    };
    const { sw, a, b } = lan(m);
    a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'first'));
    for (let i = 0; i < 200; i++) a.send(ethernetFrame(MAC.b, MAC.a, 0x0800, 'stuck'));
    expect(sw.portStats('a')?.dropped.denied).toBe(1);
    expect(sw.portStats('a')?.dropped['mediation-backlog']).toBeGreaterThan(100);
    // The other ports' frames are not behind a's stuck frame.
    b.send(ethernetFrame(MAC.a, MAC.b, 0x0800, 'b works'));
    expect(n).toBeLessThan(10);
    await flush();
  });

  it('rejects a switch without a mediator, duplicate port names, use after close', () => {
    expect(() => new VirtualSwitch({} as never)).toThrow(/mediator/);
    const sw = new VirtualSwitch({ mediator: allowAllFrames });
    sw.hostPort('x');
    expect(() => sw.hostPort('x')).toThrow(/already/);
    sw.close();
    sw.close();
    expect(() => sw.hostPort('y')).toThrow(/closed/);
  });
});
