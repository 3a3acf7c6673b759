/**
 * One gdb client's session on a machine: the RSP commands (registers, memory, breakpoints,
 * continue, step, interrupt, detach) mapped onto the machine and its {@link Monitor}. Socket-free
 * (the server feeds it packets and sends what it returns), so it is testable on `MockBackend`.
 *
 * - Breakpoints (`Z0` software, `Z1` hardware) are the monitor's mediate `exec` hooks: the monitor
 *   picks the mechanism (the VMM-side probe where KVM guest debug does not work). A hit denies,
 *   which stops `run()`; the stub reports `T05` with `swbreak`/`hwbreak`, so gdb does not rewind
 *   the PC itself. The probe may have moved the real RIP to the trampoline (the hooked
 *   instruction runs out of line on resume): gdb is shown the hit's RIP instead, until it changes
 *   RIP or resumes.
 * - Single-step is *emulated* on every host: temporary exec hooks at the instruction's
 *   successors (`successors()`), then a run to the first. An instruction whose successors
 *   cannot all be computed (far jumps, fs/gs-relative indirect jumps) gets an error reply.
 * - Memory reads go through {@link Monitor.readOriginal} (the code, not the traps); writes
 *   through the patch engines, so a write over a hooked instruction keeps its trap armed.
 * @module
 */
import { bitnessOf, linearRip, translateVirtual, type Machine, type Regs, type Sregs, type Stop } from '@tsvm/core';
import { deny } from '../decisions.js';
import { successors } from '../decode.js';
import type { HookHandle, Monitor } from '../monitor.js';
import { MAX_PACKET, fromHex, hex2, parseHex, toHex } from './packets.js';
import { TARGET_XML, decodeAll, decodeRegister, encodeAll, encodeRegister } from './registers.js';

/** Largest `m` read answered in one reply (bytes): its hex fits the advertised packet size. gdb asks again for the rest. */
export const MAX_READ = 2048;

const E_FAULT = 'E0e'; // EFAULT: address not mapped or not guest RAM
const E_INVAL = 'E16'; // EINVAL: malformed packet
const E_BUSY = 'E10'; // EBUSY: the machine is running (or a hook cannot be placed now)
const IA32_LSTAR = 0xc000_0082;

/** Why the target last stopped, as gdb is told. */
interface StopState {
  readonly reply: string;
  /** RIP to show gdb instead of the vCPU's (a breakpoint hit whose instruction runs out of line). */
  readonly pc: bigint | undefined;
}

interface Breakpoint { readonly handle: HookHandle; readonly physical: bigint }

/** What the session tells its owner. */
export interface SessionHooks {
  /** Sends one reply payload (framed by the caller). */
  send(payload: string): void;
  /** A run ended (for the server's `stop` event); `byGdb`: at one of gdb's breakpoints or steps. */
  stopped?(stop: Stop, byGdb: boolean): void;
}

/** A gdb session on one machine (vCPU 0). */
export class GdbSession {
  readonly #machine: Machine;
  readonly #monitor: Monitor;
  readonly #hooks: SessionHooks;
  readonly #breakpoints = new Map<string, Breakpoint>(); // `${type}:${address}`
  #steps: HookHandle[] = [];
  #hit: { readonly rip: bigint; readonly kind: 'swbreak' | 'hwbreak' | 'step' } | undefined;
  #stop: StopState = { reply: 'S05', pc: undefined };
  #running: { readonly abort: AbortController; readonly done: Promise<void> } | undefined;
  #noAck = false;

  /** @param machine - the target. @param monitor - its monitor (not sealed). @param hooks - where replies go. */
  constructor(machine: Machine, monitor: Monitor, hooks: SessionHooks) {
    this.#machine = machine;
    this.#monitor = monitor;
    this.#hooks = hooks;
  }

  /** Whether `QStartNoAckMode` was accepted (the server stops sending `+`). */
  get noAck(): boolean {
    return this.#noAck;
  }

  /** Whether a `continue`/`step` is in progress. */
  get running(): boolean {
    return this.#running !== undefined;
  }

  /** Number of breakpoints gdb has inserted. */
  get breakpointCount(): number {
    return this.#breakpoints.size;
  }

  /** Handles one packet; the reply (if any: not for `c`/`s`, answered when the run stops) goes to `send`. */
  handle(payload: string): void {
    const reply = this.#dispatch(payload);
    if (reply !== undefined) this.#hooks.send(reply);
  }

  /** Ctrl-C: aborts the running `run()` (the stop is reported as `T02`). */
  interrupt(): void {
    this.#running?.abort.abort();
  }

  /**
   * Ends the session (detach, kill or disconnect): stops a run in progress, removes gdb's
   * breakpoints. The machine is left stopped, in its state, for its owner to resume. With
   * `restore: false` (the machine was closed: its RAM is gone) the hooks are only forgotten.
   */
  async end(restore = true): Promise<void> {
    const r = this.#running;
    if (r) { r.abort.abort(); await r.done; }
    if (restore) {
      this.#clearSteps();
      for (const b of this.#breakpoints.values()) b.handle.remove();
    }
    this.#steps = [];
    this.#breakpoints.clear();
  }

  #dispatch(p: string): string | undefined {
    if (this.#running) return p === '?' ? undefined : E_BUSY; // all-stop: nothing else while running
    const c = p[0];
    switch (c) {
      case '?': return this.#stop.reply;
      case 'g': return encodeAll(this.#regs(), this.#sregs());
      case 'G': return this.#writeAll(p.slice(1));
      case 'p': return this.#readRegister(p.slice(1));
      case 'P': return this.#writeRegister(p.slice(1));
      case 'm': return this.#readMemory(p.slice(1));
      case 'M': return this.#writeMemory(p.slice(1), 'hex');
      case 'X': return this.#writeMemory(p.slice(1), 'binary');
      case 'Z': case 'z': return this.#breakpoint(c === 'Z', p.slice(1));
      case 'c': case 'C': return this.#continue(c === 'c' ? p.slice(1) : p.slice(1).split(';')[1]);
      case 's': case 'S': return this.#step(c === 's' ? p.slice(1) : p.slice(1).split(';')[1]);
      case 'H': return 'OK';
      case 'T': return 'OK';
      case 'D': return 'OK'; // the server ends the session after this reply
      case 'v': return this.#v(p);
      case 'q': case 'Q': return this.#query(p);
      default: return ''; // unsupported
    }
  }

  #query(p: string): string {
    if (p.startsWith('qSupported')) return `PacketSize=${MAX_PACKET.toString(16)};qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;vContSupported+`;
    if (p === 'QStartNoAckMode') { this.#noAck = true; return 'OK'; }
    if (p === 'qAttached') return '1';
    if (p === 'qC') return 'QC1';
    if (p === 'qfThreadInfo') return 'm1';
    if (p === 'qsThreadInfo') return 'l';
    if (p === 'qSymbol::') return 'OK';
    const xfer = /^qXfer:features:read:([^:]*):([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(p);
    if (xfer) {
      if (xfer[1] !== 'target.xml') return E_FAULT;
      const off = parseInt(xfer[2] as string, 16), len = Math.min(parseInt(xfer[3] as string, 16), MAX_PACKET / 2);
      if (!Number.isSafeInteger(off) || off > TARGET_XML.length) return E_INVAL;
      const chunk = TARGET_XML.slice(off, off + len);
      return (off + len >= TARGET_XML.length ? 'l' : 'm') + chunk;
    }
    return '';
  }

  #v(p: string): string | undefined {
    if (p === 'vCont?') return 'vCont;c;C;s;S';
    if (p.startsWith('vCont;')) {
      // One vCPU: the first action is the one that applies.
      const action = (p.slice(6).split(';')[0] ?? '').split(':')[0] ?? '';
      if (action === 'c' || action.startsWith('C')) return this.#continue('');
      if (action === 's' || action.startsWith('S')) return this.#step('');
      return E_INVAL;
    }
    return ''; // vMustReplyEmpty, vKill (unsupported: 'k' and D end the session), …
  }

  #regs(): Regs {
    const r = this.#machine.vcpu(0).getRegs();
    return this.#stop.pc === undefined ? r : { ...r, rip: this.#stop.pc };
  }

  #sregs(): Sregs {
    return this.#machine.vcpu(0).getSregs();
  }

  #readRegister(arg: string): string {
    const n = parseHex(arg);
    if (n === undefined || n > 255n) return E_INVAL;
    return encodeRegister(Number(n), this.#regs(), this.#sregs()) ?? E_INVAL;
  }

  #writeRegister(arg: string): string {
    const [num, value] = arg.split('=');
    const n = parseHex(num);
    if (n === undefined || n > 255n || value === undefined) return E_INVAL;
    const d = decodeRegister(Number(n), value);
    if (d === undefined) return E_INVAL;
    if (d) this.#setRegs([d]);
    return 'OK';
  }

  #writeAll(hex: string): string {
    const all = decodeAll(hex);
    if (!all) return E_INVAL;
    this.#setRegs(all);
    return 'OK';
  }

  #setRegs(writes: ReadonlyArray<{ readonly name: keyof Regs; readonly value: bigint }>): void {
    const update: Partial<Regs> = {};
    for (const { name, value } of writes) {
      // gdb writes back the RIP it was shown: only a different value moves the vCPU.
      if (name === 'rip' && this.#stop.pc !== undefined && value === this.#stop.pc) continue;
      update[name] = value;
    }
    if (update.rip !== undefined) this.#stop = { ...this.#stop, pc: undefined };
    if (Object.keys(update).length > 0) this.#machine.vcpu(0).setRegs(update);
  }

  /** Guest-physical pieces (each within one page) of `length` bytes at linear `address`; stops at the first unmapped page. */
  #pieces(address: bigint, length: number, sregs: Sregs): Array<{ readonly physical: bigint; readonly length: number }> {
    const out: Array<{ physical: bigint; length: number }> = [];
    let at = address, left = length;
    while (left > 0) {
      const physical = translateVirtual(this.#machine.memory, sregs, BigInt.asUintN(64, at));
      if (physical === undefined) break;
      const n = Math.min(left, 4096 - Number(at & 0xfffn));
      out.push({ physical, length: n });
      at += BigInt(n);
      left -= n;
    }
    return out;
  }

  #readMemory(arg: string): string {
    const m = /^([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(arg);
    const address = parseHex(m?.[1]), len = parseHex(m?.[2]);
    if (address === undefined || len === undefined) return E_INVAL;
    const want = Number(len > BigInt(MAX_READ) ? BigInt(MAX_READ) : len);
    if (want === 0) return '';
    const parts: Uint8Array[] = [];
    const mem = this.#machine.memory;
    for (const piece of this.#pieces(address, want, this.#sregs())) {
      // Mapped but past the end of guest RAM: what is there, then stop (gdb asks for the rest and gets E).
      let n = piece.length;
      if (!mem.contains(piece.physical, n)) {
        let lo = 0, hi = n; // the longest contained prefix: contains() is monotonic in the length
        while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (mem.contains(piece.physical, mid)) lo = mid; else hi = mid - 1; }
        n = lo;
      }
      if (n > 0) parts.push(this.#monitor.readOriginal(piece.physical, n));
      if (n < piece.length) break;
    }
    if (parts.length === 0) return E_FAULT;
    return parts.map(toHex).join('');
  }

  #writeMemory(arg: string, encoding: 'hex' | 'binary'): string {
    const colon = arg.indexOf(':');
    const m = /^([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(colon < 0 ? '' : arg.slice(0, colon));
    const address = parseHex(m?.[1]), len = parseHex(m?.[2]);
    if (address === undefined || len === undefined || len > BigInt(MAX_PACKET)) return E_INVAL;
    const data = arg.slice(colon + 1);
    const bytes = encoding === 'hex' ? fromHex(data) : Uint8Array.from(data, (ch) => ch.charCodeAt(0));
    if (!bytes || bytes.length !== Number(len)) return E_INVAL;
    if (bytes.length === 0) return 'OK';
    const pieces = this.#pieces(address, bytes.length, this.#sregs());
    const mem = this.#machine.memory;
    // All or nothing: every page must be guest RAM before one byte is written.
    if (pieces.reduce((n, p) => n + p.length, 0) !== bytes.length || !pieces.every((p) => mem.contains(p.physical, p.length))) return E_FAULT;
    const probe = this.#monitor.probe(), int3 = this.#monitor.int3();
    let off = 0;
    for (const p of pieces) {
      const chunk = bytes.subarray(off, off + p.length);
      off += p.length;
      // Bytes under a trap update the engine's saved original, so the trap stays armed.
      if (!probe && !int3) mem.write(p.physical, chunk);
      probe?.write(p.physical, chunk, int3);
      int3?.write(p.physical, chunk, probe);
    }
    return 'OK';
  }

  #breakpoint(insert: boolean, arg: string): string {
    const m = /^([0-4]),([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(arg);
    if (!m) return E_INVAL;
    const type = Number(m[1]);
    if (type > 1) return ''; // watchpoints: not supported
    const address = parseHex(m[2]);
    if (address === undefined) return E_INVAL;
    const key = `${type}:${address}`;
    if (!insert) {
      this.#breakpoints.get(key)?.handle.remove();
      this.#breakpoints.delete(key);
      return 'OK';
    }
    if (this.#breakpoints.has(key)) return 'OK';
    if (this.#monitor.sealed) return E_BUSY;
    const physical = translateVirtual(this.#machine.memory, this.#sregs(), address);
    if (physical === undefined || !this.#machine.memory.contains(physical, 1)) return E_FAULT;
    const kind = type === 0 ? 'swbreak' : 'hwbreak';
    try {
      const handle = this.#monitor.mediate({ event: 'exec', address: physical, virtualAddress: address }, (ev) => {
        this.#hit ??= { rip: ev.event === 'exec' ? ev.rip : address, kind };
        return deny({ reason: `gdb breakpoint at 0x${address.toString(16)}` });
      }, { name: `gdb:${kind}@0x${address.toString(16)}` });
      this.#breakpoints.set(key, { handle, physical });
    } catch {
      return E_BUSY; // e.g. a trap there would overlap another one
    }
    return 'OK';
  }

  #resumeAt(arg: string | undefined): string | undefined {
    if (arg === undefined || arg === '') return undefined;
    const at = parseHex(arg);
    if (at === undefined) return E_INVAL;
    this.#machine.vcpu(0).setRegs({ rip: at });
    this.#stop = { ...this.#stop, pc: undefined };
    return undefined;
  }

  #continue(arg: string | undefined): string | undefined {
    return this.#resumeAt(arg) ?? this.#run();
  }

  /** Emulated single-step: temporary exec hooks at every successor of the instruction at the PC. */
  #step(arg: string | undefined): string | undefined {
    const bad = this.#resumeAt(arg);
    if (bad) return bad;
    if (this.#monitor.sealed) return E_BUSY;
    const mem = this.#machine.memory;
    const sregs = this.#sregs(), regs = this.#regs();
    const pa = translateVirtual(mem, sregs, linearRip(sregs, regs.rip));
    if (pa === undefined || !mem.contains(pa, 1)) return E_FAULT;
    let code: Uint8Array;
    try { code = this.#monitor.readOriginal(pa, Math.min(15, 4096 - Number(pa & 0xfffn))); } catch { return E_FAULT; }
    const read = (va: bigint, width: 2 | 4 | 8): bigint | undefined => {
      const p = translateVirtual(mem, sregs, va);
      if (p === undefined || !mem.contains(p, width)) return undefined;
      return width === 8 ? mem.readU64(p) : BigInt(mem.readUint(p, width));
    };
    const lstar = (): bigint | undefined => { try { return this.#machine.vcpu(0).getMsrs([IA32_LSTAR])[0]?.data; } catch { return undefined; } };
    let succ;
    try { succ = successors(code, regs.rip, bitnessOf(sregs), { regs, read, lstar }); } catch { return E_INVAL; }
    if (!succ.complete || succ.addresses.length === 0) return E_INVAL;
    try {
      for (const va of succ.addresses) {
        const target = translateVirtual(mem, sregs, linearRip(sregs, va));
        if (target === undefined || !mem.contains(target, 1)) throw new Error('unmapped successor');
        this.#steps.push(this.#monitor.mediate({ event: 'exec', address: target, virtualAddress: va }, (ev) => {
          this.#hit ??= { rip: ev.event === 'exec' ? ev.rip : va, kind: 'step' };
          return deny({ reason: 'gdb single-step' });
        }, { name: `gdb:step@0x${va.toString(16)}` }));
      }
    } catch {
      this.#clearSteps();
      return E_BUSY;
    }
    return this.#run();
  }

  #clearSteps(): void {
    for (const h of this.#steps) h.remove();
    this.#steps = [];
  }

  #run(): undefined {
    const abort = new AbortController();
    this.#hit = undefined;
    const done = this.#machine.run({ signal: abort.signal }).then(
      (stop) => this.#finish(stop),
      () => {
        // run() rejects only for misuse (already running under its owner, closed): an error reply.
        this.#running = undefined;
        this.#clearSteps();
        this.#hooks.send(E_BUSY);
      },
    );
    this.#running = { abort, done };
    return undefined;
  }

  #finish(stop: Stop): void {
    this.#running = undefined;
    this.#clearSteps();
    const hit = this.#hit;
    this.#hit = undefined;
    this.#stop = stopState(stop, hit);
    this.#hooks.stopped?.(stop, hit !== undefined && stop.reason === 'violation');
    this.#hooks.send(this.#stop.reply);
  }
}

/** The stop reply for `stop` (and the PC to show, for a hit). */
function stopState(stop: Stop, hit: { readonly rip: bigint; readonly kind: 'swbreak' | 'hwbreak' | 'step' } | undefined): StopState {
  if (stop.reason === 'violation' && hit) return { reply: `T05thread:1;${hit.kind === 'step' ? '' : `${hit.kind}:;`}`, pc: hit.rip };
  switch (stop.reason) {
    case 'aborted': case 'timeout': return { reply: 'T02thread:1;', pc: undefined };
    case 'debug-exit': return { reply: `W${hex2(stop.code)}`, pc: undefined };
    case 'shutdown': return { reply: 'T09thread:1;', pc: undefined }; // SIGKILL: triple fault
    case 'exception': return { reply: `T${hex2(signalOf(stop.vector))}thread:1;`, pc: undefined };
    case 'halt': return { reply: 'T05thread:1;', pc: undefined };
    default: return { reply: 'T06thread:1;', pc: undefined }; // SIGABRT: violation, unhandled exit, errors
  }
}

/** The POSIX signal gdb knows an x86 exception by. */
function signalOf(vector: number): number {
  switch (vector) {
    case 0: case 16: case 19: return 8; // SIGFPE
    case 6: return 4; // SIGILL
    case 1: case 3: return 5; // SIGTRAP
    case 17: return 7; // SIGBUS
    default: return 11; // SIGSEGV
  }
}
