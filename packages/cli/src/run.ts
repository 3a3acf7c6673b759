/**
 * `tsvm run IMAGE`: load an image into a fresh machine, optionally under a port/MSR policy, run
 * it, and turn the stop into an exit status ({@link stopStatus}). Everything it opens (the
 * machine, the audit file, timers, the SIGINT handler) is closed before it returns.
 * @module
 */
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { createServer } from 'node:net';
import { KvmBackend, Machine, type Access, type AccessSize, type AcpiResult, type Backend, type CpuMode, type Device, type Stop } from '@tsvm/core';
import { AcpiPm, CmosRtc, DebugExit, I8042, Uart16550, Unpopulated } from '@tsvm/devices';
import { Monitor, applyPolicy, formatReport, gdbServer, renderJson, renderSvg, report, type GdbServer } from '@tsvm/monitor';
import { CliError, EXIT, describeStop, stopStatus } from './exit-codes.js';
import { checkImage, detectFormat, loadImage, type ImageFormat } from './image.js';
import { readPolicyFile } from './policy-check.js';

/** Options of {@link runImage} (what the command line said, parsed). */
export interface RunCommandOptions {
  /** Image file. */
  readonly image: string;
  /** Forced format (detected from the bytes when absent). */
  readonly format?: ImageFormat;
  /** Flat images: CPU mode (default real). */
  readonly mode?: CpuMode;
  /** Flat images: ring (default 0). */
  readonly ring?: 0 | 3;
  /** Flat images: load address (default 0x1000). */
  readonly at?: number;
  /** Guest RAM in bytes (default 16 MiB; 256 MiB for a Linux image). */
  readonly memory?: number;
  /** Kernel command line (Linux, multiboot). */
  readonly cmdline?: string;
  /** Stop after this many ms. */
  readonly timeout?: number;
  /** Attach a 16550 UART at 0x3f8 and stream what the guest prints to `stdout`. */
  readonly serial?: boolean;
  /** Debug-exit semantics: `raw` (the value written is the code) or `qemu` (`(v << 1) | 1`). */
  readonly debugExit?: 'raw' | 'qemu';
  /** Port/MSR policy file. */
  readonly policy?: string;
  /** Cost report file (`.svg` or `.json`; anything else gets the text table). */
  readonly report?: string;
  /** Audit log file (hash-chained JSON lines). */
  readonly audit?: string;
  /** `[host, port]` of `--gdb`. */
  readonly gdb?: { readonly host: string; readonly port: number };
  /** A progress line on stderr every second. */
  readonly progress?: boolean;
  /** KVM device (tests: a path that does not exist stands for a host without KVM). */
  readonly kvmDevice?: string;
  /** The backend to run on (tests: a `MockBackend`); overrides `kvmDevice`. */
  readonly backend?: Backend;
  /** Called with the machine once the image is loaded and every device attached, before it runs (tests). */
  readonly onReady?: (vm: Machine) => void;
  /** Where the guest's serial output goes. */
  readonly stdout?: (bytes: Uint8Array) => void;
  /** Where status lines go. */
  readonly stderr?: (line: string) => void;
}

/** The debug-exit port with the value written as the code (0 is success, as for a process). */
class RawDebugExit implements Device {
  readonly name = 'debug-exit';
  read(_o: number, size: AccessSize): number { return size === 4 ? 0xffffffff : (1 << (size * 8)) - 1; }
  write(_o: number, value: number, _s: AccessSize, access: Access): void { access.requestStop({ reason: 'debug-exit', code: value & 0xff }); }
}

/**
 * Attaches the ACPI fixed hardware the FADT of `acpi` promises: an `AcpiPm` at its PM base,
 * raising the SCI on the I/O APIC line the tables name, and reading the FACS waking vector for
 * a `suspend` stop. Without it a kernel that read the FADT stops at its first PM-timer read.
 * @returns the device, or undefined when the tables have no FADT.
 */
export function attachAcpiPm(vm: Machine, acpi: AcpiResult): AcpiPm | undefined {
  const { power, facsAddress } = acpi;
  if (power === undefined || facsAddress === undefined) return undefined;
  const pm = new AcpiPm({ sci: vm.irqLine(power.sciIrq), wakingVector: () => BigInt(vm.memory.readUint(facsAddress + 12, 4)) });
  vm.attachDevice(pm.mappings(power.pmBase));
  return pm;
}

function readImage(path: string): Uint8Array {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new CliError(EXIT.noFile, `cannot read image ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
}

/** Fails with `portInUse` when nothing may listen on `host:port` now. */
export async function checkPortFree(host: string, port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const s = createServer();
    s.once('error', (e: NodeJS.ErrnoException) => reject(new CliError(e.code === 'EADDRINUSE' ? EXIT.portInUse : EXIT.usage, `--gdb ${host}:${port}: ${e.code === 'EADDRINUSE' ? 'port already in use' : e.message}`)));
    s.listen(port, host, () => s.close(() => resolve()));
  });
}

/** Whether this build's `@tsvm/monitor` exports a gdb stub (`gdbServer`), found at run time. */
export async function gdbStubAvailable(): Promise<boolean> {
  const mod = (await import('@tsvm/monitor')) as Record<string, unknown>;
  return typeof mod['gdbServer'] === 'function';
}

/**
 * `--gdb`: the machine starts stopped and gdb drives it (`continue`, `stepi`, Ctrl-C). When the
 * guest ends under gdb, that stop is the result; when gdb detaches or disconnects first, the
 * guest runs on to its end as without gdb (as a detached process does). SIGINT ends the wait.
 */
async function underGdb(vm: Machine, monitor: Monitor, at: { readonly host: string; readonly port: number }, signal: AbortSignal, err: (line: string) => void, timeout: number | undefined): Promise<Stop> {
  const server: GdbServer = await gdbServer(vm, { host: at.host, port: at.port, monitor });
  try {
    err(`tsvm: waiting for gdb on ${server.address.host}:${server.address.port} (target remote ${server.address.host}:${server.address.port})`);
    let final: Stop | undefined;
    server.events.on('stop', (stop, byGdb) => { if (!byGdb) final = stop; });
    await new Promise<void>((resolve) => {
      const done = (): void => { signal.removeEventListener('abort', done); resolve(); };
      server.events.on('disconnect', () => { if (final === undefined) err('tsvm: gdb detached; the guest runs on'); done(); });
      server.events.on('stop', () => { if (final !== undefined) done(); });
      signal.addEventListener('abort', done, { once: true });
    });
    if (final) return final;
    await server.close(); // removes gdb's breakpoints before the guest runs on
    return await vm.run({ signal, ...(timeout === undefined ? {} : { timeout }) });
  } finally {
    await server.close();
  }
}

/** Runs the image. @returns the exit status (errors before the run throw {@link CliError} or a `TsvmError`). */
export async function runImage(o: RunCommandOptions): Promise<number> {
  const err = o.stderr ?? ((l: string) => process.stderr.write(`${l}\n`));
  const out = o.stdout ?? ((b: Uint8Array) => process.stdout.write(b));
  // Everything that can be wrong with the input is checked before a machine exists.
  const bytes = readImage(o.image);
  const format = o.format ?? detectFormat(bytes);
  checkImage(bytes, format);
  if (format !== 'flat' && (o.ring ?? 0) !== 0) throw new CliError(EXIT.usage, `--ring 3 applies to flat images only; a ${format} image starts at ring 0`);
  const policy = o.policy === undefined ? undefined : readPolicyFile(o.policy);
  if (policy?.kind === 'flow') throw new CliError(EXIT.usage, `--policy ${o.policy}: a flow policy governs connections between machines; tsvm run runs one machine without vsock, give a port/MSR policy`);
  if (o.gdb) {
    await checkPortFree(o.gdb.host, o.gdb.port);
    if (!(await gdbStubAvailable())) throw new CliError(EXIT.gdbUnavailable, 'gdb stub not available in this build');
  }

  let backend: Backend | undefined = o.backend;
  if (backend === undefined && o.kvmDevice !== undefined) backend = new KvmBackend(o.kvmDevice);
  const linux = format === 'linux';
  const memory = o.memory ?? (linux ? 256 : 16) * 1024 * 1024;
  const vm = await Machine.create({ memory, name: 'tsvm-run', irqchip: linux, ...(backend ? { backend } : {}) });
  let auditFd: number | undefined;
  let mon: Monitor | undefined;
  let uart: Uart16550 | undefined;
  let timer: NodeJS.Timeout | undefined;
  const abort = new AbortController();
  const onSigint = (): void => abort.abort();
  try {
    if (linux) {
      // The minimal PC a kernel probes (see the Linux example): an i8042 with nothing plugged in,
      // the CMOS clock, and the ranges it probes marked unpopulated rather than unhandled.
      vm.attachDevice(new I8042({ kbdIrq: vm.irqLine(I8042.kbdIrq), auxIrq: vm.irqLine(I8042.auxIrq) }));
      vm.attachDevice(new CmosRtc());
      for (const d of Unpopulated.ranges()) vm.attachDevice(d);
    }
    const loaded = loadImage(vm, bytes, { format, mode: o.mode ?? 'real', ring: o.ring ?? 0, at: o.at ?? 0x1000, ...(o.cmdline === undefined ? {} : { cmdline: o.cmdline }) });
    // A Linux guest's `poweroff` writes S5 to PM1a_CNT: a `poweroff` stop, exit 0.
    if (loaded.acpi) attachAcpiPm(vm, loaded.acpi);
    if (o.serial) {
      uart = new Uart16550({ sink: (b) => out(b), ...(linux ? { irq: vm.irqLine(Uart16550.defaultIrq) } : {}) });
      vm.attachDevice(uart);
    }
    vm.attachDevice(o.debugExit === 'qemu' ? new DebugExit() : [{ range: { port: DebugExit.defaultPort, size: 1 }, device: new RawDebugExit() }]);
    if (policy || o.report !== undefined || o.audit !== undefined || o.gdb) {
      if (o.audit !== undefined) {
        try { auditFd = openSync(o.audit, 'w'); } catch (e) { throw new CliError(EXIT.noFile, `cannot write audit log ${o.audit}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`); }
      }
      const fd = auditFd;
      mon = new Monitor(vm, { name: 'tsvm-run', ...(fd === undefined ? {} : { audit: (line: string) => { writeSync(fd, `${line}\n`); } }) });
      if (policy) applyPolicy(mon, policy.doc);
      // gdb's breakpoints are hooks added and removed during the session: not sealed then.
      if (!o.gdb) mon.seal();
    }
    o.onReady?.(vm);
    err(`tsvm: ${loaded.description}; ${memory / 1024 / 1024} MiB${policy ? `, policy ${o.policy}` : ''}`);
    if (o.progress) {
      const t0 = Date.now();
      timer = setInterval(() => err(`tsvm: running ${((Date.now() - t0) / 1000).toFixed(0)} s, ${vm.stats().total} exits`), 1000);
      timer.unref();
    }
    process.once('SIGINT', onSigint);
    const stop: Stop = o.gdb && mon
      ? await underGdb(vm, mon, o.gdb, abort.signal, err, o.timeout)
      : await vm.run({ signal: abort.signal, ...(o.timeout === undefined ? {} : { timeout: o.timeout }) });
    uart?.flush();
    const status = stopStatus(stop);
    err(`tsvm: ${describeStop(stop)}; ${stop.exits} exits in ${stop.elapsedMs.toFixed(1)} ms; exit ${status}`);
    if (mon && o.report !== undefined) {
      const r = report(mon, { run: stop });
      const text = o.report.endsWith('.svg') ? renderSvg(r, undefined) : o.report.endsWith('.json') ? renderJson(r) : formatReport(r);
      writeFileSync(o.report, text);
      err(`tsvm: cost report written to ${o.report}`);
    }
    if (mon?.audit && o.audit !== undefined) err(`tsvm: audit log ${o.audit}: ${mon.audit.length} lines, head ${mon.audit.head}`);
    return status;
  } finally {
    process.removeListener('SIGINT', onSigint);
    if (timer) clearInterval(timer);
    mon?.close();
    if (auditFd !== undefined) closeSync(auditFd);
    await vm.close();
  }
}
