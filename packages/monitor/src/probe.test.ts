import { describe, expect, it } from 'vitest';
import { Machine, type VcpuExit } from '@tsvm/core';
import { MockBackend, asm, mmioExit, outExit, type MockStep, type MockVcpu } from '@tsvm/core/testing';
import { MechanismUnavailableError } from './errors.js';
import { Monitor } from './monitor.js';
import { assumedTable } from './calibration/table.js';
import { PROBE_PORT } from './probe.js';
import { decodeBytes } from './decode.js';
import { allow, deny } from './decisions.js';

const MiB = 1024 * 1024;
const pvm = assumedTable({ kernel: 't', cpu: 't', flavour: 'pvm' });
const AT = 0x1000;

/** The guest "executes" the trap at `addr`: RIP after the 2-byte out, as KVM reports it. */
/** The guest "executes" the trap at `addr`: KVM leaves RIP at the `out` until the next KVM_RUN completes it. */
const trapAt = (addr: bigint) => (v: MockVcpu): VcpuExit => { v.regs.rip = addr; return outExit(PROBE_PORT, 0); };

/**
 * Where the guest resumes: the monitor must not write the trap's RIP back (KVM would then skip the
 * restored instruction), so it resumes through a trampoline slot holding `jmp rel32` to it.
 */
function resumesAt(vm: Machine, rip: bigint): bigint {
  const b = vm.memory.read(rip, 5);
  if (b[0] !== 0xe9) return rip;
  return rip + 5n + BigInt(new DataView(b.buffer, b.byteOffset).getInt32(1, true));
}

async function guest(source: string, ...steps: MockStep[]) {
  const backend = new MockBackend();
  const vcpu = backend.script(...steps);
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  const code = await asm(source, { bits: 64, address: AT });
  vm.loadFlat(code, { at: AT, mode: 'long', ring: 3 });
  return { vm, vcpu, code };
}

const bytes = (vm: Machine, a: number, n = 2) => Array.from(vm.memory.read(a, n));

describe('exec hooks on PVM at CPL3 use the VMM-side probe (no single-step; the two-exit path with outOfLine: false)', () => {
  it('patches, restores, rewinds RIP, arms the successor, and re-arms the target', async () => {
    // 0x1000: mov eax, 1 (5 bytes)   0x1005: add eax, 2 (3)   0x1008: nop
    const { vm, vcpu, code } = await guest('mov eax, 1\n add eax, 2\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm, outOfLine: false });
    const hits: bigint[] = [];
    const h = mon.observe({ event: 'exec', address: 0x1005 }, (ev) => { if (ev.event === 'exec') hits.push(ev.rip); });
    expect(h.mechanism).toBe('probe-breakpoint');
    expect(mon.plan()[0]?.why).toMatch(/probe/);
    expect(bytes(vm, 0x1005)).toEqual([0xe6, PROBE_PORT]);
    vcpu.script(
      (v) => {
        const out = trapAt(0x1005n)(v);
        return out;
      },
      (v) => {
        // After the first trap: original bytes back, RIP rewound, successor armed at 0x1008.
        expect(resumesAt(vm, v.regs.rip)).toBe(0x1005n);
        expect(v.regs.rip).not.toBe(0x1005n);
        expect(bytes(vm, 0x1005, 3)).toEqual(Array.from(code.subarray(5, 8)));
        expect(bytes(vm, 0x1008)).toEqual([0xe6, PROBE_PORT]);
        return trapAt(0x1008n)(v);
      },
      (v) => {
        expect(resumesAt(vm, v.regs.rip)).toBe(0x1008n);
        expect(bytes(vm, 0x1008, 2)).toEqual(Array.from(code.subarray(8, 10)));
        expect(bytes(vm, 0x1005)).toEqual([0xe6, PROBE_PORT]);
        return { kind: 'hlt' };
      },
    );
    const stop = await vm.run();
    expect(stop.reason).toBe('halt');
    expect(hits).toEqual([0x1005n]);
    h.remove();
    expect(bytes(vm, 0x1005, 3)).toEqual(Array.from(code.subarray(5, 8)));
  });

  it('a conditional branch arms both successors; the taken one disarms the other', async () => {
    // 0x1000: test eax, eax (2)  0x1002: jz +4 → 0x1008 (2)  0x1004: mov ecx, 1 (5) ...  0x1009
    const { vm, code } = await guest('test eax, eax\n jz t\n mov ecx, 1\n t: nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm, outOfLine: false });
    mon.observe({ event: 'exec', address: 0x1002 }, () => {});
    const tgt = 0x1002 + 2 + (code[0x3] ?? 0);
    vm.vcpu(0); // script after registration
    const v = (vm.backend as MockBackend).vms[0]?.vcpus[0] as MockVcpu;
    v.script(trapAt(0x1002n), (c) => {
      expect(bytes(vm, 0x1004)).toEqual([0xe6, PROBE_PORT]);
      expect(bytes(vm, tgt)).toEqual([0xe6, PROBE_PORT]);
      return trapAt(BigInt(tgt))(c);
    }, () => {
      expect(bytes(vm, 0x1004, 2)).toEqual(Array.from(code.subarray(4, 6)));
      expect(bytes(vm, 0x1002)).toEqual([0xe6, PROBE_PORT]);
      return { kind: 'hlt' };
    });
    expect((await vm.run()).reason).toBe('halt');
  });

  it('ret: the successor is read from the stack at the trap', async () => {
    const { vm, vcpu } = await guest('ret\n nop\n nop\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'exec', address: 0x1000 }, () => {});
    vcpu.regs.rsp = 0x8000n;
    vm.memory.writeU64(0x8000, 0x1003n);
    vcpu.script(trapAt(0x1000n), (c) => {
      expect(bytes(vm, 0x1003)).toEqual([0xe6, PROBE_PORT]);
      return { kind: 'hlt' };
    });
    expect((await vm.run()).reason).toBe('halt');
  });

  it('a mediate exec hook that denies stops the machine with a violation naming the instruction', async () => {
    const { vm, vcpu } = await guest('mov eax, 1\n add eax, 2\n hlt');
    const mon = new Monitor(vm, { calibration: pvm, outOfLine: false });
    let n = 0;
    mon.mediate({ event: 'exec', address: 0x1005 }, () => (++n > 1 ? deny({ reason: 'second execution' }) : allow()));
    vcpu.script(trapAt(0x1005n), trapAt(0x1008n), trapAt(0x1005n));
    const stop = await vm.run();
    expect(stop.reason).toBe('violation');
    if (stop.reason === 'violation') expect(stop.violation.message).toMatch(/second execution.*0x1005: add eax,2/);
  });

  it('an out to the probe port at an address with no probe is denied by default', async () => {
    const { vm, vcpu } = await guest('nop\n nop\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'exec', address: 0x1000 }, () => {});
    vcpu.script(trapAt(0x2000n));
    const stop = await vm.run();
    expect(stop).toMatchObject({ reason: 'unhandled-exit', kind: 'io' });
    if (stop.reason === 'unhandled-exit') expect(stop.message).toMatch(/deny by default/);
  });

  it('where guest debug works (VMX-like table) exec uses int3 and step uses single-step', async () => {
    const hw = assumedTable({ kernel: 't', cpu: 't', flavour: 'vmx' });
    const { vm, vcpu } = await guest('mov eax, 1\n add eax, 2\n hlt');
    const mon = new Monitor(vm, { calibration: hw });
    const hits: bigint[] = [];
    expect(mon.observe({ event: 'exec', address: 0x1005 }, (ev) => { if (ev.event === 'exec') hits.push(ev.address); }).mechanism).toBe('sw-breakpoint');
    expect(bytes(vm, 0x1005, 1)).toEqual([0xcc]);
    const steps: bigint[] = [];
    mon.observe({ event: 'step' }, (ev) => { if (ev.event === 'step') steps.push(ev.rip); });
    vcpu.script(
      (c) => { c.regs.rip = 0x1005n; return { kind: 'debug', exception: 3, pc: 0x1005n, dr6: 0n, dr7: 0n }; },
      (c) => { expect(bytes(vm, 0x1005, 1)).toEqual([0x83]); c.regs.rip = 0x1008n; return { kind: 'debug', exception: 1, pc: 0x1008n, dr6: 1n << 14n, dr7: 0n }; },
    );
    expect((await vm.run()).reason).toBe('halt');
    expect(hits).toEqual([0x1005n]);
    expect(steps).toEqual([0x1008n]);
  });

  it('a guest write over a hooked instruction on a write-watched page keeps the probe, which then restores the new bytes', async () => {
    // Self-modifying code: the probe sits at 0x1005 on a mediated write-watch page; the guest overwrites it.
    const { vm, vcpu } = await guest('mov eax, 1\n add eax, 2\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm, outOfLine: false });
    const writes: bigint[] = [];
    mon.mediate({ event: 'write-watch', range: [0x1000, 0x1fff] }, (ev) => { if (ev.event === 'write-watch') writes.push(ev.address); return allow(); });
    const hits: bigint[] = [];
    mon.observe({ event: 'exec', address: 0x1005 }, (ev) => { if (ev.event === 'exec') hits.push(ev.address); });
    expect(bytes(vm, 0x1005)).toEqual([0xe6, PROBE_PORT]);
    vcpu.script(
      // mov dword [0x1004], 0x90909090 (write-protected page → MMIO exit): covers the probe's two bytes and two more.
      () => mmioExit(0x1004n, 4, 0x9090_9090),
      (v) => {
        expect(bytes(vm, 0x1004, 4)).toEqual([0x90, 0xe6, PROBE_PORT, 0x90]); // trap kept, neighbours written
        return trapAt(0x1005n)(v);
      },
      (v) => {
        expect(resumesAt(vm, v.regs.rip)).toBe(0x1005n);
        expect(v.regs.rip).not.toBe(0x1005n);
        // The trap restored the *new* bytes and armed the successor decoded from them (nop → 0x1006).
        expect(bytes(vm, 0x1004, 4)).toEqual([0x90, 0x90, 0xe6, PROBE_PORT]);
        return { kind: 'hlt' };
      },
    );
    expect((await vm.run()).reason).toBe('halt');
    expect(writes).toEqual([0x1004n]);
    expect(hits).toEqual([0x1005n]);
    mon.close();
    expect(bytes(vm, 0x1004, 4)).toEqual([0x90, 0x90, 0x90, 0x90]); // detaching does not resurrect the old code
  });

  it('a probe on a 1-byte instruction is not re-armed over the instruction the guest resumes at: it hops one further', async () => {
    const { vm, vcpu } = await guest('nop\n nop\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm, outOfLine: false });
    let hits = 0;
    mon.observe({ event: 'exec', address: 0x1000 }, () => { hits++; });
    vcpu.script(
      trapAt(0x1000n),
      (v) => { expect(bytes(vm, 0x1000, 3)).toEqual([0x90, 0xe6, PROBE_PORT]); return trapAt(0x1001n)(v); },
      (v) => {
        // Re-arming 0x1000 now would cover 0x1001, where the guest resumes: the trap moved on to 0x1002.
        expect(resumesAt(vm, v.regs.rip)).toBe(0x1001n);
        expect(bytes(vm, 0x1000, 4)).toEqual([0x90, 0x90, 0xe6, PROBE_PORT]);
        return trapAt(0x1002n)(v);
      },
      () => { expect(bytes(vm, 0x1000, 4)).toEqual([0xe6, PROBE_PORT, 0x90, 0xf4]); return { kind: 'hlt' }; },
    );
    expect((await vm.run()).reason).toBe('halt');
    expect(hits).toBe(1);
  });
});

/** The instructions at `rip` (guest-identity-mapped) decoded one after another, as text. */
function disassemble(vm: Machine, rip: bigint, count: number): string[] {
  const bytes = vm.memory.read(rip, 32);
  const out: string[] = [];
  let off = 0;
  for (let k = 0; k < count; k++) {
    const d = decodeBytes(bytes.subarray(off), rip + BigInt(off), 64);
    out.push(d.text);
    off += d.length;
  }
  return out;
}

describe('exec hooks through the probe run the hooked instruction out of line (one exit per hit)', () => {
  it('the trap stays armed; the guest resumes at a relocated copy that jumps back', async () => {
    // 0x1000: mov eax, 1 (5)   0x1005: add eax, 2 (3)   0x1008: nop   0x1009: hlt
    const { vm, vcpu, code } = await guest('mov eax, 1\n add eax, 2\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    const seen: Array<{ rip: bigint; code: number[] }> = [];
    mon.observe({ event: 'exec', address: 0x1005 }, (ev) => { if (ev.event === 'exec') seen.push({ rip: ev.rip, code: Array.from(ev.code.subarray(0, 3)) }); });
    const slots: bigint[] = [];
    vcpu.script(
      trapAt(0x1005n),
      (v) => {
        slots.push(v.regs.rip);
        expect(v.regs.rip).not.toBe(0x1005n);
        expect(bytes(vm, 0x1005)).toEqual([0xe6, PROBE_PORT]); // still armed: no second trap is needed
        expect(bytes(vm, 0x1008, 1)).toEqual([code[8]]);
        expect(disassemble(vm, v.regs.rip, 2)).toEqual(['add eax,2', 'jmp 0000000000001008h']);
        return trapAt(0x1005n)(v);
      },
      (v) => { slots.push(v.regs.rip); return { kind: 'hlt' }; },
    );
    const st = await vm.run();
    expect(st.reason === 'backend-error' ? String((st as { error?: unknown }).error ?? JSON.stringify(Object.keys(st))) : st.reason).toBe('halt');
    expect(seen).toEqual([{ rip: 0x1005n, code: Array.from(code.subarray(5, 8)) }, { rip: 0x1005n, code: Array.from(code.subarray(5, 8)) }]);
    expect(slots[1]).toBe(slots[0]); // the copy is made once and reused
    mon.close();
    expect(bytes(vm, 0x1005, 3)).toEqual(Array.from(code.subarray(5, 8)));
  });

  it('a 1-byte instruction moves together with the next one, and a branch is re-encoded for its new address', async () => {
    // 0x1000: nop (1)   0x1001: jnz 0x1000 (2)   0x1003: hlt — the 2-byte trap covers nop and jnz's opcode.
    const { vm, vcpu } = await guest('l: nop\n jnz l\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'exec', address: 0x1000 }, () => {});
    vcpu.script(trapAt(0x1000n), (v) => {
      expect(disassemble(vm, v.regs.rip, 3)).toEqual(['nop', 'jne 0000000000001000h', 'jmp 0000000000001003h']);
      return { kind: 'hlt' };
    });
    const st = await vm.run();
    expect(st.reason === 'backend-error' ? String((st as { error?: unknown }).error ?? JSON.stringify(Object.keys(st))) : st.reason).toBe('halt');
  });

  it('a RIP-relative operand still points at the same address from the copy', async () => {
    // 0x1000: lea rax, [rip + 0x100] → 0x1107 wherever it runs.
    const { vm, vcpu } = await guest('lea rax, [rip + 0x100]\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'exec', address: 0x1000 }, () => {});
    vcpu.script(trapAt(0x1000n), (v) => {
      expect(disassemble(vm, v.regs.rip, 2)).toEqual(['lea rax,[1107h]', 'jmp 0000000000001007h']);
      return { kind: 'hlt' };
    });
    expect((await vm.run()).reason).toBe('halt');
  });

  it('an instruction with a memory operand runs in place: original bytes back, successor armed (two exits)', async () => {
    // 0x1000: mov [rbx], eax (2)   0x1002: nop   0x1003: hlt
    const { vm, vcpu, code } = await guest('mov [rbx], eax\n nop\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    let hits = 0;
    mon.observe({ event: 'exec', address: 0x1000 }, () => { hits++; });

    vcpu.script(
      trapAt(0x1000n),
      (v) => {
        expect(resumesAt(vm, v.regs.rip)).toBe(0x1000n);
        expect(bytes(vm, 0x1000)).toEqual(Array.from(code.subarray(0, 2)));
        expect(bytes(vm, 0x1002)).toEqual([0xe6, PROBE_PORT]);
        return trapAt(0x1002n)(v);
      },
      () => ({ kind: 'hlt' }),
    );
    expect((await vm.run()).reason).toBe('halt');
    expect(hits).toBe(1);
    expect(bytes(vm, 0x1000)).toEqual([0xe6, PROBE_PORT]);
  });

  it('the plan prices an in-place hit as two exits and an out-of-line one as one', async () => {
    // 0x1000: mov [rbx], eax (2, memory operand)   0x1002: nop   0x1003: add eax, 1 (3)
    const { vm } = await guest('mov [rbx], eax\n nop\n add eax, 1\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'exec', address: 0x1000 }, () => {}, { name: 'store' });
    mon.observe({ event: 'exec', address: 0x1003 }, () => {}, { name: 'add' });
    const [store, add] = mon.plan();
    expect([store?.exitsPerHit, add?.exitsPerHit]).toEqual([2, 1]);
    // The assumed PVM table prices an in-place hit as two probe exits.
    expect(store?.unitNs).toBe(2 * (add?.unitNs ?? NaN));
    expect(store?.why).toMatch(/run in place \(2 exits\/hit\)/);
    // A 1-byte instruction that must run in place (port I/O) under the 2-byte trap: three exits.
    const io = new Monitor((await guest('out dx, al\n nop\n nop\n hlt')).vm, { calibration: pvm });
    io.observe({ event: 'exec', address: 0x1000 }, () => {});
    expect(io.plan()[0]).toMatchObject({ exitsPerHit: 3, unitNs: 1.5 * (store?.unitNs ?? NaN) });
    const forced = new Monitor(await (await guest('add eax, 1\n hlt')).vm, { calibration: pvm, outOfLine: false });
    forced.observe({ event: 'exec', address: 0x1000 }, () => {});
    expect(forced.plan()[0]?.exitsPerHit).toBe(2);
  });

  it('with several vCPUs only an out-of-line probe is used: breakpoints are vCPU 0\'s, an in-place trap could be run past', async () => {
    const vm = await Machine.create({ memory: 2 * MiB, backend: new MockBackend(), irqchip: true, vcpus: 2 });
    vm.loadFlat(await asm('mov [rbx], eax\n nop\n add eax, 1\n hlt', { bits: 64, address: AT }), { at: AT, mode: 'long', ring: 0 });
    const at = (ns: number) => ({ cpl0: { works: true as const, ns }, cpl3: { works: true as const, ns } });
    // Breakpoints cheaper than the probe: on one vCPU they would win.
    const table = { ...pvm, source: 'measured' as const, results: { ...pvm.results, 'probe-breakpoint': at(40_000), 'hw-breakpoint': at(9_000), 'sw-breakpoint': at(8_000), 'single-step': at(5_000) } };
    const mon = new Monitor(vm, { calibration: table });
    const h = mon.observe({ event: 'exec', address: 0x1003, cpl: 0 }, () => {});
    expect(h.mechanism).toBe('probe-breakpoint');
    expect(mon.plan()[0]?.rejected.map((r) => r.mechanism)).toEqual(expect.arrayContaining(['sw-breakpoint', 'hw-breakpoint']));
    expect(() => mon.observe({ event: 'exec', address: 0x1000, cpl: 0 }, () => {})).toThrow(MechanismUnavailableError);
    expect(() => mon.observe({ event: 'exec', address: 0x1000, cpl: 0 }, () => {})).toThrow(/2-vCPU machine.*run in place/);
    await vm.close();
  });

  it('a measured in-place price is used, and picks another mechanism where it makes the probe dearer', async () => {
    const results = { ...pvm.results };
    const at = (ns: number) => ({ cpl0: { works: true as const, ns }, cpl3: { works: true as const, ns } });
    // Probe: 10 µs out of line, 50 µs in place; a hardware breakpoint: 30 µs (single-step works).
    const table = { ...pvm, source: 'measured' as const, results: { ...results, 'probe-breakpoint': at(10_000), 'probe-in-place': at(50_000), 'hw-breakpoint': at(30_000), 'single-step': at(5_000), 'sw-breakpoint': { cpl0: { works: false as const, failure: 'x' }, cpl3: { works: false as const, failure: 'x' } } } };
    const { vm } = await guest('mov [rbx], eax\n nop\n add eax, 1\n hlt');
    const mon = new Monitor(vm, { calibration: table });
    mon.observe({ event: 'exec', address: 0x1000, cpl: 0 }, () => {}, { name: 'store' });
    mon.observe({ event: 'exec', address: 0x1003, cpl: 0 }, () => {}, { name: 'add' });
    const [store, add] = mon.plan();
    expect(add).toMatchObject({ mechanism: 'probe-breakpoint', exitsPerHit: 1, unitNs: 10_000 });
    expect(store).toMatchObject({ mechanism: 'hw-breakpoint', unitNs: 30_000 });
    expect(store?.rejected.find((r) => r.mechanism === 'probe-breakpoint')?.why).toMatch(/50000/);
    const onlyProbe = { ...table, results: { ...table.results, 'hw-breakpoint': table.results['sw-breakpoint'] } };
    const m2 = new Monitor((await guest('mov [rbx], eax\n hlt')).vm, { calibration: onlyProbe });
    m2.observe({ event: 'exec', address: 0x1000, cpl: 0 }, () => {});
    expect(m2.plan()[0]).toMatchObject({ mechanism: 'probe-breakpoint', exitsPerHit: 2, unitNs: 50_000 });
  });

  it('a deny names the hooked instruction from its own bytes, not the trap in guest RAM', async () => {
    const { vm, vcpu } = await guest('mov eax, 1\n add eax, 2\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    let n = 0;
    mon.mediate({ event: 'exec', address: 0x1005 }, () => (++n > 1 ? deny({ reason: 'second execution' }) : allow()));
    vcpu.script(trapAt(0x1005n), trapAt(0x1005n));
    const stop = await vm.run();
    expect(stop.reason).toBe('violation');
    if (stop.reason === 'violation') expect(stop.violation.message).toMatch(/second execution.*0x1005: add eax,2 \[83 c0 02\]/);
  });

  it('bytes the guest changed under a hooked instruction give a new copy at the next hit', async () => {
    const { vm, vcpu } = await guest('mov eax, 1\n add eax, 2\n hlt');
    const mon = new Monitor(vm, { calibration: pvm });
    mon.observe({ event: 'exec', address: 0x1005 }, () => {});
    vcpu.script(
      trapAt(0x1005n),
      (v) => {
        expect(disassemble(vm, v.regs.rip, 1)).toEqual(['add eax,2']);
        // add eax, 2 → add eax, 7: the byte after the trap is live code.
        vm.memory.write(0x1007n, Uint8Array.of(7));
        return trapAt(0x1005n)(v);
      },
      (v) => { expect(disassemble(vm, v.regs.rip, 1)).toEqual(['add eax,7']); return { kind: 'hlt' }; },
    );
    expect((await vm.run()).reason).toBe('halt');
  });
});
