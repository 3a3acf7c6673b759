import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { Machine } from '@tsvm/core';
import { asm, kvmAvailability } from '@tsvm/core/testing';
import { Monitor } from '../monitor.js';
import { gdbServer } from './server.js';
import { PacketReader, frame } from './packets.js';

const kvm = kvmAvailability();
const GDB = '/usr/bin/gdb';
const haveGdb = existsSync(GDB);
if (!haveGdb) process.stderr.write(`\n[tsvm] ***** SKIPPING gdb STUB TESTS WITH gdb: ${GDB} is missing (.ci/run installs Debian's gdb) *****\n\n`);
const MiB = 1024 * 1024;
const END = 0xf4;

// 0x1000: mov eax, 0x11223344 (5)  0x1005: mov ebx, 7 (5)  0x100a: add eax, ebx (2)
// 0x100c: mov ecx, 20 (5)  0x1011: l: inc edx (2)  0x1013: dec ecx (2)  0x1015: jnz l (2)
// 0x1017: mov eax, 42 (5)  then the exit port gets al.
const PROGRAM = 'mov eax, 0x11223344\n mov ebx, 7\n add eax, ebx\n mov ecx, 20\n l: inc edx\n dec ecx\n jnz l\n mov eax, 42';

async function machine(source: string) {
  const vm = await Machine.create({ memory: 4 * MiB });
  vm.io.register({ port: END, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  vm.loadFlat(await asm(`${source}\n mov dx, ${END}\n out dx, al`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  return vm;
}

/** Runs gdb in batch mode; `interruptWhen`: send it SIGINT once that settles (what Ctrl-C in a terminal does: gdb sends 0x03). */
function gdb(port: number, commands: string[], interruptWhen?: Promise<unknown>): Promise<string> {
  const args = ['-q', '-batch', '-nx', '-ex', 'set architecture i386:x86-64', '-ex', `target remote 127.0.0.1:${port}`, ...commands.flatMap((c) => ['-ex', c])];
  return new Promise((resolve, reject) => {
    const child = execFile(GDB, args, { timeout: 60_000 }, (error, stdout, stderr) => {
      if (error && error.killed && error.signal !== 'SIGINT') reject(new Error(`gdb timed out:\n${stdout}\n${stderr}`));
      else resolve(`${stdout}\n${stderr}`);
    });
    void interruptWhen?.then(() => child.kill('SIGINT'));
  });
}

/** A raw RSP client (no-ack mode off): send a packet, wait for the next reply. */
class RawClient {
  readonly #socket: Socket;
  readonly #reader = new PacketReader();
  readonly #replies: string[] = [];
  #wake: (() => void) | undefined;
  closed = false;
  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.setNoDelay(true); // the ack and the next packet are two small writes: no Nagle wait between them
    socket.on('data', (b) => {
      for (const ev of this.#reader.push(b)) if (ev.kind === 'packet') { this.#replies.push(ev.payload); socket.write('+'); }
      this.#wake?.();
    });
    socket.on('close', () => { this.closed = true; this.#wake?.(); });
  }
  static open(port: number): Promise<RawClient> {
    return new Promise((resolve, reject) => { const s = connect(port, '127.0.0.1', () => resolve(new RawClient(s))); s.on('error', reject); });
  }
  write(bytes: string | Buffer): void { this.#socket.write(bytes); }
  async reply(timeoutMs = 10_000): Promise<string> {
    const t0 = Date.now();
    while (this.#replies.length === 0) {
      if (this.closed || Date.now() - t0 > timeoutMs) throw new Error(this.closed ? 'connection closed' : 'no reply');
      await new Promise<void>((r) => { this.#wake = r; setTimeout(r, 50); });
    }
    return this.#replies.shift() as string;
  }
  async ask(payload: string): Promise<string> { this.write(frame(payload)); return this.reply(); }
  destroy(): void { this.#socket.destroy(); }
}

// Spins for minutes (2^40 iterations) unless interrupted; the owner then moves rax near the end to let it finish.
const SPIN = 'xor eax, eax\n mov rbx, 0x10000000000\n l: inc rax\n cmp rax, rbx\n jne l\n mov eax, 9';
const finish = async (vm: Machine) => {
  vm.vcpu(0).setRegs({ rax: 0x10000000000n - 1000n });
  return vm.run({ timeout: 30_000 });
};

describe.skipIf(!kvm.available)(`gdb stub on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it.skipIf(!haveGdb)("Debian's gdb in batch mode: break at a CPL3 instruction, registers, real code bytes, stepi, continue to the end", async () => {
    const vm = await machine(PROGRAM);
    const mon = new Monitor(vm);
    await using server = await gdbServer(vm, { monitor: mon });
    // gdb's breakpoints are inserted while the guest runs: the hooks in place at each stop.
    const hooked: string[] = [];
    const ram: number[][] = [];
    server.events.on('stop', () => {
      hooked.push(mon.plan().map((e) => `${e.name}=${e.mechanism}`).join(','));
      ram.push(Array.from(vm.memory.read(0x1005, 2)));
    });
    const out = await gdb(server.address.port, [
      // Breakpoints stay in guest RAM while stopped, so `x` reads over the armed trap.
      'set breakpoint always-inserted on', 'break *0x1005', 'continue', 'info registers rip', 'print/x $rax', 'x/5xb 0x1005',
      'stepi', 'info registers rip', 'print/x $rbx', 'stepi', 'print/x $rax',
      'hbreak *0x1017', 'continue', 'info registers rip', 'print $rdx',
      'delete', 'continue',
    ]);
    process.stderr.write(`[tsvm] gdb said:\n${out}\n`);
    expect(out).toMatch(/Breakpoint 1, 0x0+1005 in/);
    expect(out).toMatch(/rip\s+0x1005\s/);
    expect(out).toMatch(/\$1 = 0x11223344/);
    // The guest's code (mov ebx, 7), not the probe's trap (e6 e5) that sits in guest RAM.
    expect(out).toMatch(/0x1005:\s+0xbb\s+0x07\s+0x00\s+0x00\s+0x00/);
    expect(out).toMatch(/rip\s+0x100a\s/);
    expect(out).toMatch(/\$2 = 0x7\b/);
    expect(out).toMatch(/\$3 = 0x1122334b/);
    expect(out).toMatch(/Hardware assisted breakpoint 2 at 0x1017/);
    expect(out).toMatch(/Breakpoint 2, 0x0+1017 in/);
    process.stderr.write(`[tsvm] hooks at each stop: ${hooked.join(' | ')}\n`);
    expect(hooked[0]).toMatch(/^gdb:swbreak@0x1005=/);
    expect(ram[0]).toEqual([0xe6, 0xe5]); // at the hit the trap was in RAM (and stayed: always-inserted)
    // `hbreak` is a Z1: an exec hook too, its mechanism the monitor's choice for this host and CPL.
    expect(hooked.some((h) => /gdb:hwbreak@0x1017=/.test(h))).toBe(true);
    expect(out).toMatch(/rip\s+0x1017\s/);
    expect(out).toMatch(/\$4 = 20\b/);
    // 42 = 052 in gdb's octal.
    expect(out).toMatch(/exited with code 052/);
    // gdb removed its breakpoints: guest RAM holds the program again.
    await server.close();
    expect(Array.from(vm.memory.read(0x1005, 2))).toEqual([0xbb, 0x07]);
    await vm.close();
  }, 90_000);

  it.skipIf(!haveGdb)('gdb: a breakpoint on a ret (run in place), stepi to the return address, continue to the next hit, detach; the owner resumes', async () => {
    // 0x1000: jmp start (2)  0x1002: f: add edx, 5 (3)  0x1005: ret (1)  0x1006: nop (the probe's second byte)
    // 0x1007: start: xor edx, edx (2)  0x1009: mov ecx, 3 (5)  0x100e: l: call f (5)  0x1013: dec ecx (2)
    // 0x1015: jnz l (2)  0x1017: mov eax, edx (2)  then the exit port gets al.
    const vm = await machine('jmp start\n f: add edx, 5\n ret\n nop\n start: xor edx, edx\n mov ecx, 3\n l: call f\n dec ecx\n jnz l\n mov eax, edx');
    expect(Array.from(vm.memory.read(0x1005, 2))).toEqual([0xc3, 0x90]);
    await using server = await gdbServer(vm);
    const out = await gdb(server.address.port, [
      // Breakpoints stay in guest RAM while stopped, so `x` reads over the armed trap.
      'set breakpoint always-inserted on', 'break *0x1005', 'continue', 'print $rdx', 'x/2xb 0x1005', 'stepi', 'info registers rip', 'stepi', 'stepi', 'info registers rip',
      'continue', 'print $rdx', 'print $rcx', 'detach',
    ]);
    process.stderr.write(`[tsvm] gdb said:\n${out}\n`);
    expect(out).toMatch(/Breakpoint 1, 0x0+1005 in/);
    expect(out).toMatch(/\$1 = 5\b/);
    expect(out).toMatch(/0x1005:\s+0xc3\s+0x90/);
    expect(out).toMatch(/rip\s+0x1013\s/); // ret went back behind the call
    expect(out).toMatch(/rip\s+0x100e\s/); // dec ecx, then jnz taken
    expect(out).toMatch(/\$2 = 10\b/);
    expect(out).toMatch(/\$3 = 2\b/);
    expect(out).toMatch(/Detaching from program|detached/);
    await new Promise<void>((r) => { if (!server.connected) r(); else server.events.once('disconnect', () => r()); });
    // The breakpoint is gone and the machine, stopped at the hit, finishes the program.
    expect(Array.from(vm.memory.read(0x1005, 2))).toEqual([0xc3, 0x90]);
    expect(await vm.run({ timeout: 10_000 })).toMatchObject({ reason: 'debug-exit', code: 15 });
    await vm.close();
  }, 90_000);

  it('every continue stops at the breakpoint again, one loop iteration later (and how long a hit round trip takes)', async () => {
    // 0x1000: xor edx, edx (2)  0x1002: mov ecx, 100 (5)  0x1007: l: inc edx (2)  0x1009: dec ecx (2)  0x100b: jnz l (2)
    const vm = await machine('xor edx, edx\n mov ecx, 100\n l: inc edx\n dec ecx\n jnz l\n mov eax, edx');
    await using server = await gdbServer(vm);
    const c = await RawClient.open(server.address.port);
    expect(await c.ask('Z0,1007,1')).toBe('OK');
    expect(Array.from(vm.memory.read(0x1007, 2))).toEqual([0xe6, 0xe5]); // the probe's trap in guest RAM
    expect(await c.ask('m1007,4')).toBe('ffc2ffc9'); // inc edx; dec ecx: what gdb is shown
    const rdx: bigint[] = [];
    const t0 = performance.now();
    for (let i = 0; i < 100; i++) {
      expect(await c.ask('c')).toBe('T05thread:1;swbreak:;');
      const g = await c.ask('g');
      expect(Buffer.from(g.slice(16 * 16, 17 * 16), 'hex').readBigUInt64LE()).toBe(0x1007n);
      rdx.push(Buffer.from(g.slice(3 * 16, 4 * 16), 'hex').readBigUInt64LE());
    }
    const ms = (performance.now() - t0) / 100;
    process.stderr.write(`[tsvm] gdb stub: breakpoint hit → T05 → g → c round trip over TCP, CPL3: ${ms.toFixed(2)} ms (${server.monitor.plan()[0]?.mechanism})\n`);
    expect(rdx).toEqual(Array.from({ length: 100 }, (_, i) => BigInt(i)));
    expect(await c.ask('z0,1007,1')).toBe('OK');
    expect(await c.ask('c')).toBe('W64');
    c.destroy();
    await vm.close();
  }, 60_000);

  it.skipIf(!haveGdb)("gdb's interrupt (Ctrl-C, 0x03) stops a spinning CPL3 guest with SIGINT; detach leaves it resumable", async () => {
    const vm = await machine(SPIN);
    await using server = await gdbServer(vm);
    // Ctrl-C once the guest has been running (gdb's `continue` started the machine) for a while.
    const running = new Promise((r) => vm.events.once('started', () => setTimeout(r, 300)));
    const out = await gdb(server.address.port, ['continue', 'print $rax > 0', 'info registers rip', 'detach'], running);
    process.stderr.write(`[tsvm] gdb said:\n${out}\n`);
    expect(out).toMatch(/received signal SIGINT/);
    expect(out).toMatch(/\$1 = 1\b/);
    expect(out).toMatch(/rip\s+0x10(0[0-9a-f]|1[0-9a-f])\s/);
    await new Promise<void>((r) => { if (!server.connected) r(); else server.events.once('disconnect', () => r()); });
    expect(await finish(vm)).toMatchObject({ reason: 'debug-exit', code: 9 });
    await vm.close();
  }, 90_000);

  it('Ctrl-C interrupts a spinning guest (T02); registers read; a client that disconnects mid-run leaves a resumable machine', async () => {
    const vm = await machine(SPIN);
    await using server = await gdbServer(vm);
    const c = await RawClient.open(server.address.port);
    expect(await c.ask('qSupported:swbreak+')).toMatch(/PacketSize=/);
    c.write(frame('c'));
    await new Promise((r) => setTimeout(r, 200));
    c.write(Buffer.of(0x03));
    expect(await c.reply()).toBe('T02thread:1;');
    const g = await c.ask('g');
    const rax = Buffer.from(g.slice(0, 16), 'hex').readBigUInt64LE();
    expect(rax).toBeGreaterThan(0n); // it was running
    const rip = Buffer.from(g.slice(16 * 16, 17 * 16), 'hex').readBigUInt64LE();
    expect(rip >= 0x1000n && rip < 0x1030n).toBe(true);
    // Malformed and hostile packets while stopped: error replies, the session lives on.
    expect(await c.ask('m1000')).toBe('E16');
    expect(await c.ask('mffffffffff000,10')).toBe('E0e');
    expect((await c.ask('m1000,ffffffff')).length).toBe(2048 * 2);
    c.write('$g#00'); // wrong checksum: a '-' and no reply
    expect(await c.ask('p0')).toBe(g.slice(0, 16));
    // Resume, then vanish mid-run: the stub stops the run and the machine keeps its state.
    c.write(frame('c'));
    await new Promise((r) => setTimeout(r, 100));
    const gone = new Promise<void>((r) => server.events.once('disconnect', () => r()));
    c.destroy();
    await gone;
    expect(server.connected).toBe(false);
    const before = vm.vcpu(0).getRegs().rax;
    expect(before).toBeGreaterThan(rax); // it ran on after the second continue, and kept its state
    const stop = await finish(vm);
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 9 });
    await vm.close();
  }, 60_000);
});
