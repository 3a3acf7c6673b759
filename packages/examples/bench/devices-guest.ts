/**
 * The device bench's guest side, seen from the host: building the one guest image both VMMs boot
 * (`bench/guest/`, plus the device tests' `lib.c`/`virtio.c`, compiled by path and not copied),
 * building the host reference helper (`devices-host.c`), writing the tagged bench disk, and
 * {@link SerialCapture}, which checks the guest's serial output byte by byte as it streams in and
 * parses the result line the guest prints (`TSVMBENCH end <mode> key=value ...`).
 * @module
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));
const GUEST = join(here, 'guest');
/** The device tests' freestanding guest library (read only: this bench must not edit it). */
const COMMON = join(here, '../../devices/test/guest');

/** Sector size of the bench disk. */
export const SECTOR = 512;
/** Must match `BENCH_DISK_MAGIC` in guest/bench-shared.h: sector `s` starts with `s ^ magic`. */
const DISK_MAGIC = 0x6b6c625f6d767374n;

const GUEST_CFLAGS = [
  '-O2', '-std=gnu11', '-Wall', '-Wextra', '-Werror',
  '-ffreestanding', '-fno-pic', '-fno-pie', '-no-pie', '-nostdlib', '-static',
  '-mno-red-zone', '-mgeneral-regs-only', '-fno-stack-protector', '-fno-asynchronous-unwind-tables', '-fcf-protection=none',
  // max-page-size 4 KiB keeps the segment (and so the multiboot header) in the file's first 8 KiB.
  '-Wl,--build-id=none', '-Wl,--no-warn-rwx-segments', '-Wl,-z,max-page-size=0x1000', `-Wl,-T,${join(GUEST, 'link.ld')}`,
  `-I${GUEST}`, `-I${COMMON}`,
];
const GUEST_SOURCES = [join(GUEST, 'start.S'), join(GUEST, 'bench.c'), join(COMMON, 'lib.c'), join(COMMON, 'virtio.c')];
const GUEST_INPUTS = [...GUEST_SOURCES, join(GUEST, 'bench-shared.h'), join(GUEST, 'link.ld'), join(COMMON, 'guest.h'), join(COMMON, 'virtio.h')];
const HOST_CFLAGS = ['-O2', '-Wall', '-Wextra', '-Werror'];
const HOST_SOURCE = join(here, 'devices-host.c');

/** The C compiler the bench uses (`$CC` or `cc`), or why there is none. */
export async function compiler(): Promise<{ cc: string; version: string } | { cc: string; error: string }> {
  const cc = process.env.CC ?? 'cc';
  try {
    const { stdout } = await run(cc, ['--version']);
    return { cc, version: stdout.split('\n')[0] ?? '' };
  } catch (e) {
    return { cc, error: `'${cc} --version' failed: ${(e as Error).message}` };
  }
}

/**
 * Compiles once per distinct input: the output lands in a temp directory under a hash of the
 * compiler, the flags and every input file, so repeated runs (and runs under tools/nested-kvm,
 * which shares the host's /tmp) reuse it. Returns the path of the built file.
 */
async function cachedBuild(cc: { cc: string; version: string }, name: string, flags: readonly string[], sources: readonly string[], inputs: readonly string[]): Promise<string> {
  const h = createHash('sha256');
  h.update(`${cc.cc}\0${cc.version}\0${flags.join(' ')}\0`);
  for (const f of inputs) h.update(`${f}\0`).update(readFileSync(f));
  const dir = join(tmpdir(), 'tsvm-bench-devices');
  mkdirSync(dir, { recursive: true });
  const out = join(dir, `${name}-${h.digest('hex').slice(0, 16)}`);
  if (existsSync(out)) return out;
  const work = mkdtempSync(join(dir, `${name}-build-`));
  try {
    const tmp = join(work, name);
    try {
      await run(cc.cc, [...flags, '-o', tmp, ...sources], { timeout: 240_000 });
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`building ${name} failed:\n${cc.cc} ${[...flags, '-o', tmp, ...sources].join(' ')}\n${err.stderr ?? err.message}`);
    }
    renameSync(tmp, out); // atomic: a concurrent identical build just wins or loses the race
    return out;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** Builds the bench guest (an ELF64 with a multiboot a.out-kludge header); returns its path. */
export function buildBenchGuest(cc: { cc: string; version: string }): Promise<string> {
  return cachedBuild(cc, 'bench-guest.elf', GUEST_CFLAGS, GUEST_SOURCES, GUEST_INPUTS);
}

/** Builds the host reference helper `devices-host`; returns its path. */
export function buildHostHelper(cc: { cc: string; version: string }): Promise<string> {
  return cachedBuild(cc, 'devices-host', HOST_CFLAGS, [HOST_SOURCE], [HOST_SOURCE, join(GUEST, 'bench-shared.h')]);
}

/**
 * Writes a disk image of `bytes` (a multiple of 4 KiB) in which every 512-byte sector starts with
 * its tag (guest/bench-shared.h), so the guest and the host reference can check what they read.
 */
export function writeBenchDisk(path: string, bytes: number): void {
  const CHUNK = 1 << 20;
  const buf = Buffer.alloc(CHUNK);
  for (let i = 8; i < CHUNK; i++) buf[i] = i & 0xff; // not zeros: no sparse-file or zero-page shortcut
  const fd = openSync(path, 'w');
  try {
    for (let off = 0; off < bytes; off += CHUNK) {
      const n = Math.min(CHUNK, bytes - off);
      for (let s = 0; s < n / SECTOR; s++) buf.writeBigUInt64LE(BigInt((off / SECTOR) + s) ^ DISK_MAGIC, s * SECTOR);
      writeSync(fd, buf, 0, n, off);
    }
  } finally {
    closeSync(fd);
  }
}

/** Payload byte `i` of the UART workload; must match `uart_byte()` in guest/bench.c. */
export function uartByte(i: number, line: number): number {
  if (line !== 0 && i % line === line - 1) return 0x0a;
  return 0x61 + (i % 26);
}

/** What {@link SerialCapture} expects of the stream. */
export interface CaptureOptions {
  /** The workload, as in `TSVMBENCH end <mode>`. */
  readonly mode: 'uart' | 'blk' | 'rng';
  /** UART payload length; the payload follows the line `TSVMBENCH begin uart`. 0 for none. */
  readonly payloadBytes: number;
  /** Payload line length (`line=` of the guest). */
  readonly line: number;
}

const BEGIN = 'TSVMBENCH begin uart\n';
const END_RE = /TSVMBENCH end (\w+)((?: \w+=\d+)*)\n/;
const ERROR_RE = /TSVMBENCH error ([^\n]*)/;
const KEEP = 4096;

/**
 * Consumes a guest's serial output in chunks (from tsvm's UART sink or QEMU's stdout pipe).
 * Text before the `begin` line (firmware banners under QEMU) is ignored; the payload is compared
 * with {@link uartByte} as it arrives, without keeping it; the text after it must hold the result
 * line. A dropped, duplicated or corrupted byte shifts or breaks the stream and is reported.
 */
export class SerialCapture {
  readonly #opts: CaptureOptions;
  #head = '';
  #tail = '';
  #seen = 0;
  #inPayload = false;
  #mismatch: string | undefined;
  /** Total bytes received. */
  received = 0;

  /** @param options - the mode and payload to expect. */
  constructor(options: CaptureOptions) {
    this.#opts = options;
  }

  /** Feeds one chunk. */
  push(chunk: Uint8Array): void {
    this.received += chunk.length;
    let at = 0;
    if (this.#opts.payloadBytes > 0 && !this.#inPayload && this.#seen === 0) {
      // Looking for the begin line; keep only a bounded head.
      const before = this.#head.length;
      this.#head += Buffer.from(chunk).toString('latin1');
      const b = this.#head.indexOf(BEGIN);
      if (b < 0) {
        if (this.#head.length > KEEP) this.#head = this.#head.slice(-KEEP);
        return;
      }
      at = b + BEGIN.length - before;
      this.#head = this.#head.slice(0, b + BEGIN.length);
      this.#inPayload = true;
    }
    if (this.#inPayload) {
      const { payloadBytes, line } = this.#opts;
      const n = Math.min(chunk.length - at, payloadBytes - this.#seen);
      if (this.#mismatch === undefined) {
        for (let k = 0; k < n; k++) {
          const i = this.#seen + k;
          const want = uartByte(i, line);
          if (chunk[at + k] !== want) {
            this.#mismatch = `payload byte ${i} is 0x${(chunk[at + k] as number).toString(16)}, expected 0x${want.toString(16)}`;
            break;
          }
        }
      }
      this.#seen += n;
      at += n;
      if (this.#seen < payloadBytes) return;
      this.#inPayload = false;
    }
    this.#tail += Buffer.from(chunk.subarray(at)).toString('latin1');
    if (this.#tail.length > 4 * KEEP) this.#tail = this.#tail.slice(-4 * KEEP);
  }

  /** The non-payload text seen (for error messages). */
  text(): string {
    return `${this.#head}${this.#seen > 0 ? `[${this.#seen} payload bytes]` : ''}${this.#tail}`;
  }

  /**
   * The guest's result fields (`key=value` as bigints).
   * @throws Error when the payload was wrong or short, or there is no result line for the mode.
   */
  result(): Record<string, bigint> {
    const err = ERROR_RE.exec(this.#tail) ?? ERROR_RE.exec(this.#head);
    if (err) throw new Error(`the guest reported an error: ${err[1]}`);
    if (this.#mismatch !== undefined) throw new Error(`UART output corrupted: ${this.#mismatch}`);
    if (this.#seen < this.#opts.payloadBytes) throw new Error(`UART payload short: ${this.#seen} of ${this.#opts.payloadBytes} bytes arrived`);
    const m = END_RE.exec(this.#tail);
    if (!m || m[1] !== this.#opts.mode) throw new Error(`no 'TSVMBENCH end ${this.#opts.mode}' line in the guest output:\n${this.text().slice(-KEEP)}`);
    const fields: Record<string, bigint> = {};
    for (const kv of (m[2] ?? '').trim().split(' ').filter(Boolean)) {
      const [k, v] = kv.split('=') as [string, string];
      fields[k] = BigInt(v);
    }
    return fields;
  }
}

/** `fields[key]` as a number. @throws Error when the guest did not report it. */
export function field(fields: Record<string, bigint>, key: string): number {
  const v = fields[key];
  if (v === undefined) throw new Error(`the guest's result line has no ${key}=`);
  return Number(v);
}
