/**
 * Builds the freestanding C test guests in `test/guest/` with the host's `cc` and boots them on a
 * {@link Machine}: 64-bit ring 0 through `loadElf` + `Machine.enter`, identity-mapped low 4 GiB,
 * interrupts off, the stack at 0x80000 (set by `start.S`), the image at 1 MiB (`link.ld`).
 *
 * A guest reports through the debug-exit port: `main()` returning 0 becomes the stop
 * `{ reason: 'debug-exit', code: 1 }`; returning `n` (a failing step) becomes `code: 2n + 1`.
 * Detailed results go to fixed guest-physical addresses ({@link GUEST_LAYOUT}).
 *
 * Builds land in a temp directory keyed by a hash of the compiler, the flags and every source
 * file, so a second test file (or a second run, e.g. under `tools/nested-kvm`, which shares the
 * host's `/tmp`) reuses them; a change to any input rebuilds.
 * @module
 */
import { execFile, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { EXCEPTION_PORT, loadElf, type Machine, type Stop } from '@tsvm/core';
import { Uart16550 } from '../src/index.js';

const run = promisify(execFile);

/** Where the guests put things (must match `test/guest/guest.h`). */
export const GUEST_LAYOUT = {
  /** Load address of every guest image. */
  image: 0x100000,
  /** `uint32_t RESULT[]` written by the guest. */
  result: 0x300000,
  /** Byte buffers the guest copies out for the host. */
  resultData: 0x301000,
  /** Virtqueue rings (queue i at +i*0x4000) and buffers (+0x10000...). */
  vqBase: 0x200000,
  /** Where the tests map the virtio-mmio window. */
  virtioBase: 0xd000_0000n,
} as const;

/** RAM every guest expects: image at 1 MiB, results at 3 MiB, host system area at the top. */
export const GUEST_MEMORY = 4 * 1024 * 1024;

/** Names of the guests in `test/guest/` (one `<name>.c` each). */
export type GuestName = 'uart' | 'virtio-rng' | 'virtio-blk' | 'virtio-console' | 'virtio-hostile' | 'i8042' | 'cmos' | 'irq';

const SRC = join(dirname(fileURLToPath(import.meta.url)), 'guest');
const COMMON = ['start.S', 'lib.c', 'virtio.c'];
const HEADERS = ['guest.h', 'virtio.h', 'link.ld'];
const CFLAGS = [
  '-O2', '-std=gnu11', '-Wall', '-Wextra', '-Werror',
  '-ffreestanding', '-fno-pic', '-fno-pie', '-no-pie', '-nostdlib', '-static',
  '-mno-red-zone', '-mgeneral-regs-only', '-fno-stack-protector', '-fno-asynchronous-unwind-tables', '-fcf-protection=none',
  '-Wl,--build-id=none', '-Wl,--no-warn-rwx-segments', `-Wl,-T,${join(SRC, 'link.ld')}`,
];

/** Whether the guests can be built here. */
export interface GuestToolchain {
  /** `cc` ran. */
  readonly available: boolean;
  /** Why not (empty when available). */
  readonly reason: string;
  /** The compiler command (`$CC` or `cc`). */
  readonly cc: string;
  /** First line of `cc --version` (part of the build cache key). */
  readonly version: string;
}

let toolchain: GuestToolchain | undefined;

/** Probes `cc` once; prints a banner when it is missing so skipped guest tests are not mistaken for passes. */
export function guestToolchain(): GuestToolchain {
  if (toolchain) return toolchain;
  const cc = process.env.CC ?? 'cc';
  const r = spawnSync(cc, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    const reason = `no C compiler ('${cc} --version' failed: ${r.error?.message ?? r.stderr.trim()})`;
    process.stderr.write(`\n[tsvm] ***** SKIPPING GUEST-DRIVEN DEVICE TESTS: ${reason} *****\n\n`);
    toolchain = { available: false, reason, cc, version: '' };
  } else {
    toolchain = { available: true, reason: '', cc, version: r.stdout.split('\n')[0] ?? '' };
  }
  return toolchain;
}

function cacheKey(tc: GuestToolchain, name: GuestName): string {
  const h = createHash('sha256');
  h.update(`${tc.cc}\0${tc.version}\0${CFLAGS.join(' ')}\0`);
  for (const f of [...COMMON, ...HEADERS, `${name}.c`]) {
    h.update(`${f}\0`);
    h.update(readFileSync(join(SRC, f)));
  }
  return h.digest('hex').slice(0, 16);
}

/**
 * Compiles guest `name` (start.S + lib.c + virtio.c + `<name>.c`) to a static x86-64 ELF and
 * returns its bytes. Reuses an identical earlier build from the temp directory.
 * @throws Error with the compiler's output when the build fails.
 */
export async function buildGuest(name: GuestName): Promise<Uint8Array> {
  const tc = guestToolchain();
  if (!tc.available) throw new Error(tc.reason);
  const dir = join(tmpdir(), 'tsvm-test-guests');
  mkdirSync(dir, { recursive: true });
  const out = join(dir, `${name}-${cacheKey(tc, name)}.elf`);
  if (existsSync(out)) return new Uint8Array(readFileSync(out));
  const work = mkdtempSync(join(dir, `${name}-build-`));
  try {
    const tmp = join(work, `${name}.elf`);
    const sources = [...COMMON, `${name}.c`].map((f) => join(SRC, f));
    try {
      await run(tc.cc, [...CFLAGS, '-o', tmp, ...sources], { cwd: SRC, timeout: 240_000 });
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`building guest '${name}' failed:\n${tc.cc} ${[...CFLAGS, '-o', tmp, ...sources].join(' ')}\n${err.stderr ?? err.message}`);
    }
    renameSync(tmp, out); // atomic: a concurrent build of the same key just wins or loses the race
    return new Uint8Array(readFileSync(out));
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** Builds several guests (at most two compilers at once). */
export async function buildGuests(names: readonly GuestName[]): Promise<Map<GuestName, Uint8Array>> {
  const result = new Map<GuestName, Uint8Array>();
  const queue = [...names];
  const worker = async (): Promise<void> => {
    for (let n = queue.shift(); n !== undefined; n = queue.shift()) result.set(n, await buildGuest(n));
  };
  await Promise.all([worker(), worker()]);
  return result;
}

/**
 * Loads `elf` and points the vCPU at it (64-bit, ring 0). Also registers a reporter on the
 * exception port: `Machine.enter` installs the host IDT whose stubs write the vector there, but
 * (unlike `loadFlat`) does not register the port, so a guest fault would otherwise surface as
 * an unhandled port write.
 */
export function bootGuest(vm: Machine, elf: Uint8Array): void {
  const r = loadElf(vm.memory, elf);
  vm.enter({ mode: 'long64', rip: r.entry, registers: {}, identityMap: [] });
  if (!vm.io.find(BigInt(EXCEPTION_PORT))) {
    vm.io.register({ port: EXCEPTION_PORT, size: 1 }, {
      name: 'test-exception-reporter',
      write: (_o, value, _s, access) => access.requestStop({ reason: 'exception', vector: value }),
    });
  }
}

/** `RESULT[0..count)` as written by the guest. */
export function guestResults(vm: Machine, count: number): number[] {
  return Array.from({ length: count }, (_, i) => vm.memory.readUint(GUEST_LAYOUT.result + 4 * i, 4));
}

/** `length` bytes the guest copied to `RESULT_DATA + offset`. */
export function guestData(vm: Machine, length: number, offset = 0): Uint8Array {
  return vm.memory.read(GUEST_LAYOUT.resultData + offset, length);
}

/** A one-line description of a stop for assertion messages (bigints and errors included). */
export function describeStop(stop: Stop, console = ''): string {
  const fields = JSON.stringify(stop, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v instanceof Error ? `${v.name}: ${v.message}` : v));
  const step = stop.reason === 'debug-exit' && stop.code !== 1 ? ` (guest failed at step ${(stop.code - 1) / 2})` : '';
  return `guest stopped with ${fields}${step}${console ? `; guest console:\n${console}` : ''}`;
}

/** Bytes as a latin1 string. */
export function latin1(chunks: readonly Uint8Array[]): string {
  return Buffer.concat(chunks).toString('latin1');
}

/** A COM1 whose output a test can read: the guests' diagnostics channel (`uart_puts`). */
export function com1(): { uart: Uart16550; text: () => string } {
  const chunks: Uint8Array[] = [];
  const uart = new Uart16550({ sink: (b) => void chunks.push(b) });
  return { uart, text: () => (uart.flush(), latin1(chunks)) };
}
