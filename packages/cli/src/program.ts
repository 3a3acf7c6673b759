/**
 * The command tree (commander): `doctor`, `run`, `calibrate`, `policy check`, `audit verify`.
 * Option values are parsed here (a bad one is a usage error, exit 2); each command's action
 * sets {@link ProgramIo.setStatus} to its exit status. See `exit-codes.ts` for the table.
 * @module
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import type { CpuMode } from '@tsvm/core';
import { runCalibrate } from './calibrate.js';
import { doctor, renderDoctor } from './doctor.js';
import { verifyAuditFile } from './audit-verify.js';
import { EXIT } from './exit-codes.js';
import { IMAGE_FORMATS, parseSize, type ImageFormat } from './image.js';
import { checkPolicy } from './policy-check.js';
import { runImage, type RunCommandOptions } from './run.js';

/** Where a program's output and status go (tests pass their own). */
export interface ProgramIo {
  /** Receives what the command prints on stdout (one call per line or block). */
  readonly out?: (text: string) => void;
  /** Receives status and progress lines for stderr. */
  readonly err?: (line: string) => void;
  /** Receives the command's exit status. */
  readonly setStatus?: (status: number) => void;
}

/** `--memory 16M` → bytes (commander parser). */
function sizeArg(v: string): number {
  try { return parseSize(v); } catch (e) { throw new InvalidArgumentError((e as Error).message.replace(/^--memory: /, '')); }
}

/** A non-negative integer in decimal or 0x hex (commander parser). */
export function intArg(v: string): number {
  if (!/^(0x[0-9a-f]+|\d+)$/i.test(v)) throw new InvalidArgumentError(`'${v}' is not a non-negative integer`);
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`'${v}' is too large`);
  return n;
}

/** `--gdb :1234` or `--gdb 127.0.0.1:1234` (commander parser). Host defaults to 127.0.0.1. */
export function gdbArg(v: string): { host: string; port: number } {
  const m = /^(.*):(\d+)$/.exec(v);
  const port = m ? Number(m[2]) : NaN;
  // Port 0: the system picks a free one, printed on stderr ("waiting for gdb on HOST:PORT").
  if (!m || !(port >= 0 && port <= 65535)) throw new InvalidArgumentError(`'${v}' is not [HOST]:PORT with PORT 0-65535`);
  return { host: m[1] || '127.0.0.1', port };
}

interface RunFlags {
  format?: ImageFormat; mode?: CpuMode; ring?: string; at?: number; memory?: number; cmdline?: string; timeout?: number;
  serial?: boolean; qemuExit?: boolean; policy?: string; report?: string; audit?: string; gdb?: { host: string; port: number };
  progress?: boolean; kvmDevice?: string;
}

/** The run flags as {@link RunCommandOptions}. */
export function runOptions(image: string, f: RunFlags, isTty: boolean): RunCommandOptions {
  return {
    image,
    ...(f.memory !== undefined ? { memory: f.memory } : {}),
    ...(f.format ? { format: f.format } : {}),
    ...(f.mode ? { mode: f.mode } : {}),
    ...(f.ring !== undefined ? { ring: f.ring === '3' ? 3 : 0 } : {}),
    ...(f.at !== undefined ? { at: f.at } : {}),
    ...(f.cmdline !== undefined ? { cmdline: f.cmdline } : {}),
    ...(f.timeout !== undefined ? { timeout: f.timeout } : {}),
    ...(f.serial ? { serial: true } : {}),
    debugExit: f.qemuExit ? 'qemu' : 'raw',
    ...(f.policy !== undefined ? { policy: f.policy } : {}),
    ...(f.report !== undefined ? { report: f.report } : {}),
    ...(f.audit !== undefined ? { audit: f.audit } : {}),
    ...(f.gdb ? { gdb: f.gdb } : {}),
    progress: f.progress ?? isTty,
    ...(f.kvmDevice !== undefined ? { kvmDevice: f.kvmDevice } : {}),
  };
}

/**
 * Builds the `tsvm` program. `io.out` receives what it prints (stdout by default); the exit
 * status goes to `io.setStatus`, or to `process.exitCode` when no `io` is given.
 */
export function program(io: ProgramIo | ((text: string) => void) = {}): Command {
  const o: ProgramIo = typeof io === 'function' ? { out: io } : io;
  const out = o.out ?? ((t: string) => process.stdout.write(`${t}\n`));
  const err = o.err ?? ((l: string) => process.stderr.write(`${l}\n`));
  // Only the real entry point (no io given) sets the process's exit code; a test that captures
  // output does not want its own process's status changed.
  const setStatus = o.setStatus ?? (typeof io === 'function' || o.out ? () => {} : (s: number) => { process.exitCode = s; });
  const p = new Command('tsvm').description('build and inspect monitored virtual machines on Linux KVM').exitOverride();
  p.command('doctor')
    .description("what this host's KVM offers, where RIP is at an I/O exit, and which monitor mechanisms work at which CPL")
    .option('--json', 'print the report as JSON')
    .option('--cache <file>', 'calibration cache to read')
    .action((opts: { json?: boolean; cache?: string }) => {
      const r = doctor(opts.cache ? { cachePath: opts.cache } : {});
      out(opts.json ? JSON.stringify(r, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), 2) : renderDoctor(r));
      setStatus(r.kvm.available ? EXIT.ok : EXIT.noKvm);
    });

  p.command('run')
    .description('run an image (flat, ELF, multiboot, Linux bzImage; detected from its bytes); exit status from the stop reason: '
      + '0 halt, n the debug-exit value, 10 violation, 11 timeout, 12 guest crash, 13 host fault, 14 reset, 15 suspended (ACPI S3, not resumed), 130 SIGINT. '
      + 'A Linux image gets ACPI power management (FADT; PM1 registers and PM timer at ports 0x600-0x60b): its poweroff (S5) ends the run with 0')
    .argument('<image>', 'image file')
    .addOption(new Option('--format <format>', 'force the image format').choices(IMAGE_FORMATS))
    .addOption(new Option('--mode <mode>', 'flat images: CPU mode').choices(['real', 'protected', 'long']).default('real'))
    .addOption(new Option('--ring <ring>', 'flat images: privilege level').choices(['0', '3']))
    .option('--at <address>', 'flat images: load address and entry point (default 0x1000)', intArg)
    .option('--memory <size>', 'guest RAM, e.g. 16M (default 16M; 256M for Linux)', sizeArg)
    .option('--cmdline <text>', 'kernel command line (Linux, multiboot)')
    .option('--timeout <ms>', 'stop the guest after this many milliseconds (exit 11)', intArg)
    .option('--serial', 'attach a 16550 UART at 0x3f8 and stream its output to stdout')
    .option('--qemu-exit', "debug-exit port 0xf4 as QEMU's isa-debug-exit: code (v << 1) | 1 (default: the value written)")
    .option('--policy <file.json>', 'port/MSR policy for the monitor (see @tsvm/monitor compilePolicy)')
    .option('--report <file>', 'write the cost report: .svg chart, .json, or text for any other name')
    .option('--audit <file>', "write the monitor's hash-chained audit log (JSON lines)")
    .option('--gdb <[host]:port>', 'start stopped and serve the gdb remote protocol there (port 0: any free port, printed); gdb drives the run', gdbArg)
    .option('--progress', 'a progress line on stderr every second (default when stderr is a TTY)')
    .option('--no-progress', 'no progress lines')
    .addOption(new Option('--kvm-device <path>', 'KVM device to open').default(undefined).hideHelp())
    .action(async (image: string, f: RunFlags) => {
      setStatus(await runImage({ ...runOptions(image, f, process.stderr.isTTY === true), stderr: err }));
    });

  p.command('calibrate')
    .description("measure which monitor mechanism works at which CPL here and what it costs; cache the table")
    .option('--quick', 'fewer iterations (about 5 s)')
    .option('--force', "measure even if this host's table is cached")
    .option('--cache <file>', 'cache file (default ~/.cache/tsvm/calibration.json)')
    .option('--progress', 'a progress line on stderr every second (the default)')
    .option('--no-progress', 'no progress lines')
    .addOption(new Option('--kvm-device <path>', 'KVM device to open').hideHelp())
    .action(async (f: { quick?: boolean; force?: boolean; cache?: string; progress?: boolean; kvmDevice?: string }) => {
      const { lines } = await runCalibrate({ ...f, progress: f.progress !== false, stderr: err });
      out(lines.join('\n'));
      setStatus(EXIT.ok);
    });

  const policy = p.command('policy').description('policy files');
  policy.command('check')
    .description('schema-check a port/MSR or flow policy (errors name the JSON path); analyse a flow policy against a topology')
    .argument('<file>', 'policy JSON')
    .option('--topology <file>', 'flow policies: the topology to analyse against')
    .action((file: string, f: { topology?: string }) => {
      const r = checkPolicy(file, f.topology);
      out(r.lines.join('\n'));
      setStatus(EXIT.ok);
    });

  const audit = p.command('audit').description('audit logs');
  audit.command('verify')
    .description('verify a hash-chained audit log: OK with line count and head hash, or the first bad line (exit 1)')
    .argument('<file>', 'audit log (JSON lines)')
    .option('--head <hash>', 'the head hash kept elsewhere (detects a truncated tail)')
    .action((file: string, f: { head?: string }) => {
      const r = verifyAuditFile(file, f.head);
      out(r.line);
      setStatus(r.status);
    });
  return p;
}

