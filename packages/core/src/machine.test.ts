import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { MockBackend, inExit, mmioExit, outExit } from './testing/mock.js';
import { GuestMemoryError, InvalidArgumentError, StateError, TsvmError } from './errors.js';
import type { ExitHook } from './hooks.js';
import { EXCEPTION_PORT, SEL } from './cpu/x86.js';
import { RIP_ON_INSTRUCTION } from './cpu/io-rip.js';

const MiB = 1024 * 1024;

async function mockMachine(...steps: Parameters<MockBackend['script']>) {
  const backend = new MockBackend();
  const vcpu = backend.script(...steps);
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  return { vm, vcpu, backend };
}

describe('Machine.create validates its options before touching the backend', () => {
  it.each([
    [{ memory: 0 }, /memory: must be a positive integer/],
    [{ memory: 5000 }, /multiple of 4096/],
    [{ memory: -4096 }, /positive integer/],
    [{ memory: 2 ** 40 }, /exceeds the limit/],
    [{ memory: [] }, /non-empty array/],
    [{ memory: [{ start: 0, size: 8192 }, { start: 4096, size: 8192 }] }, /overlaps/],
    [{ memory: [{ start: 1, size: 8192 }] }, /not 4 KiB aligned/],
  ])('%j is rejected', async (opts, msg) => {
    const backend = new MockBackend();
    const p = Machine.create({ ...(opts as { memory: number }), backend });
    await expect(p).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(p).rejects.toThrow(msg);
  });
});

describe('exit path through Machine.run (mock backend)', () => {
  it('delivers out writes to the device at that port and stops on hlt', async () => {
    const { vm } = await mockMachine(outExit(0x3f8, 0x48), outExit(0x3f8, 0x69), { kind: 'hlt' });
    const out: number[] = [];
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: (_o, v) => { out.push(v); } });
    const stop = await vm.run();
    expect(stop.reason).toBe('halt');
    expect(String.fromCharCode(...out)).toBe('Hi');
    expect(stop.exits).toBe(3);
    expect(vm.stats().byKind.io.count).toBe(2);
    expect(vm.stats().byPort.get(0x3f8)).toBe(2);
    await vm.close();
  });

  it('completes in reads with the device value, little-endian and sized', async () => {
    const { vm, vcpu } = await mockMachine(inExit(0x60, 2), { kind: 'hlt' });
    vm.io.register({ port: 0x60, size: 2 }, { name: 'dev', read: (o, s) => (o === 0 && s === 2 ? 0xbeef : 0) });
    await vm.run();
    expect(Array.from(vcpu.reads[0] ?? [])).toEqual([0xef, 0xbe]);
    await vm.close();
  });

  it('denies an unregistered port by default and names kind, address and RIP', async () => {
    const { vm, vcpu } = await mockMachine(outExit(0x80, 1));
    vcpu.regs.rip = 0x1234n;
    const stop = await vm.run();
    expect(stop.reason).toBe('unhandled-exit');
    if (stop.reason !== 'unhandled-exit') throw new Error('unreachable');
    expect(stop.kind).toBe('io');
    expect(stop.address).toBe(0x80n);
    expect(stop.rip).toBe(0x1234n);
    expect(stop.message).toMatch(/out port 0x80/);
    await vm.close();
  });

  it('denies MMIO with no device and splits 8-byte accesses into two 4-byte ones', async () => {
    const { vm, vcpu } = await mockMachine(mmioExit(0xd000_0000n, 8), mmioExit(0xe000_0000n, 4, 1));
    const seen: Array<[number, number]> = [];
    vm.mmio.register({ address: 0xd000_0000n, size: 0x1000 }, { name: 'regs', read: (o, s) => { seen.push([o, s]); return o === 0 ? 0x11223344 : 0x55667788; } });
    const stop = await vm.run();
    expect(seen).toEqual([[0, 4], [4, 4]]);
    expect(Array.from(vcpu.reads[0] ?? [])).toEqual([0x44, 0x33, 0x22, 0x11, 0x88, 0x77, 0x66, 0x55]);
    expect(stop.reason).toBe('unhandled-exit');
    if (stop.reason === 'unhandled-exit') expect(stop.address).toBe(0xe000_0000n);
    await vm.close();
  });

  it('finds an MMIO device by address exactly, next to another and at the top of the space; an exit above 2^53 (no double holds it) is denied with its address intact', async () => {
    const top = (1n << 52n) - 0x2000n;
    const beyond = (1n << 60n) + 1n;
    const { vm } = await mockMachine(mmioExit(top + 0x10n, 4, 7), mmioExit(top + 0x1001n, 1, 9), mmioExit(0xd000_0ff8n, 2, 3), mmioExit(beyond, 1, 1));
    const seen: string[] = [];
    vm.mmio.register({ address: top, size: 0x1000 }, { name: 'a', write: (o, v, sz) => { seen.push(`a ${o} ${v} ${sz}`); } });
    vm.mmio.register({ address: top + 0x1000n, size: 0x1000 }, { name: 'b', write: (o, v, sz) => { seen.push(`b ${o} ${v} ${sz}`); } });
    vm.mmio.register({ address: 0xd000_0000n, size: 0x1000 }, { name: 'c', write: (o, v, sz) => { seen.push(`c ${o} ${v} ${sz}`); } });
    const stop = await vm.run();
    expect(seen).toEqual(['a 16 7 4', 'b 1 9 1', 'c 4088 3 2']);
    expect(stop).toMatchObject({ reason: 'unhandled-exit', address: beyond });
    await vm.close();
  });

  it('a device can stop the machine (debug-exit) and a throwing device stops it with the error', async () => {
    const { vm } = await mockMachine(outExit(0xf4, 3));
    vm.io.register({ port: 0xf4, size: 1 }, { name: 'dbg', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: (v << 1) | 1 }) });
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 7 });
    await vm.close();
    const m2 = await mockMachine(outExit(0x10, 1));
    m2.vm.io.register({ port: 0x10, size: 1 }, { name: 'bad', write: () => { throw new Error('boom'); } });
    const s2 = await m2.vm.run();
    expect(s2.reason).toBe('device-error');
    if (s2.reason === 'device-error') expect((s2.error as Error).message).toBe('boom');
    await m2.vm.close();
  });

  it('shutdown, internal errors and entry failures are stops, not throws', async () => {
    for (const [exit, reason] of [[{ kind: 'shutdown' }, 'shutdown'], [{ kind: 'internal-error', suberror: 1, data: [] }, 'internal-error'], [{ kind: 'fail-entry', reason: 7n, cpu: 0 }, 'fail-entry']] as const) {
      const { vm } = await mockMachine(exit);
      expect((await vm.run()).reason).toBe(reason);
      await vm.close();
    }
  });

  it('yields to the event loop between slices and stops a spinning guest on timeout and abort', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script();
    vcpu.whenEmpty = { kind: 'intr' };
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    let ticks = 0;
    const iv = setInterval(() => { ticks++; }, 1);
    const stop = await vm.run({ timeout: 50 });
    clearInterval(iv);
    expect(stop.reason).toBe('timeout');
    expect(ticks).toBeGreaterThan(3);
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 20);
    expect((await vm.run({ signal: ac.signal })).reason).toBe('aborted');
    await vm.close();
  });

  it('with an irqchip, a vCPU halted with IF=0 stops as halt at the next slice boundary', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script({ kind: 'intr' });
    vcpu.halted = true;
    const vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true });
    expect((await vm.run({ timeout: 1000 })).reason).toBe('halt');
    await vm.close();
  });

  it('a timeout says whether the vCPU was halted waiting for an interrupt or running', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script();
    vcpu.whenEmpty = { kind: 'intr' }; // every slice ends without an exit: the guest never stops
    vcpu.halted = true;
    vcpu.regs = { ...vcpu.regs, rflags: 0x202n }; // IF=1: halted but wakeable
    const vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true });
    expect(await vm.run({ timeout: 30 })).toMatchObject({ reason: 'timeout', halted: true });
    vcpu.halted = false;
    expect(await vm.run({ timeout: 30 })).toMatchObject({ reason: 'timeout', halted: false });
    await vm.close();
    const plain = await mockMachine();
    plain.vcpu.whenEmpty = { kind: 'intr' };
    expect(await plain.vm.run({ timeout: 30 })).toMatchObject({ reason: 'timeout', halted: false });
    await plain.vm.close();
  });

  it('rejects misuse: run twice at once, use after close', async () => {
    const backend = new MockBackend();
    backend.script().whenEmpty = { kind: 'intr' };
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    const ac = new AbortController();
    const p = vm.run({ signal: ac.signal });
    await expect(vm.run()).rejects.toBeInstanceOf(StateError);
    await expect(vm.close()).rejects.toBeInstanceOf(StateError);
    ac.abort();
    await p;
    await vm.close();
    await vm.close();
    await expect(vm.run()).rejects.toBeInstanceOf(StateError);
    expect(backend.vms[0]?.closed).toBe(true);
    expect(backend.vms[0]?.openMemory).toBe(0);
  });
});

describe('hooks on the exit path', () => {
  const hook = (h: Partial<ExitHook> & Pick<ExitHook, 'handle'>): ExitHook => ({ name: 'h', mode: 'mediate', matches: (e) => e.kind === 'io', ...h });

  it('a mediate deny stops with a violation and the device never sees the access', async () => {
    const { vm } = await mockMachine(outExit(0x3f8, 1));
    let deviceSaw = 0;
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'uart', write: () => { deviceSaw++; } });
    vm.addHook(hook({ name: 'no-uart', handle: () => ({ verdict: 'deny', reason: 'policy' }) }));
    const stop = await vm.run();
    expect(stop.reason).toBe('violation');
    if (stop.reason === 'violation') expect(stop.violation.message).toMatch(/denied by hook 'no-uart': policy/);
    expect(deviceSaw).toBe(0);
    await vm.close();
  });

  it("deny with effect 'gp' faults the accessing instruction (I/O and MMIO) and the guest runs on", async () => {
    const { vm, vcpu } = await mockMachine(outExit(0x3f8, 1), mmioExit(0xd0000000n, 4), { kind: 'hlt' });
    let deviceSaw = 0;
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'uart', write: () => { deviceSaw++; } });
    vm.mmio.register({ address: 0xd0000000n, size: 4096 }, { name: 'dev', read: () => { deviceSaw++; return 0; } });
    vm.addHook(hook({ name: 'gp', matches: (e) => e.kind === 'io' || e.kind === 'mmio', handle: () => ({ verdict: 'deny', effect: 'gp' }) }));
    const stop = await vm.run();
    expect(stop.reason).toBe('halt');
    expect(vcpu.faults).toEqual([{ vector: 13, errorCode: 0, rip: 0xfff0n }, { vector: 13, errorCode: 0, rip: 0xfff0n }]);
    expect(vcpu.reads).toEqual([]);
    expect(deviceSaw).toBe(0);
    await vm.close();
  });

  it("on a host that completes `out` before exiting (PVM), deny 'gp', the violation and the stop all name the `out`, not RIP", async () => {
    const after = { ...RIP_ON_INSTRUCTION, 'out-imm': 'after', 'out-dx': 'after', outs: 'after' } as const;
    const backend = new MockBackend({ ioExitRip: after });
    // Real mode at 0:0x1000: mov al, 0x41 (b0 41) ; out dx, al (ee) ; out 0x80, al (e6 80).
    // The byte before `ee` is 0x41, which looks like a REX prefix: the shortest match wins.
    const script = backend.script(
      (v) => { v.regs = { ...v.regs, rip: 0x1003n, rdx: 0x3f8n }; return outExit(0x3f8, 0x41); },
      (v) => { v.regs = { ...v.regs, rip: 0x1005n }; return outExit(0x80, 0x41); },
    );
    script.sregs.cs.base = 0n;
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.memory.write(0x1000, Uint8Array.of(0xb0, 0x41, 0xee, 0xe6, 0x80, 0xf4));
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'uart', write: () => {} });
    vm.addHook(hook({ name: 'gp', matches: (e) => e.kind === 'io' && e.port === 0x3f8, handle: () => ({ verdict: 'deny', effect: 'gp' }) }));
    vm.addHook(hook({ name: 'stop', matches: (e) => e.kind === 'io' && e.port === 0x80, handle: () => ({ verdict: 'deny' }) }));
    const stop = await vm.run();
    expect(script.faults).toEqual([{ vector: 13, errorCode: 0, rip: 0x1002n }]);
    expect(stop).toMatchObject({ reason: 'violation', rip: 0x1003n });
    if (stop.reason === 'violation') expect(stop.violation.rip).toBe(0x1003n);
    await vm.close();
  });

  it('emulate supplies the read value; ignore reads all ones; observe hooks see the exit after the device', async () => {
    const { vm, vcpu } = await mockMachine(inExit(0x70), inExit(0x71), { kind: 'hlt' });
    const order: string[] = [];
    vm.io.register({ port: 0x70, size: 2 }, { name: 'rtc', read: () => { order.push('device'); return 5; } });
    vm.addHook(hook({ matches: (e) => e.kind === 'io' && e.port === 0x70, handle: () => ({ verdict: 'emulate', value: 0x42 }) }));
    vm.addHook(hook({ matches: (e) => e.kind === 'io' && e.port === 0x71, handle: () => ({ verdict: 'deny', effect: 'ignore' }) }));
    vm.addHook(hook({ name: 'obs', mode: 'observe', handle: () => { order.push('observe'); } }));
    await vm.run();
    expect(Array.from(vcpu.reads[0] ?? [])).toEqual([0x42]);
    expect(Array.from(vcpu.reads[1] ?? [])).toEqual([0xff]);
    expect(order).toEqual(['observe', 'observe']);
    expect([...vm.hookStats().values()].reduce((n, s) => n + s.calls, 0)).toBe(4);
    await vm.close();
  });

  it('a throwing hook stops the machine with the error as cause; a never-settling hook is bounded by the timeout', async () => {
    const { vm } = await mockMachine(outExit(1, 1));
    vm.addHook(hook({ name: 'thrower', handle: () => { throw new RangeError('bad hook'); } }));
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'hook-error', hook: 'thrower' });
    await vm.close();
    const m2 = await mockMachine(outExit(1, 1));
    m2.vm.addHook(hook({ handle: () => new Promise(() => {}) }));
    expect((await m2.vm.run({ timeout: 30 })).reason).toBe('timeout');
    await m2.vm.close();
  });

  it('an async allow continues with the device', async () => {
    const { vm } = await mockMachine(outExit(0x3f8, 9), { kind: 'hlt' });
    const got: number[] = [];
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'u', write: (_o, v) => { got.push(v); } });
    vm.addHook(hook({ handle: async () => ({ verdict: 'allow' }) }));
    expect((await vm.run()).reason).toBe('halt');
    expect(got).toEqual([9]);
    await vm.close();
  });

  it('sealing freezes hooks and buses', async () => {
    const { vm } = await mockMachine();
    vm.sealHooks();
    expect(() => vm.addHook(hook({ handle: () => undefined }))).toThrow(StateError);
    expect(() => vm.io.register({ port: 1, size: 1 }, { name: 'x' })).toThrow(/sealed/);
    await vm.close();
  });
});

describe('loadFlat and CPU set-up', () => {
  it('long mode at ring 3: user selectors, paging, EFER.LMA, tables in the system area', async () => {
    const { vm, vcpu } = await mockMachine();
    vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000, mode: 'long', ring: 3 });
    const s = vcpu.sregs;
    expect(s.cs.selector).toBe(SEL.USER_CODE64);
    expect(s.cs.dpl).toBe(3);
    expect(s.cs.l).toBe(1);
    expect(s.ss.selector).toBe(SEL.USER_DATA);
    expect(s.efer & 0x500n).toBe(0x500n);
    expect(s.cr0 & 0x80000001n).toBe(0x80000001n);
    const sys = vm.layout.systemArea as number;
    expect(sys).toBe(2 * MiB - 0x10000);
    expect(s.cr3).toBe(BigInt(sys));
    expect(vcpu.regs.rip).toBe(0x1000n);
    expect(vcpu.regs.rsp).toBe(BigInt(sys));
    // PML4[0] -> PDPT, user+rw+present+accessed; PD maps 2 MiB pages identity (accessed and
    // dirty preset), but for the one holding the system area: 4 KiB pages, the system area's
    // supervisor-only, the stubs and the probe trampoline page user read-only.
    expect(vm.memory.readU64(sys) & 0xfffn).toBe(0x27n);
    expect(vm.memory.readU64(sys + 0x2000 + 8)).toBe(0x200000n | 0xe7n);
    expect(vm.memory.readU64(sys + 0x2000)).toBe(BigInt(sys + 0xd000) | 0x27n);
    const pte = (a: number) => vm.memory.readU64(sys + 0xd000 + (a >> 12) * 8);
    expect(pte(sys - 0x1000)).toBe(BigInt(sys - 0x1000) | 0x67n); // the default stack's page
    expect(pte(sys)).toBe(BigInt(sys) | 0x63n); // PML4: no user bit
    expect(pte(sys + 0x9000)).toBe(BigInt(sys + 0x9000) | 0x63n); // IDT
    expect(pte(sys + 0xc000)).toBe(BigInt(sys + 0xc000) | 0x65n); // probe trampoline: user, read-only
    expect(pte(sys + 0xa000)).toBe(BigInt(sys + 0xa000) | 0x65n); // the stubs too
    // `syscall` lands in the host's stub until someone sets a handler.
    const [lstar, cstar] = vcpu.getMsrs([0xc000_0082, 0xc000_0083]);
    expect(lstar?.data).toBe(BigInt(sys + 0xa200));
    expect(cstar?.data).toBe(BigInt(sys + 0xa200));
    // The LDT is an empty table in the system area.
    expect(s.ldt.base).toBe(BigInt(sys + 0x6080));
    expect(s.ldt.limit).toBe(7);
    // TSS I/O bitmap allows every port and ends with 0xff.
    expect(vm.memory.readUint(sys + 0x6100 + 102, 2)).toBe(104);
    expect(vm.memory.readUint(sys + 0x6100 + 104 + 8192, 1)).toBe(0xff);
    expect(vm.memory.readUint(0x1000, 1)).toBe(0xf4);
    await vm.close();
  });

  it('real mode: CS:IP reaches the entry; ring 3 is refused', async () => {
    const { vm, vcpu } = await mockMachine();
    vm.loadFlat(Uint8Array.of(0xf4), { at: 0x7c00 });
    expect(vcpu.sregs.cs.base + vcpu.regs.rip).toBe(0x7c00n);
    expect(vcpu.sregs.cr0 & 1n).toBe(0n);
    expect(() => vm.loadFlat(Uint8Array.of(0xf4), { at: 0x7c00, mode: 'real', ring: 3 })).toThrow(InvalidArgumentError);
    await vm.close();
  });

  it('rejects code outside RAM, over the system area, or below nothing', async () => {
    const { vm } = await mockMachine();
    expect(() => vm.loadFlat(new Uint8Array(16), { at: 2 * MiB - 8, mode: 'long' })).toThrow(/not inside guest RAM|system area/);
    expect(() => vm.loadFlat(new Uint8Array(16), { at: 4 * MiB })).toThrow(/not inside guest RAM/);
    expect(() => vm.loadFlat(new Uint8Array(16), { at: 2 * MiB - 0x8000, mode: 'protected' })).toThrow(/system area/);
    expect(() => vm.loadFlat(new Uint8Array(0), { at: 0 })).toThrow(InvalidArgumentError);
    expect(() => vm.loadFlat(new Uint8Array(4), { at: -1 })).toThrow(InvalidArgumentError);
    await vm.close();
  });

  it('an exception reported by the host IDT stub becomes an exception stop with vector, error code and faulting RIP', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script();
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000, mode: 'long', ring: 3 });
    const sp = 0x1f0000 - 0x100;
    vm.memory.writeU64(sp, 0x18n); // error code
    vm.memory.writeU64(sp + 8, 0x1234n); // faulting RIP
    vcpu.script((v) => { v.regs.rsp = BigInt(sp); return outExit(EXCEPTION_PORT, 13); });
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'exception', vector: 13, errorCode: 0x18, faultRip: 0x1234n });
    await vm.close();
  });
});

describe('GuestMemory bounds', () => {
  it('rejects wild, overflowing and straddling accesses with GuestMemoryError', async () => {
    const backend = new MockBackend();
    backend.script();
    const vm = await Machine.create({ memory: [{ start: 0, size: 8192 }, { start: 16384, size: 4096 }], backend });
    const m = vm.memory;
    expect(() => m.read(8190, 4)).toThrow(GuestMemoryError);
    expect(() => m.read(9000, 1)).toThrow(/not backed/);
    expect(() => m.read(2n ** 64n - 1n, 2)).toThrow(GuestMemoryError);
    expect(() => m.read(-1, 1)).toThrow(GuestMemoryError);
    expect(() => m.read(0, -1)).toThrow(GuestMemoryError);
    expect(() => m.write(16384 + 4095, Uint8Array.of(1, 2))).toThrow(/runs past/);
    m.writeUint(16384, 4, 0xdeadbeef);
    expect(m.readUint(16384, 4)).toBe(0xdeadbeef);
    expect(m.contains(0, 8192)).toBe(true);
    expect(m.contains(0, 8193)).toBe(false);
    try { m.read(9000, 1); } catch (e) { expect(e).toBeInstanceOf(TsvmError); expect((e as GuestMemoryError).address).toBe(9000n); }
    await vm.close();
  });
});

describe('region flags, coalescing and slice events', () => {
  it('setRegionFlags re-creates the slot read-only without copying; coalesce is refused after sealing', async () => {
    const backend = new MockBackend();
    backend.script();
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.memory.writeUint(0x100, 4, 0xcafe);
    const r = vm.setRegionFlags(0, { readonly: true });
    expect(r.readonly).toBe(true);
    expect(backend.vms[0]?.slots.get(0)?.readonly).toBe(true);
    expect(vm.memory.readUint(0x100, 4)).toBe(0xcafe);
    expect(() => vm.setRegionFlags(9, { readonly: true })).toThrow(InvalidArgumentError);
    const undo = vm.coalesce({ port: 0x3f8, size: 8 });
    expect(vm.coalescedRanges()).toEqual([{ port: 0x3f8, size: 8 }]);
    undo();
    vm.sealHooks();
    expect(() => vm.coalesce({ port: 0x3f8, size: 8 })).toThrow(StateError);
    await vm.close();
  });

  it("emits 'slice' at each slice boundary and carries the RIP in a hook's violation", async () => {
    const backend = new MockBackend();
    const vcpu = backend.script({ kind: 'intr' }, { kind: 'intr' }, outExit(0x99, 1));
    vcpu.regs.rip = 0x4242n;
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    let slices = 0;
    vm.events.on('slice', () => { slices++; });
    vm.addHook({ name: 'deny', mode: 'mediate', matches: () => true, handle: () => ({ verdict: 'deny' }) });
    const stop = await vm.run();
    expect(slices).toBe(3);
    expect(stop.reason).toBe('violation');
    if (stop.reason === 'violation') expect(stop.violation.rip).toBe(0x4242n);
    await vm.close();
  });
});

describe('attaching devices', () => {
  it('one path and one range shape: attach() and attachDevice() share it, all or nothing, typed errors', async () => {
    const { vm } = await mockMachine({ kind: 'hlt' });
    const a = { name: 'a', write: () => {} }, b = { name: 'b', read: () => 0 };
    vm.attach({ port: 0x300, size: 4 }, a);
    // The second mapping overlaps the first device: neither of the new ones stays.
    expect(() => vm.attachDevice([{ range: { address: 0xd000_0000n, size: 0x1000 }, device: b }, { range: { port: 0x302, size: 1 }, device: b }])).toThrow(/overlaps 'a'/);
    expect(vm.mmio.find(0xd000_0000n)).toBeUndefined();
    expect(() => vm.attachDevice(null as never)).toThrow(InvalidArgumentError);
    expect(() => vm.attachDevice([{ device: b } as never])).toThrow(/mappings\[0\]\.range/);
    const detach = vm.attachDevice({ mappings: () => [{ range: { address: 0xd000_0000n, size: 0x1000 }, device: b }] });
    expect(vm.mmio.find(0xd000_0010n)?.device).toBe(b);
    detach();
    expect(vm.mmio.find(0xd000_0010n)).toBeUndefined();
    await vm.close();
  });
});

describe('order of set-up', () => {
  it('sealing before loadFlat is no trap: the exception reporter is tsvm\'s own reserved port', async () => {
    const { vm } = await mockMachine({ kind: 'hlt' });
    vm.sealHooks();
    expect(() => vm.loadFlat(Uint8Array.of(0xf4), { at: 0x1000, mode: 'long' })).not.toThrow();
    expect(vm.io.find(0xee0n)?.device.name).toBe('tsvm-exception-reporter');
    expect(() => vm.io.register({ port: 0x80, size: 1 }, { name: 'late' })).toThrow(/sealed/);
    await vm.close();
  });
});

describe('a mock guest that never stops', () => {
  it('is preempted like a real one: run({ timeout }) ends and the event loop keeps turning', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script();
    vcpu.whenEmpty = outExit(0x3f8, 0x41);
    await using vm = await Machine.create({ memory: 2 * MiB, backend });
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'sink', write: () => {} });
    let ticks = 0;
    const iv = setInterval(() => { ticks++; }, 5);
    const stop = await vm.run({ timeout: 100 });
    clearInterval(iv);
    expect(stop.reason).toBe('timeout');
    expect(stop.exits).toBeGreaterThan(1000);
    expect(ticks).toBeGreaterThanOrEqual(1);
  });
});
