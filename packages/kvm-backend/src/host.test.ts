import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { KvmSystem } from './system.js';
import { KvmUnavailableError, TsvmError } from './errors.js';
import { MemfdMapping, spareRangeCount } from './memfd.js';
import { armSlice, consumeSliceSignal, disarmSlice, runSignalMask, sliceSignal } from './timer.js';

const fdCount = (): number => readdirSync('/proc/self/fd').length;

describe('host plumbing that needs no KVM', () => {
  it('maps a memfd shared, writes through it, and releases the fd on close', () => {
    const before = fdCount();
    const m = MemfdMapping.create(64 * 1024);
    expect(m.fd).toBeGreaterThan(2);
    expect(m.hostAddress).toBeGreaterThan(0n);
    m.bytes[100] = 0xab;
    expect(m.bytes[100]).toBe(0xab);
    m.close();
    m.close();
    expect(m.bytes.length).toBe(0);
    expect(fdCount()).toBe(before);
  });

  it('a private mapping of the same memfd is copy-on-write', async () => {
    const { libc } = await import('./raw/libc.js');
    const shared = MemfdMapping.create(8192);
    shared.bytes[0] = 1;
    const dupFd = libc().open(`/proc/self/fd/${shared.fd}`, 2);
    const priv = MemfdMapping.map(dupFd, 8192, false);
    expect(priv.bytes[0]).toBe(1);
    priv.bytes[0] = 2;
    expect(shared.bytes[0]).toBe(1);
    priv.close();
    shared.close();
  });

  it('a closed mapping\'s range is reused by the next of its size, with the new contents and the same view', async () => {
    const { libc } = await import('./raw/libc.js');
    const size = 3 * 65536; // a size no other test here uses
    const a = MemfdMapping.create(size);
    const view = a.bytes;
    a.bytes.fill(0x5a);
    const at = a.hostAddress;
    const before = spareRangeCount();
    a.close();
    expect(spareRangeCount()).toBe(before + 1);
    expect(a.bytes.length).toBe(0); // the closed object hands out nothing
    const b = MemfdMapping.create(size); // a fresh memfd in the same range: zeros, not a's bytes
    expect(b.hostAddress).toBe(at);
    expect(b.bytes).toBe(view);
    expect(b.bytes.every((x) => x === 0)).toBe(true);
    expect(spareRangeCount()).toBe(before);
    b.bytes[7] = 9;
    // A private (copy-on-write) mapping into a kept range reads the file, not what was there before.
    const dupFd = libc().open(`/proc/self/fd/${b.fd}`, 2);
    const c = MemfdMapping.create(size);
    c.bytes.fill(1);
    c.close();
    const p = MemfdMapping.mapPrivate(dupFd, 0, size);
    expect(p.bytes[7]).toBe(9);
    expect(p.bytes[8]).toBe(0);
    p.bytes[7] = 10;
    expect(b.bytes[7]).toBe(9);
    p.close();
    libc().close(dupFd);
    b.close();
  });

  it('remapPrivate puts the file back under a used private mapping: same address and view, private copies gone', async () => {
    const { libc } = await import('./raw/libc.js');
    const file = MemfdMapping.create(8192);
    file.bytes[5] = 42;
    const fd = libc().open(`/proc/self/fd/${file.fd}`, 2);
    const a = MemfdMapping.mapPrivate(fd, 0, 8192);
    a.bytes[5] = 7;
    a.bytes[4100] = 9;
    const view = a.bytes;
    const b = a.remapPrivate(fd, 0);
    expect(a.bytes.length).toBe(0);
    expect(b.hostAddress).toBe(a.hostAddress);
    expect(b.bytes).toBe(view);
    expect(b.bytes[5]).toBe(42);
    expect(b.bytes[4100]).toBe(0);
    expect(() => a.remapPrivate(fd, 0)).toThrow();
    b.close();
    libc().close(fd);
    file.close();
  });

  it('dataExtents names where a memfd holds data (and nothing for a private mapping)', async () => {
    const m = MemfdMapping.create(64 * 4096);
    expect(m.dataExtents()).toEqual([]);
    m.bytes[3 * 4096 + 5] = 1; // page 3
    m.bytes[10 * 4096] = 2; m.bytes[11 * 4096] = 3; // pages 10-11
    const got = m.dataExtents();
    expect(got).toBeDefined();
    // Page-granular data, in order, covering exactly what was written (the kernel may merge more
    // only where pages exist: none do elsewhere).
    expect(got).toEqual([[3 * 4096, 4 * 4096], [10 * 4096, 12 * 4096]]);
    const { libc } = await import('./raw/libc.js');
    const fd = libc().open(`/proc/self/fd/${m.fd}`, 2);
    const p = MemfdMapping.mapPrivate(fd, 0, 64 * 4096);
    expect(p.dataExtents()).toBeUndefined();
    p.close();
    libc().close(fd);
    m.close();
  });

  it('keeps a bounded number of closed ranges', () => {
    const ms = Array.from({ length: 20 }, () => MemfdMapping.create(5 * 65536));
    for (const m of ms) m.close();
    expect(spareRangeCount()).toBeLessThanOrEqual(8);
  });

  it('the slice timer fires at this thread and the pending signal is consumed without a handler', () => {
    armSlice(1_000_000); // 1 ms
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    expect(consumeSliceSignal()).toBe(true);
    expect(consumeSliceSignal()).toBe(false);
    armSlice(50_000_000);
    disarmSlice();
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 60);
    expect(consumeSliceSignal()).toBe(false);
  });

  it('the KVM_RUN signal mask unblocks only the slice signal', () => {
    const mask = runSignalMask();
    expect(mask.length).toBe(8);
    const bit = sliceSignal() - 1;
    expect(((mask[bit >> 3] as number) >> (bit & 7)) & 1).toBe(0);
  });

  it('opening a missing KVM device fails with KvmUnavailableError and a reason', () => {
    let err: unknown;
    try {
      KvmSystem.open('/dev/tsvm-no-such-kvm');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KvmUnavailableError);
    expect(err).toBeInstanceOf(TsvmError);
    expect((err as KvmUnavailableError).reason).toMatch(/cannot open \/dev\/tsvm-no-such-kvm: ENOENT/);
    expect((err as KvmUnavailableError).code).toBe('TSVM_KVM_UNAVAILABLE');
  });
});
