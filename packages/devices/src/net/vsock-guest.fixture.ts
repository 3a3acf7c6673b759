// Test and bench support (not exported): builds the freestanding vsock guest (net/guest/vsock.c
// with the device tests' start.S, lib.c and virtio.c, compiled by path) and boots it on a
// Machine with a virtio-vsock device at the tests' virtio window. See vsock.c for the roles.
import { execFile, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { EXCEPTION_PORT, InvalidArgumentError, loadElf, Machine, type IrqLine, type Stop } from '@tsvm/core';
import { DebugExit } from '../debug-exit.js';
import { VirtioMmio } from '../virtio/mmio.js';
import { VirtioVsock } from '../virtio/vsock.js';
import { VsockRouter, type VsockMediator, type VsockRouterStats } from './vsock-router.js';

const here = dirname(fileURLToPath(import.meta.url));
const COMMON = join(here, '../../test/guest');
const SOURCES = [join(COMMON, 'start.S'), join(COMMON, 'lib.c'), join(COMMON, 'virtio.c'), join(here, 'guest/vsock.c')];
const INPUTS = [...SOURCES, join(COMMON, 'guest.h'), join(COMMON, 'virtio.h'), join(COMMON, 'link.ld')];
const CFLAGS = [
  '-O2', '-std=gnu11', '-Wall', '-Wextra', '-Werror',
  '-ffreestanding', '-fno-pic', '-fno-pie', '-no-pie', '-nostdlib', '-static',
  '-mno-red-zone', '-mgeneral-regs-only', '-fno-stack-protector', '-fno-asynchronous-unwind-tables', '-fcf-protection=none',
  '-Wl,--build-id=none', '-Wl,--no-warn-rwx-segments', `-Wl,-T,${join(COMMON, 'link.ld')}`, `-I${COMMON}`,
];

/** Fixed addresses and ports of the guest (must match vsock.c and test/guest/guest.h). */
export const VSOCK_GUEST = {
  memory: 16 << 20,
  params: 0x302000,
  result: 0x300000,
  virtioBase: 0xd000_0000n,
  irq: 5,
  /** `out` 1 = connected and about to sleep, 2 = interrupt handler entered, 3 = packet consumed. */
  wakePort: 0x510,
} as const;

/** What the guest does (vsock.c's roles). */
export interface VsockGuestParams {
  readonly role: 'halt-rx' | 'server' | 'client';
  readonly cid: number;
  /** Whom a client or halt-rx guest connects to (2 = the host). */
  readonly peerCid?: number;
  readonly port: number;
  readonly count: number;
  /** Message size (client sends, server takes), 8..65536. */
  readonly msg?: number;
  /** Reply size, 1..msg. */
  readonly reply?: number;
  /**
   * Client and server only: use a SEQPACKET socket (the driver negotiates
   * VIRTIO_VSOCK_F_SEQPACKET) and send every message as fragments of at most `frag` bytes, EOM on
   * the last; the receiver takes a message only whole and exactly `msg` (or `reply`) bytes long.
   * Absent or 0: a stream.
   */
  readonly frag?: number;
  /**
   * SEQPACKET: messages the client sends back to back before it waits for their replies (default
   * 1); above 1, the receiver of each group lets its packets pile up before it takes them.
   */
  readonly burst?: number;
  /**
   * SEQPACKET: the message (0-based) whose bytes `frag - 2 .. frag + 1` are ff fe fd fc, so the
   * pattern spans its first two fragments ({@link POISON}). Absent: none.
   */
  readonly poison?: number;
}

/** The bytes the client puts across the first fragment boundary of its `poison` message. */
export const POISON = Uint8Array.of(0xff, 0xfe, 0xfd, 0xfc);

/** Whether `cc` is there (the vsock guest tests skip loudly without it). */
export function vsockGuestToolchain(): { available: boolean; reason: string; cc: string; version: string } {
  const cc = process.env.CC ?? 'cc';
  const r = spawnSync(cc, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return { available: false, reason: `no C compiler ('${cc} --version' failed)`, cc, version: '' };
  return { available: true, reason: '', cc, version: r.stdout.split('\n')[0] ?? '' };
}

/** Compiles the guest once per distinct input (cached in the temp directory by content hash). */
export async function buildVsockGuest(): Promise<Uint8Array> {
  const tc = vsockGuestToolchain();
  if (!tc.available) throw new Error(tc.reason);
  const h = createHash('sha256').update(`${tc.cc}\0${tc.version}\0${CFLAGS.join(' ')}\0`);
  for (const f of INPUTS) h.update(`${f}\0`).update(readFileSync(f));
  const dir = join(tmpdir(), 'tsvm-test-guests');
  mkdirSync(dir, { recursive: true });
  const out = join(dir, `vsock-${h.digest('hex').slice(0, 16)}.elf`);
  if (existsSync(out)) return new Uint8Array(readFileSync(out));
  const work = mkdtempSync(join(dir, 'vsock-build-'));
  try {
    const tmp = join(work, 'vsock.elf');
    try {
      await promisify(execFile)(tc.cc, [...CFLAGS, '-o', tmp, ...SOURCES], { timeout: 240_000 });
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`building the vsock guest failed:\n${err.stderr ?? err.message}`);
    }
    renameSync(tmp, out);
    return new Uint8Array(readFileSync(out));
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** RESULT[0..9) of the guest. */
export interface VsockGuestResults {
  readonly messages: number;
  /** The guest's first failing step (0 = none). */
  readonly error: number;
  readonly bytes: number;
  readonly packets: number;
  readonly rsts: number;
  /** Feature bits the driver accepted (low word; bit 1 = VIRTIO_VSOCK_F_SEQPACKET). */
  readonly features: number;
  /** RW packets (stream messages or SEQPACKET fragments) sent. */
  readonly rwSent: number;
  /** SEQPACKET messages received (an RW with EOM). */
  readonly seqMessages: number;
  /** With `burst`: the most packets the guest found queued in its rx ring at once. */
  readonly queued: number;
}

const ROLE = { 'halt-rx': 1, server: 2, client: 3 } as const;

/** A machine running the vsock guest: its device (attach it to a router) and its results. */
export async function vsockGuestMachine(elf: Uint8Array, p: VsockGuestParams, options: { irqchip?: boolean } = {}) {
  const msg = p.msg ?? 64;
  const reply = p.reply ?? msg;
  if (!(msg >= 8 && msg <= 65536 && reply >= 1 && reply <= msg)) throw new InvalidArgumentError('msg', 'msg must be 8..65536 and reply 1..msg');
  const frag = p.frag ?? 0;
  const burst = p.burst ?? 1;
  if (!Number.isInteger(frag) || frag < 0 || frag > 65536 || (frag > 0 && p.role === 'halt-rx')) throw new InvalidArgumentError('frag', 'frag must be 0 (stream) or 1..65536, and halt-rx is stream only');
  if (!Number.isInteger(burst) || burst < 1 || burst > 16 || (burst > 1 && frag === 0) || burst * msg > 1 << 20) throw new InvalidArgumentError('burst', 'burst must be 1..16 (above 1 only with frag), burst * msg at most 1 MiB');
  if (p.poison !== undefined && (!Number.isInteger(p.poison) || p.poison < 0 || frag < 6 || frag + 6 > msg)) throw new InvalidArgumentError('poison', 'poison needs a message number, frag >= 6 and msg >= frag + 6 (the pattern stays clear of the checked ends)');
  const irqchip = options.irqchip ?? p.role === 'halt-rx';
  const vm = await Machine.create({ memory: VSOCK_GUEST.memory, irqchip });
  const { device, mmio } = attachVsockGuestDevices(vm, p.cid, irqchip);
  const words = [ROLE[p.role], p.cid, p.peerCid ?? 0, p.port, p.count, msg, reply, frag, burst, p.poison ?? 0xffff_ffff];
  words.forEach((w, i) => vm.memory.writeUint(VSOCK_GUEST.params + 4 * i, 4, w >>> 0));
  const r = loadElf(vm.memory, elf);
  vm.enter({ mode: 'long64', rip: r.entry, registers: {}, identityMap: [] });
  reportExceptions(vm);
  const results = (): VsockGuestResults => {
    const w = Array.from({ length: 9 }, (_, i) => vm.memory.readUint(VSOCK_GUEST.result + 4 * i, 4) as number);
    return { messages: w[0], error: w[1], bytes: w[2], packets: w[3], rsts: w[4], features: w[5], rwSent: w[6], seqMessages: w[7], queued: w[8] } as VsockGuestResults;
  };
  return { vm, device, mmio, results };
}

/**
 * The guest's devices on `vm`: vsock (CID `cid`, named `vsock-<cid>`) behind virtio-mmio at the
 * tests' window, and debug-exit. A fork's `setup` calls it to attach the same devices, by the
 * same names, as the template had.
 */
export function attachVsockGuestDevices(vm: Machine, cid: number, irqchip = false): { device: VirtioVsock; mmio: VirtioMmio } {
  const device = new VirtioVsock({ cid, name: `vsock-${cid}` });
  const irq: IrqLine | undefined = irqchip ? vm.irqLine(VSOCK_GUEST.irq) : undefined;
  const mmio = new VirtioMmio({ device, memory: vm.memory, ...(irq ? { irq } : {}) });
  vm.attachDevice(mmio.mappings(VSOCK_GUEST.virtioBase));
  vm.attachDevice(new DebugExit());
  return { device, mmio };
}

/**
 * Machine.enter installs the host IDT (its stubs write the vector to EXCEPTION_PORT) but, unlike
 * loadFlat, may leave the port without a device.
 */
function reportExceptions(vm: Machine): void {
  if (!vm.io.find(BigInt(EXCEPTION_PORT))) {
    vm.io.register({ port: EXCEPTION_PORT, size: 1 }, { name: 'exception-reporter', write: (_o, v, _s, a) => a.requestStop({ reason: 'exception', vector: v }) });
  }
}

/** The bytes of message `i` (`msg` long) as the guest's client sends them (vsock.c's msg_byte). */
export function guestMessage(i: number, msg: number): Uint8Array {
  return Uint8Array.from({ length: msg }, (_, k) => (k < 4 ? (i >>> (7 * k)) & 0x7f : k >= msg - 4 ? (i >>> (7 * (k - (msg - 4)))) & 0x7f : k & 0x7f));
}

/** What {@link runGuestPair} measured. */
export interface GuestPairResult {
  readonly client: VsockGuestResults;
  readonly server: VsockGuestResults;
  readonly clientStop: Stop;
  readonly serverStop: Stop;
  /** When each forward (client → server) message was mediated, ms (performance.now()). */
  readonly forwardAt: readonly number[];
  /** Router counters. */
  readonly router: VsockRouterStats;
  /** Each forward (client → server) message as the mediator was given it (only with `keepForward`). */
  readonly forward: readonly Uint8Array[];
}

/**
 * Two vsock guests on one router (client CID 3 → server CID 4, port 80, principals `client` and
 * `server`), run together on this thread until both exit: the client sends `count` messages of
 * `msg` bytes and waits each time for the server's `reply`-byte answer. `frag`, `burst` and
 * `poison` make it a SEQPACKET connection (see {@link VsockGuestParams}).
 */
export async function runGuestPair<C>(elf: Uint8Array, mediator: VsockMediator<C>, p: { count: number; msg: number; reply: number; timeoutMs?: number; frag?: number; burst?: number; poison?: number; keepForward?: boolean }): Promise<GuestPairResult> {
  const forwardAt: number[] = [];
  const forward: Uint8Array[] = [];
  const timed: VsockMediator<C> = {
    connect: (r) => mediator.connect(r),
    message: (c, d, data) => {
      if (d === 'forward') {
        forwardAt.push(performance.now());
        if (p.keepForward === true) forward.push(data.slice());
      }
      return mediator.message(c, d, data);
    },
    ...(mediator.close ? { close: (c: C) => mediator.close?.(c) } : {}),
  };
  const router = new VsockRouter({ mediator: timed, connectionBuffer: 1 << 20 });
  const seq = { ...(p.frag !== undefined ? { frag: p.frag } : {}), ...(p.burst !== undefined ? { burst: p.burst } : {}), ...(p.poison !== undefined ? { poison: p.poison } : {}) };
  const server = await vsockGuestMachine(elf, { role: 'server', cid: 4, port: 80, count: p.count, msg: p.msg, reply: p.reply, frag: p.frag ?? 0, ...(p.burst !== undefined ? { burst: p.burst } : {}) });
  const client = await vsockGuestMachine(elf, { role: 'client', cid: 3, peerCid: 4, port: 80, count: p.count, msg: p.msg, reply: p.reply, ...seq });
  try {
    router.attach(server.device, 'server');
    router.attach(client.device, 'client');
    const timeout = p.timeoutMs ?? 60_000;
    // The server first: it must be waiting when the client's REQUEST arrives (else RST).
    const serverRun = server.vm.run({ timeout });
    const [serverStop, clientStop] = await Promise.all([serverRun, client.vm.run({ timeout })]);
    return { client: client.results(), server: server.results(), clientStop, serverStop, forwardAt, forward, router: { ...router.stats } };
  } finally {
    router.close();
    await client.vm.close();
    await server.vm.close();
  }
}
