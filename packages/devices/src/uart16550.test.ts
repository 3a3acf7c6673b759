import { PassThrough } from 'node:stream';
import { SnapshotFormatError } from '@tsvm/core';
import { describe, expect, it } from 'vitest';
import { RecordingIrq } from './testing/fakes.js';
import { Uart16550 } from './uart16550.js';

const THR = 0, IER = 1, IIR = 2, FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7;

function setup(options: { backlogLimit?: number } = {}) {
  const irq = new RecordingIrq(4);
  const out: Uint8Array[] = [];
  const uart = new Uart16550({ irq, sink: (b) => out.push(b), output: { autoFlush: false }, ...options });
  const text = () => Buffer.concat(out).toString('latin1');
  const rd = (o: number) => uart.read(o, 1);
  const wr = (o: number, v: number) => uart.write(o, v, 1, undefined as never);
  return { uart, irq, out, text, rd, wr };
}

describe('Uart16550', () => {
  it('exposes COM1 defaults and an 8-port mapping', () => {
    const u = new Uart16550();
    expect(Uart16550.defaultPort).toBe(0x3f8);
    expect(Uart16550.defaultIrq).toBe(4);
    expect(u.mappings()).toEqual([{ range: { port: 0x3f8, size: 8 }, device: u }]);
  });

  it('batches output: one sink call per line, not per byte', () => {
    const { out, text, wr } = setup();
    for (const c of 'hello\nwor') wr(THR, c.charCodeAt(0));
    expect(out.length).toBe(1);
    expect(text()).toBe('hello\n');
  });

  it('flush() delivers a partial line and is safe to call repeatedly', () => {
    const { uart, out, text, wr } = setup();
    wr(THR, 0x41);
    uart.flush();
    uart.flush();
    expect(out.length).toBe(1);
    expect(text()).toBe('A');
  });

  it('flushes automatically on the next event-loop turn', async () => {
    const out: Uint8Array[] = [];
    const uart = new Uart16550({ sink: (b) => out.push(b) });
    uart.write(THR, 0x3e, 1, undefined as never);
    expect(out.length).toBe(0);
    await new Promise((r) => setImmediate(r));
    expect(Buffer.concat(out).toString()).toBe('>');
  });

  it('pipe() writes to a stream and can be undone', () => {
    const { uart, wr } = setup();
    const chunks: Buffer[] = [];
    const stop = uart.pipe({ write: (c: Uint8Array) => chunks.push(Buffer.from(c)) });
    wr(THR, 0x61); wr(THR, 0x0a);
    stop();
    wr(THR, 0x62); wr(THR, 0x0a);
    expect(Buffer.concat(chunks).toString()).toBe('a\n');
  });

  it('LSR reports THRE|TEMT when idle and DR when data arrived', () => {
    const { uart, rd } = setup();
    expect(rd(LSR)).toBe(0x60);
    uart.receive('x');
    expect(rd(LSR)).toBe(0x61);
    expect(rd(THR)).toBe(0x78);
    expect(rd(LSR)).toBe(0x60);
  });

  it('divisor latch is behind DLAB', () => {
    const { rd, wr } = setup();
    wr(LCR, 0x83);
    wr(0, 0x01); wr(1, 0x02);
    expect(rd(0)).toBe(0x01);
    expect(rd(1)).toBe(0x02);
    wr(LCR, 0x03);
    expect(rd(IER)).toBe(0);
    expect(rd(LCR)).toBe(0x03);
  });

  it('scratch register round-trips', () => {
    const { rd, wr } = setup();
    wr(SCR, 0x5a);
    expect(rd(SCR)).toBe(0x5a);
  });

  it('THR-empty interrupt: raised on enable and after each write, cleared by reading IIR', () => {
    const { irq, rd, wr } = setup();
    expect(rd(IIR)).toBe(0x01);
    wr(IER, 0x02);
    expect(irq.level).toBe(true);
    expect(rd(IIR)).toBe(0x02);
    expect(irq.level).toBe(false);
    expect(rd(IIR)).toBe(0x01);
    wr(THR, 0x41);
    expect(irq.level).toBe(true);
    wr(IER, 0);
    expect(irq.level).toBe(false);
  });

  it('RX data interrupt has priority over THR-empty and follows the FIFO', () => {
    const { uart, irq, rd, wr } = setup();
    wr(FCR, 0x01);
    wr(IER, 0x03);
    uart.receive('ab');
    expect(rd(IIR)).toBe(0xc4); // FIFO bits + RDA
    expect(rd(THR)).toBe(0x61);
    expect(rd(IIR)).toBe(0xc4);
    expect(rd(THR)).toBe(0x62);
    expect(rd(IIR)).toBe(0xc2); // now THR empty is reported (and acknowledged)
    expect(rd(IIR)).toBe(0xc1);
    expect(irq.level).toBe(false);
  });

  it('16-byte FIFO with a host backlog behind it', () => {
    const { uart, rd, wr } = setup();
    wr(FCR, 0x01);
    expect(uart.receive('0123456789abcdefXYZ')).toBe(19);
    let s = '';
    while (rd(LSR) & 1) s += String.fromCharCode(rd(THR));
    expect(s).toBe('0123456789abcdefXYZ');
  });

  it('without FIFO the receiver holds one byte; FCR clear empties the FIFO', () => {
    const { uart, rd, wr } = setup();
    uart.receive('ab');
    expect(rd(THR)).toBe(0x61);
    wr(FCR, 0x01);
    uart.receive('cd');
    wr(FCR, 0x03);
    expect(rd(LSR) & 1).toBe(0);
  });

  it('overrun: dropped bytes set OE (cleared on read) and raise the line-status interrupt', () => {
    const { uart, irq, rd, wr } = setup({ backlogLimit: 0 });
    wr(FCR, 0x01);
    wr(IER, 0x04);
    expect(uart.receive(new Uint8Array(17))).toBe(16);
    expect(irq.level).toBe(true);
    expect(rd(IIR) & 0x0f).toBe(0x06);
    expect(rd(LSR) & 0x02).toBe(0x02);
    expect(rd(LSR) & 0x02).toBe(0);
    expect(irq.level).toBe(false);
  });

  it('loopback: THR goes to RBR, MSR mirrors MCR (Linux autoconfig probe)', () => {
    const { out, rd, wr, uart } = setup();
    wr(MCR, 0x10);
    expect(rd(MSR) & 0xf0).toBe(0);
    wr(MCR, 0x1f);
    expect(rd(MSR) & 0xf0).toBe(0xf0);
    wr(THR, 0x55);
    expect(rd(THR)).toBe(0x55);
    uart.flush();
    expect(out.length).toBe(0);
    wr(MCR, 0);
    expect(rd(MSR)).toBe(0xb0);
  });

  it('attachInput feeds a stream and detaches', async () => {
    const { uart, rd } = setup();
    const input = new PassThrough();
    const detach = uart.attachInput(input);
    input.write('hi');
    await new Promise((r) => setImmediate(r));
    expect(String.fromCharCode(rd(THR), rd(THR))).toBe('hi');
    detach();
    input.write('x');
    await new Promise((r) => setImmediate(r));
    expect(rd(LSR) & 1).toBe(0);
  });

  it('snapshot/restore round-trips registers and FIFO', () => {
    const a = setup();
    a.wr(FCR, 0x01); a.wr(IER, 0x01); a.wr(SCR, 9); a.wr(LCR, 0x03);
    a.uart.receive('abc');
    const snap = JSON.parse(JSON.stringify(a.uart.snapshot())) as unknown;
    const b = setup();
    b.uart.restore(snap);
    expect(b.irq.level).toBe(true);
    expect(b.rd(SCR)).toBe(9);
    expect(String.fromCharCode(b.rd(THR), b.rd(THR), b.rd(THR))).toBe('abc');
  });

  it('restore rejects bad shapes with SnapshotFormatError', () => {
    const { uart } = setup();
    const good = uart.snapshot();
    expect(() => uart.restore(null)).toThrow(SnapshotFormatError);
    expect(() => uart.restore({ ...good, version: 2 })).toThrow(SnapshotFormatError);
    expect(() => uart.restore({ ...good, ier: 300 })).toThrow(SnapshotFormatError);
    expect(() => uart.restore({ ...good, rx: 'not base64!' })).toThrow(SnapshotFormatError);
    expect(() => uart.restore({ ...good, rx: Buffer.alloc(17).toString('base64') })).toThrow(SnapshotFormatError);
  });

  it('reset returns to power-on state', () => {
    const { uart, rd, wr, irq } = setup();
    wr(IER, 0x02); wr(SCR, 3);
    uart.reset();
    expect(rd(IER)).toBe(0);
    expect(rd(SCR)).toBe(0);
    expect(irq.level).toBe(false);
  });
});

describe('output at the stop', () => {
  it("everything the guest printed before the stop is delivered when run() returns (no newline needed)", async () => {
    const { Machine } = await import('@tsvm/core');
    const { MockBackend, outExit } = await import('@tsvm/core/testing');
    const backend = new MockBackend();
    backend.script(outExit(0x3f8, 0x6f), outExit(0x3f8, 0x6b), { kind: 'hlt' });
    await using vm = await Machine.create({ memory: 64 * 1024, backend });
    let out = '';
    const uart = new Uart16550({ sink: (b) => { out += Buffer.from(b).toString('latin1'); } });
    vm.attachDevice(uart);
    const stop = await vm.run();
    expect(stop.reason).toBe('halt');
    expect(out).toBe('ok'); // synchronously, before any later turn of the event loop
  });
});
