/**
 * Boots a stock distribution Linux kernel through PVH on tsvm and, side by side, on QEMU
 * (`-M microvm`), printing the console live and then both timelines.
 *
 *   pnpm example:linux [--no-qemu] [--timeout SECONDS] [--slice-ms MS] [--cmdline 'ARGS'] [--append 'MORE ARGS'] [--no-acpi]
 *
 * The kernel is Debian's `linux-image-cloud-amd64` (from `/boot`, from `TSVM_LINUX_KERNEL`, or
 * downloaded with `apt-get download` into `~/.cache/tsvm/kernels`). Its `vmlinux` is unpacked
 * on the host ({@link extractVmlinux}) and entered at its PVH note: no firmware, no in-guest
 * decompression. The machine is a minimal PC: 16550 COM1 on IRQ 4, an i8042 with nothing plugged
 * in (IRQ 1/12; its reset line ends the run), CMOS RTC, the in-kernel PIC/IOAPIC/PIT described by
 * ACPI (MADT) and an MP table, ACPI fixed hardware behind a FADT (`AcpiPm`: PM timer, PM1
 * registers at port 0x600, SCI on IRQ 9; a guest `poweroff` is a `poweroff` stop, exit 0; S3 a
 * `suspend` stop, not resumed here), and explicitly *unpopulated* ranges for the
 * hardware Linux probes (see `PC_PROBED_RANGES`); any other port or MMIO access stops the run
 * as an `unhandled-exit` naming it.
 *
 * Where KVM runs the guest natively (VMX, SVM) the kernel boots until it finds no root
 * filesystem and panics; `panic=-1` makes it reboot at once, which both VMMs report as their
 * end (`reset` here, `-no-reboot` for QEMU). On a PVM host ring-0 code runs through KVM's
 * instruction emulator, which fails on the kernel's `int3` self-test: tsvm reports that as an
 * `internal-error` stop.
 * @module
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Backend, extractVmlinux, LEGACY_BIOS_HOLE, loadPvh, Machine, type Stop, writeAcpiTables, writeMpTable } from '@tsvm/core';
import { AcpiPm, CmosRtc, I8042, Uart16550, Unpopulated } from '@tsvm/devices';
import { isMain, runCli } from './support.js';

/**
 * The command line of the issue's QEMU reference run, plus `panic=-1` (reboot at once, so both
 * VMMs end where the kernel gives up).
 */
export const DEFAULT_CMDLINE = 'console=ttyS0 earlyprintk=serial,ttyS0,115200 clearcpuid=cx16 noxsave panic=-1';

/** One console line and when it was complete, in ms since the VMM started. */
export interface ConsoleLine {
  /** Milliseconds since start. */
  readonly ms: number;
  /** The line, without its newline and without the kernel's `[ seconds ]` prefix. */
  readonly text: string;
}

/** What one VMM printed and how it ended. */
export interface BootTimeline {
  /** `tsvm` or `qemu`. */
  readonly vmm: string;
  /** Console lines in order. */
  readonly lines: ConsoleLine[];
  /** How the run ended, in words (a tsvm stop reason, or QEMU's exit status). */
  readonly outcome: string;
  /** Wall time of the whole run. */
  readonly elapsedMs: number;
  /** KVM flavour or QEMU accelerator used. */
  readonly accel: string;
}

/** Options of the two boot functions. */
export interface BootOptions {
  /** Kernel command line. Default {@link DEFAULT_CMDLINE}. */
  readonly cmdline?: string;
  /** Guest RAM in MiB. Default 512. */
  readonly memoryMiB?: number;
  /** Give up after this many ms. Default 300 000. */
  readonly timeoutMs?: number;
  /**
   * Give tsvm's guest ACPI: tables (MADT, and a FADT with DSDT and FACS) and the `AcpiPm`
   * device the FADT points at. `false`: no ACPI at all (no tables, no device). Default true.
   */
  readonly acpi?: boolean;
  /** tsvm's run-loop slice in ms (how often Node gets control back). Default 10. */
  readonly sliceMs?: number;
  /** Called with each raw console chunk as it arrives (live output). */
  readonly echo?: (chunk: Uint8Array) => void;
  /** tsvm's backend (tests: a `MockBackend`). Default: KVM. */
  readonly backend?: Backend;
  /** Called with tsvm's machine once the kernel is loaded and every device attached, before it runs (tests). */
  readonly onReady?: (vm: Machine) => void;
}

/** Splits a byte stream into timestamped lines. */
export class LineClock {
  readonly #t0: number;
  readonly #decoder = new TextDecoder();
  #partial = '';
  /** Completed lines. */
  readonly lines: ConsoleLine[] = [];

  /** @param t0 - `performance.now()` at the start. */
  constructor(t0: number) {
    this.#t0 = t0;
  }

  /** Feeds a chunk. */
  push(chunk: Uint8Array): void {
    const parts = (this.#partial + this.#decoder.decode(chunk, { stream: true })).split('\n');
    this.#partial = parts.pop() ?? '';
    const ms = performance.now() - this.#t0;
    for (const p of parts) this.lines.push({ ms, text: normaliseLine(p) });
  }

  /** Flushes an unterminated last line. */
  end(): ConsoleLine[] {
    if (this.#partial.trim() !== '') this.lines.push({ ms: performance.now() - this.#t0, text: normaliseLine(this.#partial) });
    this.#partial = '';
    return this.lines;
  }
}

/** Drops `\r` and the kernel's `[    0.123456] ` timestamp, which differ between runs. */
export function normaliseLine(s: string): string {
  return s.replace(/\r/g, '').replace(/^\[\s*\d+\.\d+\]\s?/, '').trimEnd();
}

/**
 * A bzImage of Debian's cloud kernel: `TSVM_LINUX_KERNEL`, else `/boot/vmlinuz-*-cloud-amd64`,
 * else one downloaded with `apt-get download` (no install) into `~/.cache/tsvm/kernels`.
 * @throws Error - when none is present and apt cannot fetch one (the message says why).
 */
export function findOrFetchKernel(): string {
  const env = process.env.TSVM_LINUX_KERNEL;
  if (env) return env;
  const boot = existsSync('/boot') ? readdirSync('/boot').filter((n) => /^vmlinuz-.*cloud-amd64$/.test(n)).sort() : [];
  const last = boot[boot.length - 1];
  if (last !== undefined) return `/boot/${last}`;
  const cache = join(homedir(), '.cache', 'tsvm', 'kernels');
  const cached = existsSync(join(cache, 'boot')) ? readdirSync(join(cache, 'boot')).filter((n) => n.startsWith('vmlinuz-')).sort() : [];
  const hit = cached[cached.length - 1];
  if (hit !== undefined) return join(cache, 'boot', hit);
  const sh = (cmd: string, args: string[], cwd?: string): string => {
    const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || r.error?.message || `status ${r.status}`}`);
    return r.stdout;
  };
  sh('apt-get', ['update', '-qq']);
  const deps = sh('apt-cache', ['depends', 'linux-image-cloud-amd64']);
  const pkg = /Depends: (linux-image-[0-9][^\s]*)/.exec(deps)?.[1];
  if (pkg === undefined) throw new Error('cannot resolve the kernel package behind linux-image-cloud-amd64');
  mkdirSync(cache, { recursive: true });
  const work = join(tmpdir(), `tsvm-kernel-${process.pid}`);
  mkdirSync(work, { recursive: true });
  try {
    sh('apt-get', ['download', '-qq', pkg], work);
    const deb = readdirSync(work).find((n) => n.endsWith('.deb'));
    if (deb === undefined) throw new Error(`apt-get download ${pkg} produced no .deb`);
    sh('dpkg-deb', ['-x', join(work, deb), cache]);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  const got = readdirSync(join(cache, 'boot')).find((n) => n.startsWith('vmlinuz-'));
  if (got === undefined) throw new Error(`${pkg} has no /boot/vmlinuz-*`);
  return join(cache, 'boot', got);
}

/** Unpacks `vmlinux` from a bzImage once and keeps it next to the cache (QEMU needs a file). */
export function vmlinuxFile(bzImagePath: string): { path: string; bytes: Uint8Array } {
  const dir = join(homedir(), '.cache', 'tsvm', 'kernels');
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `vmlinux-${bzImagePath.replace(/[^A-Za-z0-9.-]/g, '_')}`);
  if (existsSync(path)) return { path, bytes: new Uint8Array(readFileSync(path)) };
  const { vmlinux } = extractVmlinux(new Uint8Array(readFileSync(bzImagePath)));
  writeFileSync(path, vmlinux);
  return { path, bytes: vmlinux };
}

/** Boots `vmlinux` through PVH on tsvm. */
export async function bootTsvm(vmlinux: Uint8Array, options: BootOptions = {}): Promise<BootTimeline & { stop: Stop }> {
  const t0 = performance.now();
  const clock = new LineClock(t0);
  await using vm = await Machine.create({ memory: (options.memoryMiB ?? 512) * 1024 * 1024, irqchip: true, name: 'linux', ...(options.backend ? { backend: options.backend } : {}) });
  const uart = new Uart16550({ irq: vm.irqLine(Uart16550.defaultIrq) });
  uart.onOutput((b) => { clock.push(b); options.echo?.(b); });
  vm.attachDevice(uart);
  vm.attachDevice(new I8042({ kbdIrq: vm.irqLine(I8042.kbdIrq), auxIrq: vm.irqLine(I8042.auxIrq) }));
  vm.attachDevice(new CmosRtc());
  for (const d of Unpopulated.ranges()) vm.attachDevice(d);
  const reserved = vm.hostReserved();
  // Tell the kernel about the CPU and the in-kernel I/O APIC (ISA IRQ n → pin n), so it runs
  // its APIC in symmetric I/O mode as under QEMU rather than "virtual wire, no configuration":
  // an MP table for kernels that parse one, a MADT (via the PVH RSDP pointer) for the rest.
  writeMpTable(vm.memory);
  // The FADT gives the kernel a PM timer and the S5 state its `poweroff` enters; AcpiPm must
  // answer at the PM base the FADT names, or the kernel's first PM-timer read is unhandled.
  const acpi = options.acpi === false ? undefined : writeAcpiTables(vm.memory, { power: true });
  const { power, facsAddress } = acpi ?? {};
  if (power !== undefined && facsAddress !== undefined) {
    const pm = new AcpiPm({ sci: vm.irqLine(power.sciIrq), wakingVector: () => BigInt(vm.memory.readUint(facsAddress + 12, 4)) });
    vm.attachDevice(pm.mappings(power.pmBase));
  }
  const loaded = loadPvh(vm.memory, vmlinux, {
    cmdline: options.cmdline ?? DEFAULT_CMDLINE, reserved: [LEGACY_BIOS_HOLE, ...reserved], avoid: reserved,
    ...(acpi ? { rsdpAddress: acpi.rsdpAddress } : {}),
  });
  vm.enter(loaded.entryState);
  options.onReady?.(vm);
  const stop = await vm.run({ timeout: options.timeoutMs ?? 300_000, ...(options.sliceMs !== undefined ? { sliceMs: options.sliceMs } : {}) });
  uart.flush();
  return { vmm: 'tsvm', lines: clock.end(), outcome: describeStop(stop), elapsedMs: performance.now() - t0, accel: `kvm (${vm.capabilities.flavour})`, stop };
}

/** One line describing a stop. */
export function describeStop(stop: Stop): string {
  switch (stop.reason) {
    case 'unhandled-exit': return `unhandled-exit: ${stop.message}`;
    case 'internal-error': return `internal-error: ${stop.message} at rip=0x${stop.rip.toString(16)}`;
    case 'exception': return `exception ${stop.vector} at rip=0x${stop.faultRip.toString(16)}`;
    case 'timeout': return `timeout at rip=0x${stop.rip.toString(16)}${stop.halted ? ' (vCPU halted, waiting for an interrupt)' : ''}`;
    default: return `${stop.reason} at rip=0x${stop.rip.toString(16)}`;
  }
}

/** Whether `qemu-system-x86_64` can run here. */
export function qemuAvailable(): boolean {
  return spawnSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' }).status === 0;
}

/** Boots the same `vmlinux` file on QEMU's microvm (KVM when `/dev/kvm` opens, else TCG). */
export async function bootQemu(vmlinuxPath: string, options: BootOptions = {}): Promise<BootTimeline> {
  let kvm = false;
  try { readFileSync('/dev/kvm', { flag: 'r' }); } catch (e) { kvm = (e as NodeJS.ErrnoException).code === 'EINVAL'; }
  const accel = kvm ? ['-accel', 'kvm', '-cpu', 'host,-arch-capabilities'] : ['-accel', 'tcg', '-cpu', 'max'];
  const args = [
    '-M', 'microvm', ...accel, '-m', `${options.memoryMiB ?? 512}M`, '-smp', '1',
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot', '-monitor', 'none',
    '-serial', 'stdio', '-kernel', vmlinuxPath, '-append', options.cmdline ?? DEFAULT_CMDLINE,
  ];
  const t0 = performance.now();
  const clock = new LineClock(t0);
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => { clock.push(b); options.echo?.(b); });
  child.stderr.on('data', (b: Buffer) => { stderr += b.toString(); });
  const timeoutMs = options.timeoutMs ?? 300_000;
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, timeoutMs);
  const status = await new Promise<string>((resolve) => {
    child.on('error', (e) => resolve(`failed to start: ${e.message}`));
    child.on('close', (code, sig) => resolve(code !== null ? `exit ${code}` : `signal ${sig}`));
  });
  clearTimeout(timer);
  const outcome = timedOut ? 'timeout' : stderr.trim() ? `${status}: ${stderr.trim().split('\n').slice(-2).join(' | ')}` : status;
  return { vmm: 'qemu', lines: clock.end(), outcome, elapsedMs: performance.now() - t0, accel: kvm ? 'kvm' : 'tcg' };
}

/** Landmarks of an early boot, in the order a kernel prints them. */
export const MILESTONES: ReadonlyArray<{ readonly name: string; readonly re: RegExp }> = [
  { name: 'banner', re: /^Linux version / },
  { name: 'command line', re: /^Command line: / },
  { name: 'e820 / memory map', re: /^BIOS-provided physical RAM map|^BIOS-e820:/ },
  { name: 'clocksource / tsc', re: /^tsc: |^clocksource: / },
  { name: 'Memory:', re: /^Memory: / },
  { name: 'x86/fpu', re: /^x86\/fpu: / },
  { name: 'serial driver', re: /^Serial: 8250/ },
  { name: 'root fs / panic', re: /VFS: Unable to mount root|Kernel panic/ },
];

/** First time (ms) a line matched, per milestone. */
export function milestoneTimes(lines: readonly ConsoleLine[]): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of MILESTONES) {
    const hit = lines.find((l) => m.re.test(l.text));
    if (hit) out.set(m.name, hit.ms);
  }
  return out;
}

/** The last non-empty line. */
export function lastLine(lines: readonly ConsoleLine[]): ConsoleLine | undefined {
  for (let i = lines.length - 1; i >= 0; i--) if ((lines[i] as ConsoleLine).text.trim() !== '') return lines[i];
  return undefined;
}

/** The side-by-side table of two timelines. */
export function renderTimelines(a: BootTimeline, b: BootTimeline | undefined): string {
  const ta = milestoneTimes(a.lines);
  const tb = b ? milestoneTimes(b.lines) : new Map<string, number>();
  const sec = (v: number | undefined): string => (v === undefined ? '—' : `${(v / 1000).toFixed(2)} s`);
  const rows = [['milestone', `${a.vmm} [${a.accel}]`, b ? `${b.vmm} [${b.accel}]` : '(not run)']];
  for (const m of MILESTONES) rows.push([m.name, sec(ta.get(m.name)), b ? sec(tb.get(m.name)) : '']);
  rows.push(['console lines', String(a.lines.length), b ? String(b.lines.length) : '']);
  rows.push(['ended', `${sec(a.elapsedMs)}: ${a.outcome}`, b ? `${sec(b.elapsedMs)}: ${b.outcome}` : '']);
  const w = [0, 1, 2].map((i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  const fmt = (r: string[]): string => r.map((c, i) => c.padEnd(w[i] as number)).join('  ');
  const out = [fmt(rows[0] as string[]), w.map((n) => '-'.repeat(n)).join('  '), ...rows.slice(1).map(fmt)];
  out.push(`last line ${a.vmm}: ${lastLine(a.lines)?.text ?? '(none)'}`);
  if (b) out.push(`last line ${b.vmm}: ${lastLine(b.lines)?.text ?? '(none)'}`);
  return out.join('\n');
}

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  const ti = argv.indexOf('--timeout');
  const timeoutMs = ti >= 0 ? Number(argv[ti + 1]) * 1000 : 300_000;
  const si = argv.indexOf('--slice-ms');
  const sliceMs = si >= 0 ? Number(argv[si + 1]) : undefined;
  const ai = argv.indexOf('--append');
  const ci = argv.indexOf('--cmdline');
  const base = ci >= 0 ? argv[ci + 1] ?? '' : DEFAULT_CMDLINE;
  const cmdline = ai >= 0 ? `${base} ${argv[ai + 1] ?? ''}` : base;
  const bz = findOrFetchKernel();
  const { path, bytes } = vmlinuxFile(bz);
  console.log(`# kernel ${bz} (vmlinux ${(bytes.length / 2 ** 20).toFixed(1)} MiB, PVH)\n# --- tsvm console ---`);
  const echo = (c: Uint8Array): void => { process.stdout.write(c); };
  const t = await bootTsvm(bytes, { timeoutMs, echo, cmdline, acpi: !argv.includes('--no-acpi'), ...(sliceMs !== undefined ? { sliceMs } : {}) });
  let q: BootTimeline | undefined;
  if (!argv.includes('--no-qemu')) {
    if (qemuAvailable()) {
      console.log('\n# --- qemu console ---');
      q = await bootQemu(path, { timeoutMs, echo, cmdline });
    } else {
      console.log('\n# qemu-system-x86_64 not found (apt-get install qemu-system-x86): no side-by-side run');
    }
  }
  console.log(`\n${renderTimelines(t, q)}`);
  return t.stop.reason === 'timeout' || t.stop.reason === 'unhandled-exit' || t.stop.reason === 'backend-error' ? 1 : 0;
}

if (isMain(import.meta.url)) await runCli('tsvm linux', main);
