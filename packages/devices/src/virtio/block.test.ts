import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { InvalidArgumentError, SnapshotFormatError } from '@tsvm/core';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockFeature, BlockStatus, VirtioBlock } from './block.js';
import { MmioReg } from './constants.js';
import { attach } from './devices.fixture.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tsvm-blk-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function header(type: number, sector: bigint | number): Uint8Array {
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type, true);
  dv.setBigUint64(8, BigInt(sector), true);
  return h;
}

function disk(bytes: number): Uint8Array {
  const d = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) d[i] = (i * 7 + (i >> 9)) & 0xff;
  return d;
}

function setup(opts: { size?: number; readonly?: boolean; serial?: string } = {}) {
  const image = disk(opts.size ?? 8 * 512);
  const env = attach(new VirtioBlock({ buffer: image, readonly: opts.readonly ?? false, serial: opts.serial ?? 'tsvm-disk-0' }));
  const q = env.drv.queue(0);
  // Submit one request; return its status byte, used len and the data buffer address.
  const submit = (type: number, sector: bigint | number, data: { out?: Uint8Array; inLen?: number }) => {
    const bufs = [{ data: header(type, sector) }, ...(data.out ? [{ data: data.out }] : []), ...(data.inLen ? [{ writable: data.inLen }] : []), { writable: 1 }];
    const { addrs } = q.addChain(bufs);
    q.kick();
    const used = q.takeUsed();
    const statusAddr = addrs[addrs.length - 1] as bigint;
    return { status: env.memory.readUint(statusAddr, 1), len: used[0]?.len, dataAddr: addrs[1] as bigint };
  };
  return { ...env, image, q, submit };
}

describe('VirtioBlock', () => {
  it('is device 2 with capacity, blk_size and seg_max in config space', () => {
    const { drv, transport } = setup({ size: 8 * 512 });
    expect(drv.read32(MmioReg.DeviceId)).toBe(2);
    expect(transport.read(0x100, 4)).toBe(8);
    expect(transport.read(0x104, 4)).toBe(0);
    expect(transport.read(0x10c, 4)).toBe(254);
    expect(transport.read(0x114, 4)).toBe(512);
    expect(drv.deviceFeatures() & BlockFeature.Flush).toBe(BlockFeature.Flush);
    expect(drv.deviceFeatures() & BlockFeature.Ro).toBe(0n);
  });

  it('reads sectors', () => {
    const { submit, image, memory } = setup();
    const r = submit(0, 2, { inLen: 1024 });
    expect(r.status).toBe(BlockStatus.Ok);
    expect(r.len).toBe(1025);
    expect(memory.read(r.dataAddr, 1024)).toEqual(image.subarray(1024, 2048));
  });

  it('writes sectors', () => {
    const { submit, image } = setup();
    const data = new Uint8Array(512).fill(0x5a);
    const r = submit(1, 7, { out: data });
    expect(r.status).toBe(BlockStatus.Ok);
    expect(r.len).toBe(1);
    expect(image.subarray(7 * 512)).toEqual(data);
  });

  it('out-of-range sectors → S_IOERR', () => {
    const { submit } = setup();
    expect(submit(0, 8, { inLen: 512 }).status).toBe(BlockStatus.IoErr);
    expect(submit(0, 7, { inLen: 1024 }).status).toBe(BlockStatus.IoErr);
    expect(submit(1, (1n << 64n) - 1n, { out: new Uint8Array(512) }).status).toBe(BlockStatus.IoErr);
    expect(submit(0, 8, { inLen: 0 }).status).toBe(BlockStatus.Ok); // zero-length at the end is in range
  });

  it('data not a multiple of 512 or in the wrong direction → S_IOERR', () => {
    const { submit } = setup();
    expect(submit(0, 0, { inLen: 100 }).status).toBe(BlockStatus.IoErr);
    expect(submit(0, 0, { out: new Uint8Array(512) }).status).toBe(BlockStatus.IoErr);
    expect(submit(1, 0, { inLen: 512 }).status).toBe(BlockStatus.IoErr);
  });

  it('read-only: offers VIRTIO_BLK_F_RO and fails writes with S_IOERR', () => {
    const { submit, drv, image } = setup({ readonly: true });
    expect(drv.deviceFeatures() & BlockFeature.Ro).toBe(BlockFeature.Ro);
    const before = image.slice();
    expect(submit(1, 0, { out: new Uint8Array(512) }).status).toBe(BlockStatus.IoErr);
    expect(image).toEqual(before);
    expect(submit(0, 0, { inLen: 512 }).status).toBe(BlockStatus.Ok);
  });

  it('GET_ID returns the 20-byte serial', () => {
    const { submit, memory } = setup({ serial: 'abc' });
    const r = submit(8, 0, { inLen: 20 });
    expect(r.status).toBe(BlockStatus.Ok);
    expect(r.len).toBe(21);
    expect(memory.read(r.dataAddr, 20)).toEqual(new Uint8Array([97, 98, 99, ...new Array(17).fill(0)]));
  });

  it('flush succeeds; unknown types → S_UNSUPP', () => {
    const { submit } = setup();
    expect(submit(4, 0, {}).status).toBe(BlockStatus.Ok);
    expect(submit(11, 0, {}).status).toBe(BlockStatus.Unsupp);
    expect(submit(0x7fffffff, 0, { inLen: 512 }).status).toBe(BlockStatus.Unsupp);
  });

  it('a request without header or status byte → DEVICE_NEEDS_RESET', () => {
    const { q, drv } = setup();
    q.addChain([{ data: new Uint8Array(8) }, { writable: 1 }]);
    q.kick();
    expect(drv.needsReset()).toBe(true);
    const b = setup();
    b.q.addChain([{ data: header(0, 0) }]);
    b.q.kick();
    expect(b.drv.needsReset()).toBe(true);
  });

  it('capacity rounds down; the unaligned tail is not addressable', () => {
    const { transport, submit } = setup({ size: 3 * 512 + 100 });
    expect(transport.read(0x100, 4)).toBe(3);
    expect(submit(0, 2, { inLen: 512 }).status).toBe(BlockStatus.Ok);
    expect(submit(0, 3, { inLen: 512 }).status).toBe(BlockStatus.IoErr);
  });

  it('file backing: reads, writes, flushes (fsync), read-only open', () => {
    const file = path.join(tmp, 'disk.img');
    fs.writeFileSync(file, disk(4 * 512));
    const dev = new VirtioBlock({ path: file, serial: 'f' });
    const { drv, memory } = attach(dev);
    const q = drv.queue(0);
    const w = q.addChain([{ data: header(1, 1) }, { data: new Uint8Array(512).fill(9) }, { writable: 1 }]);
    q.addChain([{ data: header(4, 0) }, { writable: 1 }]);
    const r = q.addChain([{ data: header(0, 1) }, { writable: 512 }, { writable: 1 }]);
    q.kick();
    expect(q.takeUsed().length).toBe(3);
    expect(memory.readUint(w.addrs[2] as bigint, 1)).toBe(0);
    expect(memory.read(r.addrs[1] as bigint, 512)).toEqual(new Uint8Array(512).fill(9));
    dev.close();
    dev.close();
    expect(fs.readFileSync(file).subarray(512, 1024)).toEqual(Buffer.alloc(512, 9));

    const ro = new VirtioBlock({ path: file, readonly: true });
    const env = attach(ro);
    const q2 = env.drv.queue(0);
    const w2 = q2.addChain([{ data: header(1, 0) }, { data: new Uint8Array(512) }, { writable: 1 }]);
    q2.kick();
    expect(env.memory.readUint(w2.addrs[2] as bigint, 1)).toBe(BlockStatus.IoErr);
    ro.close();
  });

  it('host I/O errors fail the request, not the device', () => {
    const file = path.join(tmp, 'closed.img');
    fs.writeFileSync(file, disk(512));
    const dev = new VirtioBlock({ path: file });
    const { drv, memory } = attach(dev);
    dev.close();
    const q = drv.queue(0);
    const r = q.addChain([{ data: header(0, 0) }, { writable: 512 }, { writable: 1 }]);
    q.kick();
    expect(memory.readUint(r.addrs[2] as bigint, 1)).toBe(BlockStatus.IoErr);
    expect(drv.needsReset()).toBe(false);
  });

  it('validates options and snapshots', () => {
    expect(() => new VirtioBlock({ buffer: new Uint8Array(512), serial: 'x'.repeat(21) })).toThrow(InvalidArgumentError);
    expect(() => new VirtioBlock({ buffer: new Uint8Array(512), queueSize: 100 })).toThrow(InvalidArgumentError);
    const a = new VirtioBlock({ buffer: new Uint8Array(1024) });
    const b = new VirtioBlock({ buffer: new Uint8Array(2048) });
    a.restore(a.snapshot());
    expect(() => b.restore(a.snapshot())).toThrow(SnapshotFormatError);
  });
});
