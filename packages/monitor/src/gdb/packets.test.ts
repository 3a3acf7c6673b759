import { describe, expect, it } from 'vitest';
import { MAX_PACKET, PacketReader, checksum, frame, fromHex, parseHex, type RspEvent } from './packets.js';
import { REGISTER_COUNT, TARGET_XML, decodeAll, encodeAll, leHex, parseLeHex, registerSize } from './registers.js';
import type { Regs, Sregs } from '@tsvm/core';

const bytes = (s: string) => Buffer.from(s, 'latin1');
const packets = (events: RspEvent[]) => events.filter((e) => e.kind === 'packet').map((e) => (e.kind === 'packet' ? e.payload : ''));

describe('RSP framing', () => {
  it('frames with the mod-256 byte sum and parses its own frames back', () => {
    expect(frame('OK').toString('latin1')).toBe('$OK#9a');
    expect(checksum('')).toBe(0);
    expect(frame('').toString('latin1')).toBe('$#00');
    expect(packets(new PacketReader().push(frame('qSupported:swbreak+;hwbreak+')))).toEqual(['qSupported:swbreak+;hwbreak+']);
  });

  it('escapes $ # } * (XOR 0x20 after a }) and every byte value survives a round trip, even split byte by byte', () => {
    expect(frame('a$b#c}d*').toString('latin1')).toBe(`$a}${String.fromCharCode(0x04)}b}${String.fromCharCode(0x03)}c}]d}${String.fromCharCode(0x0a)}#${frame('a$b#c}d*').toString('latin1').slice(-2)}`);
    const all = Array.from({ length: 256 }, (_, i) => String.fromCharCode(i)).join('');
    const framed = frame(`X1000,100:${all}`);
    const r = new PacketReader();
    const got: RspEvent[] = [];
    for (const b of framed) got.push(...r.push(Uint8Array.of(b)));
    expect(packets(got)).toEqual([`X1000,100:${all}`]);
    // A 0x03 inside a packet is data, not an interrupt.
    expect(got.some((e) => e.kind === 'interrupt')).toBe(false);
  });

  it('reports a wrong or non-hex checksum, acks, interrupts; ignores noise between packets; a $ restarts a cut packet', () => {
    const r = new PacketReader();
    expect(r.push(bytes('$g#00'))).toEqual([{ kind: 'bad-checksum' }]);
    expect(r.push(bytes('$g#zz'))).toEqual([{ kind: 'bad-checksum' }]);
    expect(r.push(bytes('+-\x03junk\r\n'))).toEqual([{ kind: 'ack', ok: true }, { kind: 'ack', ok: false }, { kind: 'interrupt' }]);
    expect(packets(r.push(bytes('$m10')))).toEqual([]);
    expect(packets(r.push(frame('?')))).toEqual(['?']);
  });

  it('an over-long packet is dropped and reported, its bytes not kept; the next packet parses', () => {
    const r = new PacketReader();
    const huge = `$${'A'.repeat(MAX_PACKET * 4)}#00`;
    expect(r.push(bytes(huge))).toEqual([{ kind: 'overflow' }]);
    expect(packets(r.push(frame('g')))).toEqual(['g']);
    expect(packets(new PacketReader().push(frame('A'.repeat(MAX_PACKET))))).toHaveLength(1);
  });

  it('hex helpers refuse what is not hex', () => {
    expect(fromHex('0a0B')).toEqual(Uint8Array.of(10, 11));
    expect(fromHex('abc')).toBeUndefined();
    expect(fromHex('zz')).toBeUndefined();
    expect(parseHex('ffffffffffffffff')).toBe(0xffff_ffff_ffff_ffffn);
    expect(parseHex('1ffffffffffffffff')).toBeUndefined();
    expect(parseHex('')).toBeUndefined();
    expect(parseHex('-1')).toBeUndefined();
  });
});

describe('amd64 registers in gdb order', () => {
  const regs: Regs = { rax: 1n, rbx: 2n, rcx: 3n, rdx: 4n, rsi: 5n, rdi: 6n, rsp: 7n, rbp: 8n, r8: 9n, r9: 10n, r10: 11n, r11: 12n, r12: 13n, r13: 14n, r14: 15n, r15: 16n, rip: 0x1005n, rflags: 0x246n };
  const seg = (selector: number) => ({ base: 0n, limit: 0, selector, type: 0, present: 1, dpl: 3, db: 0, s: 1, l: 1, g: 0, avl: 0, unusable: 0 });
  const sregs = { cs: seg(0x33), ss: seg(0x2b), ds: seg(0x2b), es: seg(0x2b), fs: seg(0), gs: seg(0) } as unknown as Sregs;

  it('g: rax rbx rcx rdx rsi rdi rbp rsp r8..r15 rip (8 bytes), eflags and selectors (4), x87 unavailable', () => {
    const g = encodeAll(regs, sregs);
    const at = (n: number) => { let o = 0; for (let i = 0; i < n; i++) o += (registerSize(i) ?? 0) * 2; return g.slice(o, o + (registerSize(n) ?? 0) * 2); };
    expect(parseLeHex(at(6), 8)).toBe(8n); // rbp is 6th in gdb's order, 7th in kvm_regs
    expect(parseLeHex(at(7), 8)).toBe(7n);
    expect(parseLeHex(at(16), 8)).toBe(0x1005n);
    expect(parseLeHex(at(17), 4)).toBe(0x246n);
    expect(parseLeHex(at(18), 4)).toBe(0x33n);
    expect(at(24)).toBe('x'.repeat(20));
    expect(g.length).toBe(2 * (17 * 8 + 7 * 4 + 8 * 10 + 8 * 4));
    expect(TARGET_XML.match(/<reg /g)).toHaveLength(REGISTER_COUNT);
    expect(TARGET_XML).toMatch(/i386:x86-64/);
  });

  it('G decodes the general registers and eflags, ignores selectors and x87, refuses malformed or long payloads', () => {
    const writes = decodeAll(encodeAll(regs, sregs));
    expect(writes?.find((w) => w.name === 'rbp')?.value).toBe(8n);
    expect(writes?.find((w) => w.name === 'rip')?.value).toBe(0x1005n);
    expect(writes).toHaveLength(18);
    expect(decodeAll(`${encodeAll(regs, sregs)}00`)).toBeUndefined();
    expect(decodeAll('zz'.repeat(8))).toBeUndefined();
    expect(decodeAll(leHex(42n, 8))).toEqual([{ name: 'rax', value: 42n }]);
  });
});
