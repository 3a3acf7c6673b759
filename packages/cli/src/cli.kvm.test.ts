// The `tsvm` binary as a child process on real KVM: exit statuses from the guest's stop, the
// serial console, timeouts, bad input (one line, its own status), the cost report and the audit log.
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ACPI_PM_DEFAULT_BASE, ACPI_PM_LAYOUT, ACPI_SLEEP_TYPE } from '@tsvm/core';
import { asm, kvmAvailability } from '@tsvm/core/testing';
import { EXIT } from './exit-codes.js';
import { bzImage } from './images.fixture.js';

const kvm = kvmAvailability();
const ROOT = resolve(import.meta.dirname, '../../..');
const BIN = join(ROOT, 'packages/cli/src/bin.ts');
let dir = '';
beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'tsvm-cli-kvm-')); });
afterAll(() => { rmSync(dir, { recursive: true, force: true }); });
const path = (name: string): string => join(dir, name);

interface Result { status: number | null; stdout: string; stderr: string; ms: number }
/** Runs `tsvm ...args` to completion (a hung child fails the test at the vitest timeout). */
function tsvm(...args: string[]): Promise<Result> {
  return tsvmWith(() => {}, ...args);
}
function tsvmWith(onStart: (child: ReturnType<typeof spawn>) => void, ...args: string[]): Promise<Result> {
  const t0 = Date.now();
  return new Promise((done) => {
    const child = spawn(process.execPath, ['--import', 'tsx', BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    child.stdout.on('data', (b: Buffer) => { stdout += b.toString(); });
    child.stderr.on('data', (b: Buffer) => { stderr += b.toString(); });
    child.on('close', (status) => done({ status, stdout, stderr, ms: Date.now() - t0 }));
    onStart(child);
  });
}
const lines = (s: string): string[] => s.split('\n').filter((l) => l !== '');

async function image(name: string, source: string): Promise<string> {
  writeFileSync(path(name), await asm(source, { bits: 64, address: 0x1000 }));
  return path(name);
}
/** A minimal static ELF64 executable: one PT_LOAD of `code` at `at` (file offset 0x1000), entry `at`. */
function elf64(code: Uint8Array, at: number): Uint8Array {
  const f = new Uint8Array(0x1000 + code.length);
  const v = new DataView(f.buffer);
  f.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  v.setUint16(16, 2, true); v.setUint16(18, 0x3e, true); v.setUint32(20, 1, true);
  v.setBigUint64(24, BigInt(at), true); v.setBigUint64(32, 64n, true);
  v.setUint16(52, 64, true); v.setUint16(54, 56, true); v.setUint16(56, 1, true);
  v.setUint32(64, 1, true); v.setUint32(68, 5, true); v.setBigUint64(72, 0x1000n, true);
  v.setBigUint64(80, BigInt(at), true); v.setBigUint64(88, BigInt(at), true);
  v.setBigUint64(96, BigInt(code.length), true); v.setBigUint64(104, BigInt(code.length), true); v.setBigUint64(112, 0x1000n, true);
  f.set(code, 0x1000);
  return f;
}
/** A multiboot v1 kernel with the a.out kludge: loaded whole at 0x100000, entry at 0x100020 (32-bit `code`). */
function multiboot(code: Uint8Array): Uint8Array {
  const f = new Uint8Array(0x20 + code.length);
  const v = new DataView(f.buffer);
  const flags = 0x10000;
  [0x1badb002, flags, (-(0x1badb002 + flags)) >>> 0, 0x100000, 0x100000, 0, 0, 0x100020].forEach((x, i) => v.setUint32(i * 4, x, true));
  f.set(code, 0x20);
  return f;
}
const PRINT_HI = 'mov dx, 0x3f8\n mov al, 0x68\n out dx, al\n mov al, 0x69\n out dx, al\n mov al, 0x0a\n out dx, al\n';

// Bad input that never reaches KVM: these run on any host.
describe('tsvm: bad input, one line and its own status', () => {
  it('a missing image, a truncated ELF, a malformed policy, no /dev/kvm, a port in use', async () => {
    const flat = await image('halt.bin', 'hlt');
    const missing = await tsvm('run', path('nope.bin'));
    expect(missing.status).toBe(EXIT.noFile);
    expect(lines(missing.stderr)).toEqual([expect.stringMatching(/^tsvm: cannot read image .*nope\.bin: ENOENT$/)]);

    writeFileSync(path('short.elf'), Uint8Array.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0x3e]));
    const elf = await tsvm('run', path('short.elf'));
    expect(elf.status).toBe(EXIT.badImage);
    expect(lines(elf.stderr)).toEqual([expect.stringMatching(/^tsvm: bad image: /)]);

    writeFileSync(path('bad.json'), JSON.stringify({ version: 1, rules: [{ id: 'x', event: 'pio', ports: [1], action: 'allow' }] }));
    const pol = await tsvm('run', flat, '--policy', path('bad.json'));
    expect(pol.status).toBe(EXIT.policyInvalid);
    expect(lines(pol.stderr)).toEqual([expect.stringMatching(/rules\[0\]\.ports/)]);
    const check = await tsvm('policy', 'check', path('bad.json'));
    expect([check.status, lines(check.stderr).length]).toEqual([EXIT.policyInvalid, 1]);

    const noKvm = await tsvm('run', flat, '--kvm-device', path('no-kvm'));
    expect(noKvm.status).toBe(EXIT.noKvm);
    expect(lines(noKvm.stderr)).toEqual([expect.stringMatching(/^tsvm: KVM not usable: .*ENOENT/)]);

    const server: Server = createServer();
    const port = await new Promise<number>((r) => server.listen(0, '127.0.0.1', () => r((server.address() as { port: number }).port)));
    try {
      const busy = await tsvm('run', flat, '--gdb', `:${port}`);
      expect(busy.status).toBe(EXIT.portInUse);
      expect(lines(busy.stderr)).toEqual([expect.stringMatching(/port already in use/)]);
    } finally { server.close(); }
    const usage = await tsvm('run', flat, '--memory', 'lots');
    expect(usage.status).toBe(EXIT.usage);
  }, 120_000);
});

describe.skipIf(!kvm.available)(`tsvm run on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  const gdbPath = '/usr/bin/gdb';
  const hasGdb = existsSync(gdbPath);
  if (!hasGdb) process.stderr.write('\n[tsvm] ***** SKIPPING tsvm run --gdb: /usr/bin/gdb is missing *****\n\n');
  it.skipIf(!hasGdb)('--gdb waits for Debian\'s gdb, which breaks, reads a register and continues; the exit status is the guest\'s', async () => {
    // 0x1000: mov eax, 5 (5 bytes)  0x1005: mov ebx, 7  … out 0xf4 with 9.
    const img = await image('gdb.bin', 'mov eax, 5\n mov ebx, 7\n mov al, 9\n out 0xf4, al\n hlt');
    let gdbOut = '';
    const r = await tsvmWith((child) => {
      let seen = '';
      child.stderr?.on('data', (b: Buffer) => {
        seen += b.toString();
        const m = /waiting for gdb on 127\.0\.0\.1:(\d+)/.exec(seen);
        if (!m || gdbOut !== '') return;
        gdbOut = ' ';
        const args = ['-q', '-batch', '-nx', '-ex', 'set architecture i386:x86-64', '-ex', `target remote 127.0.0.1:${m[1]}`,
          '-ex', 'break *0x1005', '-ex', 'continue', '-ex', 'p $rax', '-ex', 'continue'];
        execFile(gdbPath, args, { timeout: 60_000 }, (_e, out, err) => { gdbOut = out + err; });
      });
    }, 'run', img, '--mode', 'long', '--gdb', ':0');
    expect(r.status).toBe(9);
    await new Promise((res) => setTimeout(res, 200));
    expect(gdbOut).toMatch(/Breakpoint 1, 0x0*1005/);
    expect(gdbOut).toMatch(/\$1 = 5/);
  }, 120_000);

  it('the exit status is the value the guest wrote to the debug-exit port; --serial streams the UART to stdout', async () => {
    const seven = await tsvm('run', await image('seven.bin', `${PRINT_HI} mov al, 7\n out 0xf4, al\n hlt`), '--mode', 'long', '--serial');
    expect(seven.status).toBe(7);
    expect(seven.stdout).toBe('hi\n');
    expect(seven.stderr).toMatch(/guest wrote 7 to the debug-exit port/);
    const zero = await tsvm('run', await image('zero.bin', 'xor eax, eax\n out 0xf4, al\n hlt'), '--mode', 'long', '--ring', '3');
    expect(zero.status).toBe(0);
    const qemu = await tsvm('run', path('seven.bin'), '--mode', 'long', '--serial', '--qemu-exit');
    expect(qemu.status).toBe(15); // (7 << 1) | 1
    // Without --serial nothing is at 0x3f8: the first `out` is an exit nobody handles.
    const bare = await tsvm('run', path('seven.bin'), '--mode', 'long');
    expect([bare.status, bare.stdout]).toEqual([EXIT.guestCrash, '']);
    expect(bare.stderr).toMatch(/unhandled exit: out port 0x3f8/);
  }, 120_000);

  it('an ELF64 image is detected from its bytes and entered in long mode at e_entry', async () => {
    writeFileSync(path('exit42.elf'), elf64(await asm('mov al, 42\n out 0xf4, al\n hlt', { bits: 64, address: 0x100000 }), 0x100000));
    const r = await tsvm('run', path('exit42.elf'));
    expect(r.stderr).toMatch(/ELF64, 1 segments, entry 0x100000/);
    expect(r.status).toBe(42);
    // Forced to flat, the same bytes are the ELF header run as real-mode code: not 42.
    const flat = await tsvm('run', path('exit42.elf'), '--format', 'flat', '--timeout', '500');
    expect(flat.status).not.toBe(42);
  }, 60_000);

  it('a bzImage is detected and entered at its 64-bit entry on a minimal PC (irqchip, UART on IRQ 4)', async () => {
    writeFileSync(path('fake.bz'), bzImage(await asm(`${PRINT_HI} mov al, 9\n out 0xf4, al\n hlt`, { bits: 64, address: 0x100200 })));
    const r = await tsvm('run', path('fake.bz'), '--serial', '--cmdline', 'console=ttyS0');
    expect(r.stderr).toMatch(/Linux bzImage, boot protocol 2\.15, 64-bit entry, ACPI PM at 0x600; 256 MiB/);
    expect([r.status, r.stdout]).toEqual([9, 'hi\n']);
    // A kernel's `poweroff` ends in an S5 write to PM1a_CNT: exit 0 with the reason on stderr.
    const pm1Control = ACPI_PM_DEFAULT_BASE + ACPI_PM_LAYOUT.pm1Control;
    writeFileSync(path('off.bz'), bzImage(await asm(`mov dx, ${pm1Control}\n mov ax, ${(ACPI_SLEEP_TYPE.S5 << 10) | (1 << 13)}\n out dx, ax\n mov al, 3\n out 0xf4, al\n hlt`, { bits: 64, address: 0x100200 })));
    const off = await tsvm('run', path('off.bz'));
    expect(off.stderr).toMatch(/guest powered off \(ACPI S5\) at rip=0x1002[0-9a-f]+; .*exit 0/);
    expect(off.status).toBe(EXIT.ok);
    const ring3 = await tsvm('run', path('fake.bz'), '--ring', '3');
    expect([ring3.status, lines(ring3.stderr)]).toEqual([EXIT.usage, [expect.stringMatching(/--ring 3 applies to flat images only/)]]);
  }, 60_000);

  it('a multiboot kernel is detected and entered in protected mode with the multiboot magic in eax', async () => {
    const code = await asm('cmp eax, 0x2badb002\n jne bad\n mov al, 21\n out 0xf4, al\n bad: mov al, 22\n out 0xf4, al', { bits: 32, address: 0x100020 });
    writeFileSync(path('mb.bin'), multiboot(code));
    const r = await tsvm('run', path('mb.bin'));
    expect(r.stderr).toMatch(/multiboot \(aout-kludge\), entry 0x100020/);
    expect(r.status).toBe(21);
  }, 60_000);

  it('--timeout stops a spinning guest with its own status, and --progress reports while it runs', async () => {
    const r = await tsvm('run', await image('spin.bin', 'l: jmp l'), '--mode', 'long', '--ring', '3', '--timeout', '2500', '--progress');
    expect(r.status).toBe(EXIT.timeout);
    expect(r.stderr).toMatch(/timed out after 25\d\d ms/);
    expect(r.stderr).toMatch(/tsvm: running [12] s, \d+ exits/);
  }, 60_000);

  it('SIGINT stops a running guest, closes the machine and exits 130', async () => {
    const img = await image('spin3.bin', 'l: jmp l');
    const r = await tsvmWith((child) => {
      child.stderr?.on('data', (b: Buffer) => { if (b.toString().includes('flat image')) setTimeout(() => child.kill('SIGINT'), 300); });
    }, 'run', img, '--mode', 'long', '--ring', '3');
    expect(r.status).toBe(EXIT.interrupted);
    expect(r.stderr).toMatch(/interrupted at rip=0x100[0-9a-f]; .*exit 130/);
  }, 60_000);

  it('a policy violation exits 10; --report and --audit are written; audit verify passes it and fails a tampered copy', async () => {
    const policy = { version: 1, default: 'deny', rules: [
      { id: 'uart', event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out', action: 'allow' },
      { id: 'cmos', event: 'pio', ports: [0x70, 0x71], action: 'deny', reason: 'no clock for this guest' },
      { id: 'exit', event: 'pio', ports: [0xf4, 0xf4], direction: 'out', action: 'allow' },
    ] };
    writeFileSync(path('policy.json'), JSON.stringify(policy));
    expect((await tsvm('policy', 'check', path('policy.json'))).stdout).toMatch(/port\/MSR policy OK: 3 rules/);
    const img = await image('cmos.bin', `${PRINT_HI} mov al, 0\n out 0x70, al\n mov al, 3\n out 0xf4, al\n hlt`);
    const r = await tsvm('run', img, '--mode', 'long', '--ring', '3', '--serial', '--policy', path('policy.json'), '--report', path('cost.json'), '--audit', path('audit.log'));
    expect(r.status).toBe(EXIT.violation);
    expect(r.stdout).toBe('hi\n');
    expect(r.stderr).toMatch(/policy violation: .*no clock for this guest/);
    const report = JSON.parse(readFileSync(path('cost.json'), 'utf8')) as { hooks: { name: string; events: number }[] };
    expect(report.hooks.find((h) => h.name === 'policy:uart')?.events).toBe(3);
    const log = readFileSync(path('audit.log'), 'utf8');
    expect(log).toMatch(/"decision":"deny"/);

    const ok = await tsvm('audit', 'verify', path('audit.log'));
    expect(ok.status).toBe(0);
    expect(ok.stdout).toMatch(new RegExp(`OK, ${lines(log).length} lines, head [0-9a-f]{64}`));
    writeFileSync(path('tampered.log'), log.replace('"decision":"deny"', '"decision":"allow"'));
    const bad = await tsvm('audit', 'verify', path('tampered.log'));
    expect(bad.status).toBe(EXIT.failed);
    expect(bad.stdout).toMatch(/line \d+ is bad: hash does not match/);

    const svg = await tsvm('run', img, '--mode', 'long', '--serial', '--policy', path('policy.json'), '--report', path('cost.svg'));
    expect(svg.status).toBe(EXIT.violation);
    expect(readFileSync(path('cost.svg'), 'utf8')).toMatch(/^<svg|^<\?xml/);
  }, 120_000);

  it('calibrate --quick measures with progress on stderr, says where it cached the table, and reuses it', async () => {
    const cache = path('cal.json');
    const r = await tsvm('calibrate', '--quick', '--cache', cache);
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/tsvm: calibrating, \d+ s, \d+ guest runs/);
    expect(r.stdout).toMatch(new RegExp(`calibrated \\w+ host in .*; cached in ${cache.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
    expect(r.stdout).toMatch(/pio-exit\s+CPL0 /);
    expect(existsSync(cache)).toBe(true);
    const again = await tsvm('calibrate', '--cache', cache, '--no-progress');
    expect([again.status, again.stderr]).toEqual([0, '']);
    expect(again.stdout).toMatch(/already cached/);
  }, 180_000);
});
