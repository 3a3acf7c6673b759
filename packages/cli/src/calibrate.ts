/**
 * `tsvm calibrate`: measure which monitor mechanism works at which CPL on this host and what one
 * event costs (`calibrate()` of `@tsvm/monitor/calibrate`), with a progress line on stderr, and
 * say where the table was cached.
 * @module
 */
import { KvmBackend, Machine, type MachineOptions } from '@tsvm/core';
import { formatNs, type CalibrationTable } from '@tsvm/monitor';
import { calibrate, defaultCachePath } from '@tsvm/monitor/calibrate';

/** Options of {@link runCalibrate}. */
export interface CalibrateCommandOptions {
  /** Fewer iterations (about 5 s). */
  readonly quick?: boolean;
  /** Measure even if this host's table is cached. */
  readonly force?: boolean;
  /** Cache file (default: the monitor's default cache path). */
  readonly cache?: string;
  /** A progress line every second. */
  readonly progress?: boolean;
  /** KVM device (tests). */
  readonly kvmDevice?: string;
  /** Where status lines go. */
  readonly stderr?: (line: string) => void;
}

/** Runs the calibration. @returns the table and the lines describing it. */
export async function runCalibrate(o: CalibrateCommandOptions): Promise<{ table: CalibrationTable; lines: string[] }> {
  const err = o.stderr ?? ((l: string) => process.stderr.write(`${l}\n`));
  const path = o.cache ?? defaultCachePath();
  const backend = o.kvmDevice === undefined ? undefined : new KvmBackend(o.kvmDevice);
  // calibrate() reports nothing while it runs; each experiment creates a machine, so counting
  // the factory's calls is the progress there is.
  let runs = 0;
  const factory = (m: MachineOptions): Promise<Machine> => { runs++; return Machine.create(backend ? { ...m, backend } : m); };
  const t0 = Date.now();
  const timer = o.progress ? setInterval(() => err(`tsvm: calibrating, ${((Date.now() - t0) / 1000).toFixed(0)} s, ${runs} guest runs`), 1000) : undefined;
  timer?.unref();
  let table: CalibrationTable;
  try {
    table = await calibrate({ cachePath: path, machineFactory: factory, ...(o.quick ? { quick: true } : {}), ...(o.force ? { force: true } : {}) });
  } finally {
    if (timer) clearInterval(timer);
  }
  // The table is dated when its measurement ends, inside this call when it is fresh (ISO times
  // have millisecond resolution, so a table from an earlier process is always older than t0).
  const fresh = Date.parse(table.createdAt) >= t0;
  const lines = [
    fresh
      ? `calibrated ${table.host.flavour} host in ${((Date.now() - t0) / 1000).toFixed(1)} s (${runs} guest runs${table.quick ? ', quick' : ''}); cached in ${path}`
      : `this host's table is already cached in ${path} (measured ${table.createdAt}); --force measures again`,
  ];
  for (const [m, r] of Object.entries(table.results)) {
    const cell = (x: typeof r.cpl0): string => (x.works ? formatNs(x.ns) : `— (${x.failure})`);
    lines.push(`  ${m.padEnd(18)} CPL0 ${cell(r.cpl0).padEnd(12)} CPL3 ${cell(r.cpl3)}`);
  }
  return { table, lines };
}
