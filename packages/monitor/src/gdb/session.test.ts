import { connect } from 'node:net';
import { describe, expect, it } from 'vitest';
import { Machine, StateError, InvalidArgumentError, type VcpuExit } from '@tsvm/core';
import { MockBackend, asm, outExit, type MockStep, type MockVcpu } from '@tsvm/core/testing';
import { Monitor } from '../monitor.js';
import { assumedTable } from '../calibration/table.js';
import { PROBE_PORT } from '../probe.js';
import { GdbSession, MAX_READ } from './session.js';
import { gdbServer } from './server.js';
import { PacketReader, frame } from './packets.js';
import { TARGET_XML, leHex } from './registers.js';

const MiB = 1024 * 1024;
const pvm = assumedTable({ kernel: 't', cpu: 't', flavour: 'pvm' });
/** The guest "executes" the probe trap at `addr` (KVM leaves RIP on the `out`). */
const trapAt = (addr: bigint) => (v: MockVcpu): VcpuExit => { v.regs.rip = addr; return outExit(PROBE_PORT, 0); };

// 0x1000: mov eax, 1 (5)  0x1005: add eax, 2 (3)  0x1008: nop  0x1009: jmp qword ptr fs:[rax]  hlt
async function setup(...steps: MockStep[]) {
  const backend = new MockBackend();
  const vcpu = backend.script(...steps);
  const vm = await Machine.create({ memory: 2 * MiB, backend });
  const code = await asm('mov eax, 1\n add eax, 2\n nop\n jmp qword ptr fs:[rax]\n hlt', { bits: 64, address: 0x1000 });
  vm.loadFlat(code, { at: 0x1000, mode: 'long', ring: 3 });
  const mon = new Monitor(vm, { calibration: pvm });
  const replies: string[] = [];
  let wake: (() => void) | undefined;
  const session = new GdbSession(vm, mon, { send: (p) => { replies.push(p); wake?.(); } });
  const ask = (p: string): string | undefined => { replies.length = 0; session.handle(p); return replies.shift(); };
  /** Sends `p` and waits for the asynchronous reply (continue/step). */
  const run = async (p: string): Promise<string> => {
    replies.length = 0;
    const got = new Promise<void>((r) => { wake = r; });
    session.handle(p);
    if (replies.length === 0) await got;
    return replies.shift() as string;
  };
  return { vm, vcpu, code, mon, session, ask, run };
}

describe('gdb session on MockBackend', () => {
  it('memory: reads bounded to MAX_READ, outside RAM an E reply, malformed an E reply; the end of RAM gives what is there', async () => {
    const { ask, code } = await setup();
    expect(ask('m1000,5')).toBe(Buffer.from(code.subarray(0, 5)).toString('hex'));
    expect(ask(`m1000,${(1 << 30).toString(16)}`)?.length).toBe(MAX_READ * 2);
    expect(ask('mffffffffffffffff,ffffffffffffffff')).toBe('E0e');
    expect(ask('m7fff0000,4')).toBe('E0e'); // not mapped by the guest's page tables
    expect(ask('m1000')).toBe('E16');
    expect(ask('m1000,')).toBe('E16');
    expect(ask('mxyz,4')).toBe('E16');
    expect(ask('m1000,0')).toBe('');
    expect(ask(`m${(2 * MiB - 2).toString(16)},8`)).toBe('0000'); // the last two bytes of RAM
    expect(ask(`m${(2 * MiB - 100).toString(16)},800`)?.length).toBe(200);
    expect(ask(`m${(2 * MiB).toString(16)},8`)).toBe('E0e');
    expect(ask('M1000,2:zz')).toBe('E16');
    expect(ask('M1000,3:9090')).toBe('E16');
    expect(ask('M7fff0000,1:90')).toBe('E0e');
    expect(ask('M2000,2:9090')).toBe('OK');
    expect(ask('m2000,2')).toBe('9090');
    expect(ask('X2000,0:')).toBe('OK');
    expect(ask(`X2000,2:${String.fromCharCode(0x7d, 0x24)}`)).toBe('OK'); // binary payload, unescaped by the reader
  });

  it('Z0 arms the monitor probe (RAM holds e6 e5), m still shows the code, M over it keeps the trap, z0 restores', async () => {
    const { vm, mon, ask } = await setup();
    expect(ask('Z0,1005,1')).toBe('OK');
    expect(mon.plan()).toMatchObject([{ name: 'gdb:swbreak@0x1005', event: 'exec', mechanism: 'probe-breakpoint' }]);
    expect(Array.from(vm.memory.read(0x1005, 2))).toEqual([0xe6, PROBE_PORT]);
    expect(ask('m1005,3')).toBe('83c002');
    expect(ask('M1005,3:83c005')).toBe('OK'); // add eax, 5
    expect(Array.from(vm.memory.read(0x1005, 3))).toEqual([0xe6, PROBE_PORT, 0x05]);
    expect(ask('m1005,3')).toBe('83c005');
    expect(ask('Z1,1005,1')).toBe('OK'); // hbreak at the same place: a second hook, the same trap
    expect(ask('z0,1005,1')).toBe('OK');
    expect(Array.from(vm.memory.read(0x1005, 2))).toEqual([0xe6, PROBE_PORT]);
    expect(ask('z1,1005,1')).toBe('OK');
    expect(Array.from(vm.memory.read(0x1005, 3))).toEqual([0x83, 0xc0, 0x05]);
    expect(mon.plan()).toEqual([]);
    expect(ask('Z0,7fff0000,1')).toBe('E0e');
    expect(ask('Z2,1000,4')).toBe(''); // watchpoints: unsupported
    expect(ask('Z0,1000')).toBe('E16');
  });

  it('a hit stops the run with T05 swbreak; gdb sees the hit RIP, not the trampoline; continue resumes to the end', async () => {
    const { vm, vcpu, ask, run } = await setup(trapAt(0x1005n), { kind: 'hlt' });
    expect(ask('?')).toBe('S05');
    expect(ask('Z0,1005,1')).toBe('OK');
    expect(await run('c')).toBe('T05thread:1;swbreak:;');
    expect(vcpu.regs.rip).not.toBe(0x1005n); // out of line: the copy in the trampoline runs next
    expect(ask('p10')).toBe(leHex(0x1005n, 8));
    expect(ask('g')?.slice(16 * 16, 17 * 16)).toBe(leHex(0x1005n, 8));
    expect(ask('?')).toBe('T05thread:1;swbreak:;');
    // gdb writing back the RIP it was shown moves nothing; rax does change.
    expect(ask(`P10=${leHex(0x1005n, 8)}`)).toBe('OK');
    expect(vcpu.regs.rip).not.toBe(0x1005n);
    expect(ask(`P0=${leHex(0x99n, 8)}`)).toBe('OK');
    expect(vcpu.regs.rax).toBe(0x99n);
    expect(ask('P0=12')).toBe('E16');
    expect(ask('P99=00')).toBe('E16');
    expect(await run('c')).toBe('T05thread:1;');
    expect(vm.memory.read(0x1005, 2)[0]).toBe(0xe6); // still armed
  });

  it('step is emulated with exec hooks at the successors; an instruction whose successor is unknown gets an error', async () => {
    const { vcpu, mon, ask, run } = await setup(trapAt(0x1005n), { kind: 'hlt' });
    vcpu.regs.rip = 0x1000n;
    expect(await run('s')).toBe('T05thread:1;');
    expect(ask('p10')).toBe(leHex(0x1005n, 8));
    expect(mon.plan()).toEqual([]); // the temporary hooks are gone
    expect(ask(`P10=${leHex(0x1009n, 8)}`)).toBe('OK'); // jmp qword ptr fs:[rax]
    expect(vcpu.regs.rip).toBe(0x1009n);
    expect(ask('s')).toBe('E16');
    expect(ask('p10')).toBe(leHex(0x1009n, 8)); // nothing moved
    expect(ask('vCont?')).toBe('vCont;c;C;s;S');
  });

  it('continue while the owner is running the machine gets an error reply; the owner\'s run is undisturbed', async () => {
    const { vm, mon, run } = await setup(outExit(0x80, 1), { kind: 'hlt' });
    let release: (() => void) | undefined;
    mon.mediate({ event: 'pio', ports: [0x80, 0x80] }, () => new Promise((r) => { release = () => r({ verdict: 'emulate', value: 0 }); }));
    const owner = vm.run();
    for (let i = 0; i < 100 && !release; i++) await new Promise((r) => setTimeout(r, 5));
    expect(await run('c')).toBe('E10');
    release?.();
    expect((await owner).reason).toBe('halt');
  });

  it('target.xml in chunks, qSupported, unknown packets get the empty reply', async () => {
    const { ask } = await setup();
    expect(ask('qSupported:multiprocess+;swbreak+')).toMatch(/qXfer:features:read\+.*swbreak\+;hwbreak\+/);
    let xml = '', off = 0;
    for (;;) {
      const r = ask(`qXfer:features:read:target.xml:${off.toString(16)},100`) as string;
      xml += r.slice(1);
      off += r.length - 1;
      if (r[0] === 'l') break;
      expect(r[0]).toBe('m');
    }
    expect(xml).toBe(TARGET_XML);
    expect(ask('qXfer:features:read:other.xml:0,100')).toBe('E0e');
    expect(ask('vMustReplyEmpty')).toBe('');
    expect(ask('!')).toBe('');
    expect(ask('G1234')).toBe('E16');
  });
});

describe('gdbServer over TCP (MockBackend)', () => {
  it('acks good packets, naks bad checksums, answers an over-long packet with E, refuses a second client, closes on k', async () => {
    const backend = new MockBackend();
    backend.script();
    const vm = await Machine.create({ memory: 2 * MiB, backend });
    await expect(gdbServer(vm, { port: 70000 })).rejects.toThrow(InvalidArgumentError);
    const sealed = new Monitor(vm);
    sealed.seal();
    await expect(gdbServer(vm, { monitor: sealed })).rejects.toThrow(StateError);
    sealed.close();
    const vm2 = await Machine.create({ memory: 2 * MiB, backend: new MockBackend() });
    await using server = await gdbServer(vm2);
    expect(server.address.host).toBe('127.0.0.1');
    const s = connect(server.address.port, '127.0.0.1');
    const raw: string[] = [];
    const reader = new PacketReader();
    const got: string[] = [];
    s.on('data', (b: Buffer) => { raw.push(b.toString('latin1')); for (const e of reader.push(b)) if (e.kind === 'packet') got.push(e.payload); });
    await new Promise((r) => s.once('connect', r));
    const until = async (f: () => boolean) => { for (let i = 0; i < 200 && !f(); i++) await new Promise((r) => setTimeout(r, 10)); };
    s.write('$g#00');
    await until(() => raw.join('').includes('-'));
    expect(raw.join('')).toBe('-');
    s.write(`$${'A'.repeat(0x5000)}#00`);
    await until(() => got.length > 0);
    expect(got).toEqual(['E16']);
    // A second client is turned away while the first is connected.
    const other = connect(server.address.port, '127.0.0.1');
    await new Promise((r) => other.once('close', r));
    s.write(frame('m1000,2'));
    await until(() => got.length > 1);
    expect(got[1]).toBe('0000');
    const closed = new Promise((r) => s.once('close', r));
    s.write(frame('k'));
    await closed;
    await until(() => !server.connected);
    expect(server.connected).toBe(false);
    await vm.close();
    await vm2.close();
  });

  it('a machine closed under the stub drops the client; closing the stub afterwards does not touch the gone RAM', async () => {
    const vm = await Machine.create({ memory: 2 * MiB, backend: new MockBackend() });
    vm.loadFlat(await asm('nop\n nop\n hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    const server = await gdbServer(vm);
    const s = connect(server.address.port, '127.0.0.1');
    const got: string[] = [];
    const reader = new PacketReader();
    s.on('data', (b: Buffer) => { for (const e of reader.push(b)) if (e.kind === 'packet') got.push(e.payload); });
    await new Promise((r) => s.once('connect', r));
    s.write(frame('Z0,1000,1'));
    for (let i = 0; i < 200 && got.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(got).toEqual(['OK']);
    expect(vm.memory.read(0x1000, 1)[0]).not.toBe(0x90); // armed (int3 or probe: the mock host's pick)
    const gone = new Promise((r) => s.once('close', r));
    await vm.close();
    await gone;
    expect(server.connected).toBe(false);
    await expect(server.close()).resolves.toBeUndefined();
  });
});
