/**
 * The calibration cache: one JSON file holding a table per host identity (kernel, CPU model,
 * KVM flavour), by default `~/.cache/tsvm/calibration.json` (`$XDG_CACHE_HOME` honoured). A
 * table measured on another kernel, CPU or flavour is never reused. Writes are atomic
 * (temporary file + rename) so a crash never leaves half a file.
 * @module
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { TsvmError } from '@tsvm/core';
import { hostKey } from './host.js';
import { MECHANISMS, type CalibrationTable, type HostIdentity, type MechanismResult } from './table.js';

/**
 * The default cache file: `$TSVM_CACHE_DIR/calibration.json` when that is set (the test suite
 * sets it to a fresh directory per run, so no test reads what a user's or an earlier run's
 * `calibrate()` left behind), else `$XDG_CACHE_HOME/tsvm/calibration.json`, else
 * `~/.cache/tsvm/calibration.json`.
 */
export function defaultCachePath(): string {
  const own = process.env['TSVM_CACHE_DIR'];
  if (own) return join(own, 'calibration.json');
  const base = process.env['XDG_CACHE_HOME'] || join(homedir(), '.cache');
  return join(base, 'tsvm', 'calibration.json');
}

interface CacheFile { version: 1; tables: Record<string, CalibrationTable> }

/**
 * Revision of the calibration experiments and of the mechanisms they exercise: bumped when a
 * fix changes what works (2: probes resume through a trampoline; 3: coalescing counts delivered writes; 4: the coalesced ring is read from page 2), so tables measured
 * by older code are re-measured instead of trusted.
 */
const EXPERIMENTS_REVISION = 9; // 5: marginal prices (n vs 2n runs); 6: never 0 for a working mechanism; 7: probes run the hooked instruction out of line (one exit per hit); 8: dirty-ring-harvest; 9: runs timed on the thread's CPU clock (Stop.cpuMs), mmio-dispatch, probe-in-place, runner-exit
const cacheKey = (h: HostIdentity): string => `r${EXPERIMENTS_REVISION}|${hostKey(h)}`;

function isResult(v: unknown): v is MechanismResult {
  if (typeof v !== 'object' || v === null) return false;
  const r = v as Record<string, unknown>;
  return (r['works'] === true && typeof r['ns'] === 'number' && r['ns'] >= 0) || (r['works'] === false && typeof r['failure'] === 'string');
}

/**
 * Checks that `v` is a complete, well-formed table.
 * @throws TsvmError (`TSVM_CALIBRATION_FORMAT`) naming the first bad field.
 */
export function validateTable(v: unknown): CalibrationTable {
  const bad = (path: string, why: string): never => { throw new TsvmError('TSVM_CALIBRATION_FORMAT', `calibration table ${path}: ${why}`); };
  if (typeof v !== 'object' || v === null) return bad('$', 'must be an object');
  const t = v as Record<string, unknown>;
  if (t['version'] !== 1) bad('version', `must be 1, got ${JSON.stringify(t['version'])}`);
  const h = t['host'] as Record<string, unknown> | undefined;
  if (!h || typeof h['kernel'] !== 'string' || typeof h['cpu'] !== 'string' || typeof h['flavour'] !== 'string') bad('host', 'must have kernel, cpu and flavour strings');
  if (t['source'] !== 'measured' && t['source'] !== 'assumed') bad('source', "must be 'measured' or 'assumed'");
  const results = t['results'] as Record<string, unknown> | undefined;
  if (typeof results !== 'object' || results === null) return bad('results', 'must be an object');
  for (const id of MECHANISMS) {
    const r = results[id] as Record<string, unknown> | undefined;
    if (!r || !isResult(r['cpl0']) || !isResult(r['cpl3'])) bad(`results.${id}`, 'must have cpl0 and cpl3 results ({works:true,ns} or {works:false,failure})');
  }
  return v as CalibrationTable;
}

function readCache(path: string): CacheFile {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    return { version: 1, tables: {} };
  }
  try {
    const f = JSON.parse(text) as CacheFile;
    if (f.version === 1 && typeof f.tables === 'object' && f.tables !== null) return f;
  } catch { /* a corrupt cache is rebuilt, not fatal */ }
  return { version: 1, tables: {} };
}

/** The cached table for `host`, or undefined (missing, other host, or malformed). */
export function loadCalibration(host: HostIdentity, options: { path?: string } = {}): CalibrationTable | undefined {
  const t = readCache(options.path ?? defaultCachePath()).tables[cacheKey(host)];
  if (!t) return undefined;
  try {
    const table = validateTable(t);
    return hostKey(table.host) === hostKey(host) ? table : undefined;
  } catch {
    return undefined;
  }
}

/** Stores `table` under its host identity, keeping other hosts' tables. */
export function saveCalibration(table: CalibrationTable, options: { path?: string } = {}): string {
  validateTable(table);
  const path = options.path ?? defaultCachePath();
  const file = readCache(path);
  file.tables[cacheKey(table.host)] = table;
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(file, null, 2)}\n`);
  renameSync(tmp, path);
  return path;
}
