import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { Machine } from './machine.js';
import { kvmBackend } from './backend/kvm.js';
import { asm } from './asm.js';
import { kvmAvailability } from './testing/kvm-gate.js';
import type { Device } from './device.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;

function sink(): { device: Device; text: () => string } {
  const bytes: number[] = [];
  return { device: { name: 'out', write: (_o, v) => { bytes.push(v); } }, text: () => String.fromCharCode(...bytes) };
}

const printHi = `
  mov dx, 0x3f8
  mov al, 0x48
  out dx, al
  mov al, 0x69
  out dx, al
  hlt`;

describe.skipIf(!kvm.available)(`Machine on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it.each([
    ['real', 0, 16],
    ['protected', 0, 32],
    ['protected', 3, 32],
    ['long', 0, 64],
    ['long', 3, 64],
  ] as const)('%s mode, ring %i: prints through a port and halts', async (mode, ring, bits) => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    const out = sink();
    vm.io.register({ port: 0x3f8, size: 1 }, out.device);
    // hlt at CPL3 is privileged: ring-3 guests end with a debug-style port write instead.
    const code = ring === 3 ? printHi.replace('hlt', 'mov dx, 0xf4\n out dx, al') : printHi;
    if (ring === 3) vm.io.register({ port: 0xf4, size: 1 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    vm.loadFlat(await asm(code, { bits, address: 0x1000 }), { at: 0x1000, mode, ring });
    const stop = await vm.run({ timeout: 5000 });
    expect(out.text()).toBe('Hi');
    expect(stop.reason).toBe(ring === 3 ? 'debug-exit' : 'halt');
  });

  it('machines come from spare VMs made ahead on the thread pool, and run like any other (CPUID, signal mask, irqchip)', async () => {
    const backend = kvmBackend();
    await Machine.released(); // spares of both kinds settled
    for (const irqchip of [false, true]) {
      const warm = await Machine.create({ memory: 2 * MiB, irqchip });
      await warm.close();
      await backend.dropKeptVms(); // a kept (recycled) VM would serve a plain machine before any spare
      await Machine.released();
      expect(backend.sparesReady(irqchip)).toBe(2);
      const vm = await Machine.create({ memory: 2 * MiB, irqchip });
      expect(backend.sparesReady(irqchip)).toBe(1); // this one took a spare
      // cpuid leaf 0 (set on the spare's vCPU on the thread pool) then a debug-exit of EAX's low byte.
      vm.io.register({ port: 0xf4, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
      vm.loadFlat(await asm('xor eax, eax\n cpuid\n mov al, bl\n out 0xf4, al\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
      const stop = await vm.run({ timeout: 5000 });
      // EBX of leaf 0 is the vendor's first four letters: 'Genu' / 'Auth' / 'Hygo' …: its low byte is a letter.
      expect(stop.reason).toBe('debug-exit');
      if (stop.reason === 'debug-exit') expect(String.fromCharCode(stop.code)).toMatch(/[A-Za-z]/);
      await vm.close();
    }
  });

  it('a triple fault is a shutdown stop', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    // Empty IDT, then fault: #UD → no handler → #DF → triple fault.
    vm.loadFlat(await asm('lidt [0x2000]\n ud2', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    vm.memory.fill(0x2000, 10, 0);
    expect((await vm.run({ timeout: 5000 })).reason).toBe('shutdown');
  });

  it('a ring-3 #GP goes through the host IDT and reports vector and faulting RIP', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.loadFlat(await asm('nop\n cli', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'exception', vector: 13, faultRip: 0x1001n });
  });

  it.each([
    ['out', 'mov dx, 0x500\n mov al, 1\n out dx, al', 0x1009n],
    ['in', 'mov dx, 0x500\n mov eax, 0x1234\n in al, dx', 0x100cn],
    ['mmio read', 'mov rbx, 0xd0000000\n mov eax, 0x1234\n mov eax, dword ptr [rbx]', 0x1012n],
  ] as const)("a hook's deny with effect 'gp' faults the %s itself (ring 3): #GP(0) at its RIP, no effect", async (_what, code, at) => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    let deviceSaw = 0;
    vm.io.register({ port: 0x500, size: 1 }, { name: 'dev', read: () => { deviceSaw++; return 0x77; }, write: () => { deviceSaw++; } });
    vm.mmio.register({ address: 0xd0000000n, size: 4096 }, { name: 'mmio', read: () => { deviceSaw++; return 0x77; } });
    vm.addHook({ name: 'gp', mode: 'mediate', matches: (e) => (e.kind === 'io' && e.port === 0x500) || (e.kind === 'mmio' && e.address === 0xd0000000n), handle: () => ({ verdict: 'deny', effect: 'gp' }) });
    // The host IDT's #GP stub reports the fault; the faulting RIP must be the access itself.
    vm.loadFlat(await asm(`nop\n nop\n nop\n ${code}\n spin: jmp spin`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'exception', vector: 13, errorCode: 0, faultRip: at });
    expect(deviceSaw).toBe(0);
  });

  it('after Machine.enter (loader entry), a guest fault is reported, not a triple fault', async () => {
    await using vm = await Machine.create({ memory: 4 * MiB });
    vm.memory.write(0x100000, Uint8Array.of(0x0f, 0x0b)); // ud2
    vm.enter({ mode: 'long64', rip: 0x100000n, registers: {}, identityMap: [] });
    expect(await vm.run({ timeout: 5000 })).toMatchObject({ reason: 'exception', vector: 6, faultRip: 0x100000n });
  });

  it('an unregistered port and unmapped MMIO are unhandled exits with kind, address and RIP', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.loadFlat(await asm('mov dx, 0x80\n out dx, al', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    const s1 = await vm.run({ timeout: 5000 });
    expect(s1).toMatchObject({ reason: 'unhandled-exit', kind: 'io', address: 0x80n });
    // The stop names the `out` on every flavour (PVM has already moved RIP past it; the
    // learned rule and the code bytes put it back).
    expect(s1.rip).toBe(0x1004n);
    expect(vm.vcpu(0).getRegs().rip).toBe(vm.capabilities.ioExitRip['out-dx'] === 'after' ? 0x1005n : 0x1004n);
    vm.loadFlat(await asm('mov rax, 0xd0000000\n mov dword ptr [rax], 1', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    const s2 = await vm.run({ timeout: 5000 });
    expect(s2).toMatchObject({ reason: 'unhandled-exit', kind: 'mmio', address: 0xd0000000n });
  });

  it('learns where RIP is at an I/O exit for each instruction form, as this flavour behaves', () => {
    const { ioRipProbe } = kvmBackend();
    process.stderr.write(`[tsvm] I/O-exit RIP on ${kvmBackend().capabilities.flavour}: ${JSON.stringify(ioRipProbe)}\n`);
    expect(ioRipProbe.probed).toBe(true);
    const r = ioRipProbe.behaviour;
    // `in` waits for its data from user space on every flavour.
    for (const c of ['in-imm', 'in-dx', 'ins', 'rep-ins'] as const) expect(r[c]).toBe('on');
    switch (kvmBackend().capabilities.flavour) {
      case 'pvm': // HOST-FACTS: KVM's emulator has completed a non-repeated `out` already.
        expect([r['out-imm'], r['out-dx'], r.outs, r['rep-outs']]).toEqual(['after', 'after', 'after', 'on']);
        break;
      case 'svm': // measured under nested SVM: KVM emulates a non-repeated `outs` and has completed it.
        expect([r['out-imm'], r['out-dx'], r.outs, r['rep-outs']]).toEqual(['on', 'on', 'after', 'on']);
        break;
      case 'vmx': // VMX completes `out imm`/`out dx` only on the next entry; `outs` goes through the
        // emulator as on SVM (not measured on a VMX host yet: logged above, not asserted).
        expect([r['out-imm'], r['out-dx'], r['rep-outs']]).toEqual(['on', 'on', 'on']);
        break;
      default: break;
    }
  });

  it('a spinning guest is stopped by timeout and abort, and setInterval keeps firing meanwhile', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.loadFlat(await asm('l: jmp l', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    let ticks = 0;
    const iv = setInterval(() => { ticks++; }, 5);
    const t0 = performance.now();
    const stop = await vm.run({ timeout: 300 });
    clearInterval(iv);
    expect(stop.reason).toBe('timeout');
    expect(performance.now() - t0).toBeLessThan(300 + 2 * 10 + 200);
    expect(ticks).toBeGreaterThan(10);
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 50);
    expect((await vm.run({ signal: ac.signal })).reason).toBe('aborted');
  });

  it('two machines in one process: one spinning and one crashing leave the third correct', async () => {
    await using spin = await Machine.create({ memory: 2 * MiB, name: 'spin' });
    await using crash = await Machine.create({ memory: 2 * MiB, name: 'crash' });
    await using good = await Machine.create({ memory: 2 * MiB, name: 'good' });
    spin.loadFlat(await asm('l: jmp l', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    crash.loadFlat(await asm('lidt [0x2000]\n ud2', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    const out = sink();
    good.io.register({ port: 0x3f8, size: 1 }, out.device);
    good.loadFlat(await asm(printHi, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    const [a, b, c] = await Promise.all([spin.run({ timeout: 200 }), crash.run({ timeout: 2000 }), good.run({ timeout: 2000 })]);
    expect(a.reason).toBe('timeout');
    expect(b.reason).toBe('shutdown');
    expect(c.reason).toBe('halt');
    expect(out.text()).toBe('Hi');
  });

  // TSVM_LEAK_CYCLES can lower the count on a slow host (nested QEMU TCG: ~70 ms a cycle).
  const cycles = Number(process.env.TSVM_LEAK_CYCLES ?? 1000);
  it(`${cycles} create/run/close cycles leak no fds and little memory`, async () => {
    const code = await asm('hlt', { bits: 16 });
    const fds = () => readdirSync('/proc/self/fd').length;
    const cycle = async () => {
      const vm = await Machine.create({ memory: 64 * 1024 });
      vm.loadFlat(code, { at: 0x1000 });
      expect((await vm.run({ timeout: 2000 })).reason).toBe('halt');
      await vm.close();
    };
    for (let i = 0; i < 20; i++) await cycle(); // warm up caches and JIT
    await Machine.released(); // VMs closed so far are released by the kernel in the background
    const fd0 = fds();
    const rss0 = process.memoryUsage().rss;
    for (let i = 0; i < cycles; i++) await cycle();
    await Machine.released();
    const grew = process.memoryUsage().rss - rss0;
    console.log(`[tsvm] ${cycles} cycles: fds ${fd0} -> ${fds()}, RSS ${grew >= 0 ? '+' : ''}${(grew / MiB).toFixed(1)} MiB`);
    expect(fds()).toBe(fd0);
    expect(grew).toBeLessThan(64 * MiB);
  }, 300_000);
});
