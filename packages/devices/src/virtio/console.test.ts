import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { MmioReg } from './constants.js';
import { VirtioConsole } from './console.js';
import { attach } from './devices.fixture.js';

const enc = (s: string) => new TextEncoder().encode(s);

function setup(init = true) {
  const out: Uint8Array[] = [];
  const env = attach(new VirtioConsole({ sink: (b) => out.push(b), output: { autoFlush: false } }), init);
  return { ...env, out, text: () => Buffer.concat(out).toString() };
}

describe('VirtioConsole', () => {
  it('is device 3 with receiveq and transmitq', () => {
    const { drv } = setup(false);
    expect(drv.read32(MmioReg.DeviceId)).toBe(3);
    drv.init();
    expect(drv.queues.length).toBe(2);
  });

  it('transmits guest output to the sink, batched per line', () => {
    const { drv, out, text, device } = setup();
    const tx = drv.queue(1);
    tx.addChain([{ data: enc('hel') }, { data: enc('lo\nwo') }]);
    tx.addChain([{ data: enc('rld') }]);
    tx.kick();
    expect(tx.takeUsed().map((u) => u.len)).toEqual([0, 0]);
    expect(out.length).toBe(1);
    device.flush();
    expect(text()).toBe('hello\nworld');
  });

  it('delivers input into posted receive buffers, holding the rest', () => {
    const { drv, device, memory } = setup();
    const rx = drv.queue(0);
    const { addrs } = rx.addChain([{ writable: 4 }]);
    rx.kick();
    expect(device.receive('abcdef')).toBe(6);
    expect(rx.takeUsed()).toEqual([{ id: 0, len: 4 }]);
    expect(new TextDecoder().decode(memory.read(addrs[0] as bigint, 4))).toBe('abcd');
    expect(device.pendingInput).toBe(2);
    const second = rx.addChain([{ writable: 8 }]);
    rx.kick();
    expect(rx.takeUsed()).toEqual([{ id: second.head, len: 2 }]);
    expect(device.pendingInput).toBe(0);
  });

  it('input before DRIVER_OK waits and is delivered on activation', () => {
    const { drv, device } = setup(false);
    device.receive('early');
    drv.init({ skipDriverOk: true });
    const rx = drv.queue(0);
    rx.addChain([{ writable: 16 }]);
    drv.write32(MmioReg.Status, drv.status() | 4);
    expect(rx.takeUsed()).toEqual([{ id: 0, len: 5 }]);
  });

  it('attachInput and emergency write', async () => {
    const { drv, device, transport, text } = setup();
    const rx = drv.queue(0);
    rx.addChain([{ writable: 16 }]);
    const input = new PassThrough();
    const detach = device.attachInput(input);
    input.write('ls\n');
    await new Promise((r) => setImmediate(r));
    expect(rx.takeUsed()).toEqual([{ id: 0, len: 3 }]);
    detach();
    transport.write(0x108, 0x21, 4);
    device.flush();
    expect(text()).toBe('!');
  });

  it('snapshot keeps undelivered input', () => {
    const a = setup(false);
    a.device.receive('xyz');
    const b = setup(false);
    b.device.restore(JSON.parse(JSON.stringify(a.device.snapshot())));
    expect(b.device.pendingInput).toBe(3);
  });
});
