// Dirty rings behind BackendVm.dirtyLog: the same bitmap as the kernel's log, a full ring is
// emptied inside run() without the guest or the run loop noticing, and a fork whose pooled VM
// tracks with rings resets exactly like one that uses the log.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { asm } from '../asm.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import { kvmBackend, pagesOf } from '../backend/kvm.js';
import type { Device, DeviceMapping } from '../device.js';
import { cheaperDirtyTracking, measureDirtyTracking } from './dirty-tracking.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
const rings = kvm.available && kvmBackend().capabilities.dirtyLogRing;
const exitDev: Device = { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) };
const devices: DeviceMapping[] = [{ range: { port: 0xf4, size: 1 }, device: exitDev }];

// Ring 3 (native: a page's first store faults once and is logged once): 1000 pages from 0x100000,
// then a pause; each round writes them again. With a 256-entry ring that is ~5 ring-full exits a round.
const wide = `
  top:
  mov ecx, 1000
  mov rbx, 0x100000
  loop1:
  mov [rbx], ecx
  add rbx, 0x1000
  dec ecx
  jnz loop1
  mov al, 1
  mov dx, 0xf4
  out dx, al
  jmp top`;

// Ring 0 (every store emulated on PVM, and each emulated store is a ring entry): 3000 stores
// over 8 pages, then a pause.
const storm = `
  top:
  mov ecx, 3000
  loop1:
  mov eax, ecx
  and eax, 7
  shl eax, 12
  add rax, 0x300000
  mov [rax], ecx
  dec ecx
  jnz loop1
  mov al, 1
  mov dx, 0xf4
  out dx, al
  jmp top`;

const smallRing = () => {
  const kb = kvmBackend();
  return { name: kb.name, capabilities: kb.capabilities, createVm: (o: Parameters<typeof kb.createVm>[0]) => kb.createVm({ ...o, dirtyRing: 4096 }) };
};

describe.skipIf(!kvm.available || !rings)(`dirty rings on KVM${!kvm.available ? ` (SKIPPED: ${kvm.reason})` : !rings ? ' (SKIPPED: this host has no KVM_CAP_DIRTY_LOG_RING_ACQ_REL)' : ''}`, () => {
  it('measureDirtyTracking prices both on this host', () => {
    const p = measureDirtyTracking(kvmBackend(), 5);
    process.stderr.write(`[tsvm] dirtyLog with 4 pages written, 16 MiB slot: bitmap ${(p.logNs / 1000).toFixed(1)} µs, ring ${((p.ringNs ?? NaN) / 1000).toFixed(1)} µs\n`);
    expect(p.logNs).toBeGreaterThan(0);
    expect(p.logNs).toBeLessThan(Infinity);
    expect(p.ringNs).toBeGreaterThan(0);
  });

  it('a full ring (256 entries, a ring-3 guest writing 1000 pages) is emptied inside run(); dirtyLog names exactly the pages written', async () => {
    await using m = await Machine.create({ memory: [{ start: 0, size: 8 * MiB, logDirty: true }], backend: smallRing(), name: 'ring' });
    m.attachDevice(devices);
    m.loadFlat(await asm(wide, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    for (let round = 0; round < 3; round++) {
      expect(await m.run({ timeout: 20_000 })).toMatchObject({ reason: 'debug-exit', code: 1 });
      const pages = pagesOf(m.dirtyPages(0));
      const want = Array.from({ length: 1000 }, (_, k) => 0x100 + k);
      // The first round also sets accessed/dirty bits in the host-built tables; later ones write only the 1000.
      if (round === 0) expect(pages).toEqual(expect.arrayContaining(want));
      else expect(pages).toEqual(want);
    }
  });

  it('a ring that overflows (ring-0 bursts the host emulates without stopping) is detected: every page reported dirty, rings no longer chosen', async () => {
    await using m = await Machine.create({ memory: [{ start: 0, size: 4 * MiB, logDirty: true }], backend: smallRing(), name: 'storm' });
    m.attachDevice(devices);
    m.loadFlat(await asm(storm, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 0 });
    const stop = await m.run({ timeout: 20_000 });
    const pages = pagesOf(m.dirtyPages(0));
    if (stop.reason === 'debug-exit') {
      // This host stops a vCPU before its ring wraps: exactly the 8 pages (plus table A/D bits).
      expect(pages.filter((p) => p >= 0x300)).toEqual([0x300, 0x301, 0x302, 0x303, 0x304, 0x305, 0x306, 0x307]);
    } else {
      // It does not (PVM): the ring wrapped; the machine stops visibly with the ring-full exit
      // instead of losing pages, every page counts as dirty, and rings are not chosen again.
      expect(stop).toMatchObject({ reason: 'unhandled-exit', exit: { kind: 'unsupported', reason: 31 } });
      expect(pages).toHaveLength(1024);
      expect(kvmBackend().ringOverflowSeen).toBe(true);
      expect(cheaperDirtyTracking(kvmBackend())).toBe('log');
      process.stderr.write('[tsvm] dirty ring: this host let a ring-0 burst wrap a 256-entry ring (rings are not chosen after this)\n');
    }
  });

  it('a fork from a ring-tracking pool resets exactly like a fork using the log', async () => {
    const vm = await Machine.create({ memory: 4 * MiB, name: 'tmpl' });
    vm.attachDevice(devices);
    vm.loadFlat(await asm(`
      top:
      mov al, 1
      mov dx, 0xf4
      out dx, al
      inc r9
      mov rbx, 0x200000
      mov [rbx], r9
      mov [rbx + 0x1000], r9
      mov [rbx + 0x5000], r9
      mov al, 2
      mov dx, 0xf4
      out dx, al
      jmp top`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    await vm.run({ timeout: 5000 });
    using snap = await vm.snapshot();
    await vm.close();
    const hash = (m: Machine) => createHash('sha256').update(m.memory.read(0, m.memory.totalSize)).digest('hex');
    const round = async (m: Machine) => {
      expect(await m.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
      return { regs: m.vcpu(0).getRegs(), hash: hash(m) };
    };
    await using byLog = await Machine.fork(snap, { devices });
    const want = await round(byLog);
    const logPages = byLog.reset().pagesCopied;
    snap.prewarm(1, kvmBackend(), { dirtyTracking: 'ring' });
    expect(snap.dirtyTracking).toBe('ring');
    await using byRing = await Machine.fork(snap, { devices });
    snap.prewarm(0);
    for (let i = 0; i < 3; i++) {
      expect(await round(byRing)).toEqual(want);
      expect(byRing.reset().pagesCopied).toBe(logPages);
    }
    expect(logPages).toBeGreaterThanOrEqual(3);
  });

  it('a ring-tracking fork\'s reset leaves the pages it named writable (named again each reset, no ioctl) up to a bound, and memory always equals the snapshot', async () => {
    // Round k (k from port 0xf5): one store to 0x200000 and one to 0x300000 + k pages.
    let k = 0;
    const input: DeviceMapping = { range: { port: 0xf5, size: 1 }, device: { name: 'k', read: () => k } };
    const vm = await Machine.create({ memory: 8 * MiB, name: 'tmpl' });
    vm.attachDevice([...devices, input]);
    vm.loadFlat(await asm(`
      top:
      mov al, 1
      mov dx, 0xf4
      out dx, al
      xor eax, eax
      mov dx, 0xf5
      in al, dx
      lea r9, [rax + 1]
      shl rax, 12
      add rax, 0x300000
      mov [rax], r9
      mov rbx, 0x200000
      mov [rbx], r9
      mov al, 2
      mov dx, 0xf4
      out dx, al
      jmp top`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 1 });
    using snap = await vm.snapshot();
    await vm.close();
    const hash = (m: Machine) => createHash('sha256').update(m.memory.read(0, m.memory.totalSize)).digest('hex');
    snap.prewarm(1, kvmBackend(), { dirtyTracking: 'ring' });
    expect(snap.dirtyTracking).toBe('ring');
    await using m = await Machine.fork(snap, { devices: [...devices, input] });
    snap.prewarm(0);
    const image = snap.image().bytes; // one region at 0: image offset = guest address
    const want = hash(m);
    const copied: number[] = [];
    for (k = 0; k < 24; k++) {
      expect(await m.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
      expect(m.memory.readUint(0x300000 + k * 4096, 4)).toBe(k + 1);
      const r = m.reset();
      expect(r.cpu).toBe('cpl3');
      copied.push(r.pagesCopied);
      // Every page the guest wrote, this round or before, holds the snapshot's bytes again.
      for (const at of [0x200000, ...Array.from({ length: k + 1 }, (_, j) => 0x300000 + j * 4096)]) {
        expect(Buffer.from(m.memory.read(at, 4096)).equals(Buffer.from(image.subarray(at, at + 4096)))).toBe(true);
      }
    }
    // Pages named by one reset are named by the next ones too (they stayed writable, so the
    // guest's later stores leave no ring entry): the count grows by the one new page a round…
    expect(copied[1]).toBe((copied[0] as number) + 1);
    expect(copied[2]).toBe((copied[0] as number) + 2);
    // …until the bound, when the rings are reset and only new pages are named again.
    expect(Math.max(...copied)).toBeLessThanOrEqual(18);
    expect(copied.some((c, i) => i > 0 && c < (copied[i - 1] as number))).toBe(true);
    // And the machine as a whole runs on as a fresh fork does (compared after a run: until its
    // first exit the reset's entry stub stands in one host page).
    await using fresh = await Machine.fork(snap, { devices: [...devices, input] });
    expect(hash(fresh)).toBe(want);
    for (const x of [m, fresh]) expect(await x.run({ timeout: 5000 })).toMatchObject({ reason: 'debug-exit', code: 2 });
    expect(hash(m)).toBe(hash(fresh));
    expect(m.vcpu(0).getRegs()).toEqual(fresh.vcpu(0).getRegs());
  });
});
