import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CommanderError } from 'commander';
import { ImageFormatError, InvalidArgumentError, KvmUnavailableError, MonitorViolation, type Stop } from '@tsvm/core';
import { AuditLog, PolicyError } from '@tsvm/monitor';
import { verifyAuditFile } from './audit-verify.js';
import { CliError, EXIT, errorStatus, stopStatus } from './exit-codes.js';
import { detectFormat, parseSize } from './image.js';
import { checkPolicy, policyKind, readPolicyFile } from './policy-check.js';
import { gdbArg, intArg, program, runOptions } from './program.js';

const dirs: string[] = [];
const tmp = (): string => { const d = mkdtempSync(join(tmpdir(), 'tsvm-cli-')); dirs.push(d); return d; };
afterEach(() => { for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true }); });
const file = (name: string, content: string | Uint8Array): string => { const p = join(tmp(), name); writeFileSync(p, content); return p; };

describe('image format detection', () => {
  it('tells flat, ELF, multiboot and bzImage apart from the bytes', () => {
    expect(detectFormat(new Uint8Array([0xf4]))).toBe('flat');
    expect(detectFormat(new Uint8Array([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]))).toBe('elf');
    expect(detectFormat(new Uint8Array([0x7f, 0x45, 0x4c]))).toBe('flat'); // too short to be ELF magic
    const mb = new Uint8Array(64);
    new DataView(mb.buffer).setUint32(16, 0x1badb002, true);
    expect(detectFormat(mb)).toBe('multiboot');
    mb.set([0x7f, 0x45, 0x4c, 0x46]); // a multiboot ELF is loaded as multiboot
    expect(detectFormat(mb)).toBe('multiboot');
    new DataView(mb.buffer).setUint32(16, 0x1badb002 + 1, true);
    expect(detectFormat(mb)).toBe('elf');
    const bz = new Uint8Array(0x300);
    const v = new DataView(bz.buffer);
    v.setUint16(0x1fe, 0xaa55, true);
    v.setUint32(0x202, 0x53726448, true); // "HdrS"
    expect(detectFormat(bz)).toBe('linux');
    v.setUint16(0x1fe, 0, true);
    expect(detectFormat(bz)).toBe('flat');
  });

  it('parses sizes and rejects what is not one', () => {
    expect(parseSize('16M')).toBe(16 * 1024 * 1024);
    expect(parseSize('512K')).toBe(512 * 1024);
    expect(parseSize('1G')).toBe(1024 ** 3);
    expect(parseSize('2MiB')).toBe(2 * 1024 * 1024);
    expect(parseSize('8192')).toBe(8192);
    for (const bad of ['', '16X', '-1M', '100', '0']) expect(() => parseSize(bad), bad).toThrow(CliError);
  });
});

describe('exit statuses', () => {
  const common = { rip: 0x1000n, vcpu: 0, exits: 1, elapsedMs: 1 };
  const stop = (s: Record<string, unknown>): Stop => ({ ...common, ...s }) as unknown as Stop;
  it('map every stop reason to its class, and a debug-exit to its value', () => {
    expect(stopStatus(stop({ reason: 'halt' }))).toBe(0);
    expect(stopStatus(stop({ reason: 'debug-exit', code: 0 }))).toBe(0);
    expect(stopStatus(stop({ reason: 'debug-exit', code: 42 }))).toBe(42);
    expect(stopStatus(stop({ reason: 'debug-exit', code: 0x101 }))).toBe(1);
    expect(stopStatus(stop({ reason: 'violation', violation: new MonitorViolation('pio', 'x') }))).toBe(EXIT.violation);
    expect(stopStatus(stop({ reason: 'timeout' }))).toBe(EXIT.timeout);
    expect(stopStatus(stop({ reason: 'aborted' }))).toBe(130);
    for (const reason of ['shutdown', 'exception', 'unhandled-exit', 'internal-error', 'fail-entry']) expect(stopStatus(stop({ reason }))).toBe(EXIT.guestCrash);
    for (const reason of ['hook-error', 'device-error', 'backend-error']) expect(stopStatus(stop({ reason }))).toBe(EXIT.hostFault);
    expect(stopStatus(stop({ reason: 'reset' }))).toBe(EXIT.reset);
    expect(stopStatus(stop({ reason: 'poweroff' }))).toBe(EXIT.ok);
    expect(stopStatus(stop({ reason: 'suspend', wakingVector: 0n }))).toBe(EXIT.suspended);
    expect(EXIT.suspended).toBe(15);
  });

  it('are distinct per class', () => {
    const values = Object.values(EXIT);
    expect(new Set(values).size).toBe(values.length);
  });

  it('map errors to their class with one line', () => {
    expect(errorStatus(new CliError(EXIT.noFile, 'cannot read x'))).toEqual({ status: EXIT.noFile, message: 'cannot read x' });
    expect(errorStatus(new ImageFormatError('e_phoff', 'beyond the end'))).toMatchObject({ status: EXIT.badImage, message: expect.stringMatching(/^bad image: .*e_phoff/) });
    expect(errorStatus(new PolicyError('rules[0].ports', 'bad'))).toMatchObject({ status: EXIT.policyInvalid });
    expect(errorStatus(new KvmUnavailableError('cannot open /dev/kvm: ENOENT'))).toMatchObject({ status: EXIT.noKvm, message: expect.stringMatching(/ENOENT/) });
    expect(errorStatus(new InvalidArgumentError('at', 'outside RAM'))).toMatchObject({ status: EXIT.usage });
    expect(errorStatus(new CommanderError(1, 'commander.unknownCommand', 'x'))).toEqual({ status: EXIT.usage, message: '' });
    expect(errorStatus(new CommanderError(0, 'commander.helpDisplayed', 'x')).status).toBe(0);
    expect(errorStatus(new TypeError('oops'))).toMatchObject({ status: EXIT.internal });
  });
});

describe('argument parsing', () => {
  const parse = async (argv: string[]): Promise<Error | undefined> => {
    try {
      await program({ out: () => {}, err: () => {}, setStatus: () => {} }).configureOutput({ writeErr: () => {} }).parseAsync(['node', 'tsvm', ...argv]);
      return undefined;
    } catch (e) { return e as Error; }
  };
  it('rejects bad option values as usage errors before anything runs', async () => {
    for (const argv of [['run', 'x', '--memory', '12Q'], ['run', 'x', '--mode', 'v86'], ['run', 'x', '--ring', '2'], ['run', 'x', '--timeout', '-5'],
      ['run', 'x', '--gdb', 'nope'], ['run', 'x', '--format', 'pe'], ['run'], ['policy'], ['audit', 'verify']]) {
      const e = await parse(argv);
      expect(e, argv.join(' ')).toBeInstanceOf(CommanderError);
      expect(errorStatus(e).status, argv.join(' ')).toBe(EXIT.usage);
    }
  });
  it('run --help names the exit statuses, ACPI poweroff and suspend among them', () => {
    const help = (program({ out: () => {} }).commands.find((c) => c.name() === 'run')?.helpInformation() ?? '').replace(/\s+/g, ' '); // commander wraps lines
    expect(help).toMatch(/poweroff \(S5\) ends the run with 0/);
    expect(help).toMatch(new RegExp(`${EXIT.suspended} suspended \\(ACPI S3, not resumed\\)`));
    expect(help).toMatch(new RegExp(`${EXIT.timeout} timeout`));
  });
  it('parses --gdb, integers and the run flags', () => {
    expect(gdbArg(':1234')).toEqual({ host: '127.0.0.1', port: 1234 });
    expect(gdbArg('0.0.0.0:9')).toEqual({ host: '0.0.0.0', port: 9 });
    expect(() => gdbArg(':70000')).toThrow();
    expect(intArg('0x7c00')).toBe(0x7c00);
    expect(() => intArg('12ms')).toThrow();
    const o = runOptions('img', { memory: 4096, ring: '3', mode: 'long', timeout: 5, qemuExit: true }, false);
    expect(o).toMatchObject({ image: 'img', memory: 4096, ring: 3, mode: 'long', timeout: 5, debugExit: 'qemu', progress: false });
    expect(runOptions('img', { memory: 4096 }, true)).toMatchObject({ progress: true, debugExit: 'raw' });
    expect(runOptions('img', { memory: 4096, progress: false }, true).progress).toBe(false);
  });
});

describe('tsvm policy check', () => {
  const port = { version: 1, rules: [{ id: 'uart', event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out', action: 'allow' }] };
  it('accepts a port policy and names the JSON path of a malformed field', () => {
    expect(checkPolicy(file('p.json', JSON.stringify(port))).lines[0]).toMatch(/port\/MSR policy OK: 1 rules, default deny/);
    const bad = { ...port, rules: [{ ...port.rules[0], ports: [0x3ff, 0x3f8] }] };
    expect(() => readPolicyFile(file('b.json', JSON.stringify(bad)))).toThrow(expect.objectContaining({ status: EXIT.policyInvalid, message: expect.stringMatching(/rules\[0\]\.ports/) }));
    expect(() => readPolicyFile(file('t.json', '{"version": 1, "rules": ['))).toThrow(expect.objectContaining({ status: EXIT.policyInvalid, message: expect.stringMatching(/not JSON/) }));
    expect(() => readPolicyFile(join(tmp(), 'missing.json'))).toThrow(expect.objectContaining({ status: EXIT.noFile }));
  });

  const topology = { version: 1, principals: { vault: { kind: 'machine', cid: 3, secrecy: ['key'] }, worker: { kind: 'machine', cid: 4, secrecy: ['key'] } } };
  const flow = { version: 1, rules: [
    { id: 'key', source: 'vault', destination: 'worker', port: 1, action: 'allow' },
    { id: 'dup', source: 'vault', destination: 'worker', port: 1, action: 'deny' },
    { id: 'ghost', source: 'printer', destination: 'worker', action: 'allow' },
  ] };
  it('checks a flow policy and, given a topology, prints never-matching and shadowed rules', () => {
    expect(policyKind(flow)).toBe('flow');
    expect(policyKind(port)).toBe('port');
    const alone = checkPolicy(file('f.json', JSON.stringify(flow)));
    expect(alone.kind).toBe('flow');
    expect(alone.lines.join('\n')).toMatch(/no topology/);
    const r = checkPolicy(file('f.json', JSON.stringify(flow)), file('t.json', JSON.stringify(topology)));
    expect(r.findings.map((f) => `${f.kind} ${f.rule}`)).toEqual(expect.arrayContaining(['shadowed dup', 'never-matches ghost']));
    expect(r.lines.join('\n')).toMatch(/shadowed dup: /);
    // The same, from one file holding both.
    expect(checkPolicy(file('both.json', JSON.stringify({ policy: flow, topology }))).findings.length).toBe(r.findings.length);
    const bad = { ...flow, rules: [{ ...flow.rules[0], action: 'maybe' }] };
    expect(() => readPolicyFile(file('fb.json', JSON.stringify(bad)))).toThrow(expect.objectContaining({ status: EXIT.policyInvalid, message: expect.stringMatching(/flow policy: rules\[0\]\.action/) }));
  });
});

describe('tsvm audit verify', () => {
  it('says OK with the line count and head, or names the first bad line', () => {
    const lines: string[] = [];
    const log = new AuditLog(lines);
    for (let i = 0; i < 3; i++) log.append({ machine: 'm', vcpu: 0, exit: i, rip: '0x1000', event: 'pio', address: `0x3f8#${i}`, hook: 'policy:uart', decision: i === 2 ? 'deny' : 'allow' });
    const good = verifyAuditFile(file('a.log', `${lines.join('\n')}\n`));
    expect(good).toEqual({ status: 0, line: expect.stringMatching(new RegExp(`OK, 3 lines, head ${log.head}$`)) });
    const tampered = lines.map((l, i) => (i === 1 ? l.replace('0x3f8#1', '0x3f8#9') : l));
    expect(verifyAuditFile(file('t.log', tampered.join('\n')))).toEqual({ status: EXIT.failed, line: expect.stringMatching(/line 2 is bad: hash does not match/) });
    expect(verifyAuditFile(file('a.log', lines.slice(0, 2).join('\n')), log.head).status).toBe(EXIT.failed);
  });
});

describe('image checks before a machine exists', () => {
  it('an empty file, a truncated ELF and a multiboot image with a bad checksum are ImageFormatErrors', async () => {
    const { checkImage } = await import('./image.js');
    expect(() => checkImage(new Uint8Array(0), 'flat')).toThrow(ImageFormatError);
    expect(() => checkImage(Uint8Array.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]), 'elf')).toThrow(ImageFormatError);
    const mb = new Uint8Array(64);
    new DataView(mb.buffer).setUint32(0, 0x1badb002, true);
    expect(() => checkImage(mb, 'multiboot')).toThrow(/checksum/);
    expect(() => checkImage(new Uint8Array(0x300), 'linux')).toThrow(ImageFormatError);
    expect(() => checkImage(Uint8Array.from([0xf4]), 'flat')).not.toThrow();
  });
});
