/**
 * Patch breakpoints: the monitor writes a trap over the first bytes of an instruction. When the
 * trap fires, the hooked instruction runs *out of line* where it can: a copy of it (and of
 * whatever else the trap's bytes cover), relocated with iced-x86's block encoder into a slot of
 * the trampoline page and followed by a jump back, while the trap stays armed — one exit per hit,
 * as kprobes' and uprobes' execute-out-of-line. Instructions that must run in place (a memory
 * operand that may fault, calls, returns, indirect branches, port I/O: see
 * {@link relocateOutOfLine}) take the two-exit path instead: the original bytes go back, RIP
 * returns to the instruction, and a second trap at its successor(s) re-arms the first when it
 * fires. No single-step either way — so it works where KVM guest debug does not (every CPL on PVM).
 *
 * Two trap kinds share this engine:
 * - `probe`: `out 0xe5, al` (`e6 e5`), a PIO exit on every host. `out imm8` only reaches ports
 *   below 256, so {@link PROBE_PORT} 0xe5 is reserved. At CPL3 it needs the TSS I/O bitmap core
 *   builds. It spans 2 bytes: on a 1-byte instruction it covers the next instruction's first byte
 *   too, so a jump to that byte while armed would execute garbage (the kprobes caveat).
 * - `int3`: `cc` with `KVM_GUESTDBG_USE_SW_BP`, a debug exit (where calibration says it works).
 *
 * The guest can see the patched bytes (reads of its own code, checksums): probes are not
 * stealthy. Successors that cannot be computed (far jumps, fs/gs-relative indirect jumps) or
 * that would overlap another trap leave the target *lazily* armed: it is re-armed at the next
 * monitor-visible exit, so hits in between are missed; `stats().lazyRearms` counts this.
 * @module
 */
import { InvalidArgumentError, StateError, type GuestMemory, type Regs, type Sregs } from '@tsvm/core';
import { decodeBytes, readCode, relocateOutOfLine, successors } from './decode.js';
import { bitnessOf, linearRip, translateVirtual } from '@tsvm/core';

import { PROBE_PORT } from '@tsvm/core';
/** Reserved port of the probe trap (`out 0xe5, al`): core's `RESERVED_PORTS` table keeps devices off it. */
export { PROBE_PORT };

/** The trap instruction to patch. */
export type TrapKind = 'probe' | 'int3';

const TRAP: Record<TrapKind, Uint8Array> = { probe: Uint8Array.of(0xe6, PROBE_PORT), int3: Uint8Array.of(0xcc) };
const IA32_LSTAR = 0xc000_0082;

/** What the engine needs from the vCPU. */
export interface CpuAccess {
  /** Guest RAM. */
  readonly memory: GuestMemory;
  /** General-purpose registers. */
  regs(): Regs;
  /** Sets RIP. */
  setRip(rip: bigint): void;
  /** Special registers. */
  sregs(): Sregs;
  /** Reads an MSR (undefined when it cannot). */
  msr(index: number): bigint | undefined;
  /**
   * Scratch code the `probe` engine resumes through (see {@link PatchBreakpoints}): guest RAM
   * mapped at `virtual` for the code the probes hook (identity-mapped in core's long-mode
   * tables). Without it a probe cannot resume correctly and `onTrap` throws.
   */
  readonly trampoline?: { readonly physical: bigint; readonly virtual: bigint; readonly size: number };
}

/** Bytes per trampoline slot: a relocated instruction group plus the jump back fits in 32. */
const SLOT = 32;

/** A hooked instruction. */
export interface BreakpointTarget {
  /** Guest-physical address. */
  readonly physical: bigint;
  /** Address as the guest sees it (for RIP). */
  readonly virtual: bigint;
}

interface TargetState extends BreakpointTarget {
  state: 'armed' | 'stepping';
  /** Re-arm at the next exit (a successor could not be trapped). */
  lazy: boolean;
  /** Seq of the hit that made it lazy: re-arming waits for a later exit. */
  lazySince: number;
}

/** Counters of the engine. */
export interface PatchStats {
  /** Target hits. */
  hits: number;
  /** Successor traps that fired (re-arming a target). */
  rearms: number;
  /** Targets that had to wait for the next exit to be re-armed. */
  lazyRearms: number;
  /** Hits resumed through an out-of-line copy (one exit; the trap stayed armed). */
  outOfLine: number;
}

/** A target's out-of-line copy, valid while its bytes and address are unchanged. */
interface OutOfLineCopy {
  /** The original bytes it was made from. */
  readonly bytes: Uint8Array;
  /** RIP of the target it was made for. */
  readonly rip: bigint;
  /** Slot (virtual) holding the copy; undefined when the instruction must run in place. */
  readonly slot: bigint | undefined;
}

/** The engine: one per trap kind per machine. */
export class PatchBreakpoints {
  /** Which trap it patches. */
  readonly kind: TrapKind;
  readonly #cpu: CpuAccess;
  readonly #patches = new Map<bigint, Uint8Array>(); // physical → original bytes
  readonly #targets = new Map<bigint, TargetState>();
  readonly #rearmAt = new Map<bigint, Set<TargetState>>(); // trap address → targets to re-arm
  readonly #stats: PatchStats = { hits: 0, rearms: 0, lazyRearms: 0, outOfLine: 0 };
  readonly #copies = new Map<bigint, OutOfLineCopy>(); // target physical → out-of-line copy

  readonly #outOfLineOn: boolean;

  /**
   * @param kind - trap kind. @param cpu - vCPU access.
   * @param options - `outOfLine` (default true): run movable hooked instructions out of line (`probe` kind only).
   */
  constructor(kind: TrapKind, cpu: CpuAccess, options: { readonly outOfLine?: boolean } = {}) {
    this.kind = kind;
    this.#cpu = cpu;
    this.#outOfLineOn = kind === 'probe' && options.outOfLine !== false;
  }

  /** Length of the trap in bytes. */
  get trapLength(): number {
    return TRAP[this.kind].length;
  }

  /** Counters (copy). */
  stats(): PatchStats {
    return { ...this.#stats };
  }

  /** Whether any target is waiting for a lazy re-arm. */
  get hasLazy(): boolean {
    for (const t of this.#targets.values()) if (t.lazy) return true;
    return false;
  }

  /** Targets currently registered (physical addresses). */
  targets(): bigint[] {
    return [...this.#targets.keys()];
  }

  /** Whether `physical` currently holds a trap. */
  isPatched(physical: bigint): boolean {
    return this.#patches.has(physical);
  }

  /**
   * Hooks the instruction at `target` and arms its trap.
   * @throws when the bytes are unreadable or the trap would overlap another one.
   */
  add(target: BreakpointTarget): void {
    if (this.#targets.has(target.physical)) return;
    if (this.#overlaps(target.physical)) throw new InvalidArgumentError('target.physical', `a ${this.kind} trap at 0x${target.physical.toString(16)} would overlap another trap`);
    const t: TargetState = { ...target, state: 'armed', lazy: false, lazySince: 0 };
    this.#patch(t.physical);
    this.#targets.set(t.physical, t);
  }

  /** Unhooks `physical`, restoring every byte the engine changed for it. */
  remove(physical: bigint): void {
    const t = this.#targets.get(physical);
    if (!t) return;
    this.#targets.delete(physical);
    this.#copies.delete(physical);
    for (const [at, set] of this.#rearmAt) {
      if (set.delete(t) && set.size === 0) { this.#rearmAt.delete(at); if (!this.#targets.has(at)) this.#unpatch(at); }
    }
    this.#unpatch(physical);
  }

  /**
   * Writes `bytes` at `physical` on the guest's behalf (a write the monitor performs, e.g. to a
   * write-protected page) without destroying traps: bytes that fall under a trap update the
   * saved original instead, so the trap stays armed and restores the *new* code when it fires.
   * Bytes under `other`'s traps are left to `other` (call it with the same bytes and `this`).
   */
  write(physical: bigint, bytes: Uint8Array, other?: PatchBreakpoints): void {
    const len = BigInt(this.trapLength);
    const end = physical + BigInt(bytes.length);
    let covered = other !== undefined && other.#patches.size > 0;
    for (const [at, original] of this.#patches) {
      if (at + len <= physical || end <= at) continue;
      covered = true;
      for (let i = 0n; i < len; i++) {
        const a = at + i;
        if (a >= physical && a < end) original[Number(i)] = bytes[Number(a - physical)] as number;
      }
    }
    if (!covered) { this.#cpu.memory.write(physical, bytes); return; }
    for (let i = 0; i < bytes.length; i++) {
      const a = physical + BigInt(i);
      if (!this.covers(a) && !other?.covers(a)) this.#cpu.memory.write(a, bytes.subarray(i, i + 1));
    }
  }

  /** Whether the byte at `physical` is currently part of a trap. */
  covers(physical: bigint): boolean {
    const len = BigInt(this.trapLength);
    for (const at of this.#patches.keys()) if (physical >= at && physical < at + len) return true;
    return false;
  }

  /**
   * After the machine's RAM was put back to a snapshot (`Machine.reset`): the traps and the
   * trampoline's slots are gone from guest RAM. Takes the current bytes as the originals,
   * writes every trap again and forgets the slots (made again at the next hit).
   */
  afterReset(): void {
    this.#copies.clear();
    this.#slotOf.clear();
    this.#slotOwner.length = 0;
    this.#nextSlot = 0;
    // A hit in progress (a successor trap armed) belongs to CPU state the reset discarded.
    this.#rearmAt.clear();
    this.#patches.clear();
    for (const t of this.#targets.values()) {
      t.state = 'armed';
      t.lazy = false;
      this.#patch(t.physical);
    }
  }

  /** Puts the original bytes back but keeps every trap on record, for {@link resume} (a snapshot's capture). */
  suspend(): void {
    for (const [at, original] of this.#patches) this.#cpu.memory.write(at, original);
  }

  /** Writes the traps {@link suspend} took out back into guest RAM. */
  resume(): void {
    const trap = TRAP[this.kind];
    for (const at of this.#patches.keys()) this.#cpu.memory.write(at, trap);
  }

  /** Restores all original bytes (monitor detach). */
  clear(): void {
    for (const at of [...this.#patches.keys()]) this.#unpatch(at);
    this.#targets.clear();
    this.#rearmAt.clear();
    this.#copies.clear();
  }

  /**
   * Handles a trap whose first byte is at linear address `linear`; `rip` is the RIP value that
   * points at it (RIP excludes the CS base outside 64-bit mode). Restores the original bytes,
   * rewinds RIP, re-arms what waited for this trap and, if it was a target, arms its successors.
   * `sregs`: the vCPU's special registers at this exit, when the caller already has them.
   * @returns whether the trap was ours and which target (if any) was hit.
   */
  onTrap(linear: bigint, rip: bigint, seq: number, sregs: Sregs = this.#cpu.sregs()): { readonly ours: boolean; readonly hit: BreakpointTarget | undefined } {
    const physical = translateVirtual(this.#cpu.memory, sregs, linear);
    if (physical === undefined || !this.#patches.has(physical)) return { ours: false, hit: undefined };
    const armed = this.#targets.get(physical);
    if (this.#outOfLineOn && armed?.state === 'armed' && !this.#rearmAt.has(physical)) {
      const slot = this.#outOfLine(armed, rip, sregs);
      if (slot !== undefined) {
        this.#stats.hits++;
        this.#stats.outOfLine++;
        this.#cpu.setRip(slot);
        return { ours: true, hit: armed };
      }
    }
    this.#unpatch(physical);
    this.#cpu.setRip(this.kind === 'probe' ? this.#resumeVia(rip, sregs) : rip);
    const waiting = this.#rearmAt.get(physical);
    this.#rearmAt.delete(physical);
    if (waiting) {
      this.#stats.rearms++;
      const len = BigInt(this.trapLength);
      for (const t of waiting) {
        // Re-arming t here would put its trap over the instruction the guest resumes at (a 2-byte
        // probe on a 1-byte instruction): hop one more instruction first.
        if (t.physical < physical && physical < t.physical + len && t.state === 'stepping') this.#armSuccessors(t, physical, rip, sregs, seq);
        else this.#rearm(t, seq);
      }
    }
    const t = this.#targets.get(physical);
    if (!t) return { ours: true, hit: undefined };
    this.#stats.hits++;
    t.state = 'stepping';
    this.#armSuccessors(t, t.physical, rip, sregs, seq);
    return { ours: true, hit: t };
  }

  readonly #slotOf = new Map<string, number>(); // owner key → slot index
  readonly #slotOwner: Array<string | undefined> = [];
  #nextSlot = 0;

  /** Whether the trampoline page can be used by code at this CPU state. */
  #trampoline(sregs: Sregs): { readonly physical: bigint; readonly virtual: bigint; readonly size: number } | undefined {
    const tr = this.#cpu.trampoline;
    if (!tr || bitnessOf(sregs) === 16 || translateVirtual(this.#cpu.memory, sregs, tr.virtual) !== tr.physical) return undefined;
    return tr;
  }

  /**
   * The slot owned by `key`, and whether it was already there. Slots are kept per owner (an
   * interrupt may run before the guest leaves one); when all are used, the oldest is recycled.
   */
  #slot(tr: { readonly physical: bigint; readonly virtual: bigint; readonly size: number }, key: string): { index: number; fresh: boolean } {
    const have = this.#slotOf.get(key);
    if (have !== undefined) return { index: have, fresh: false };
    const index = this.#nextSlot++ % Math.floor(tr.size / SLOT);
    const old = this.#slotOwner[index];
    if (old !== undefined) {
      this.#slotOf.delete(old);
      if (old.startsWith('x')) this.#copies.delete(BigInt(old.slice(1)));
    }
    this.#slotOwner[index] = key;
    this.#slotOf.set(key, index);
    return { index, fresh: true };
  }

  /**
   * Where to put RIP so the guest resumes at `rip`. At a PIO exit KVM leaves RIP *at* the `out`
   * and skips it when the next `KVM_RUN` completes the access — unless RIP changed meanwhile.
   * Writing the same RIP back would make KVM skip the restored instruction, so the guest resumes
   * at a per-address trampoline slot holding `jmp rip` instead (one extra jump, no extra exit).
   */
  #resumeVia(rip: bigint, sregs: Sregs): bigint {
    const tr = this.#trampoline(sregs);
    const bits = bitnessOf(sregs);
    if (!tr) throw new StateError(`cannot resume a probe at 0x${rip.toString(16)}: no trampoline page is mapped (KVM would skip the restored instruction)`);
    const { index, fresh } = this.#slot(tr, `j${rip}`);
    const slot = tr.virtual + BigInt(index * SLOT);
    if (fresh) {
      const rel = rip - (slot + 5n);
      const code = new Uint8Array(SLOT).fill(0xcc);
      if (rel >= -(1n << 31n) && rel < 1n << 31n) {
        code[0] = 0xe9; // jmp rel32
        new DataView(code.buffer).setInt32(1, Number(rel), true);
      } else if (bits === 64) {
        code.set([0xff, 0x25, 0, 0, 0, 0]); // jmp [rip+0]; .quad rip
        new DataView(code.buffer).setBigUint64(6, rip, true);
      } else {
        this.#slotOf.delete(`j${rip}`);
        this.#slotOwner[index] = undefined;
        throw new StateError(`cannot resume a probe at 0x${rip.toString(16)}: out of jump range of the trampoline`);
      }
      this.#cpu.memory.write(tr.physical + BigInt(index * SLOT), code);
    }
    return slot;
  }

  /**
   * Up to 15 bytes of guest code at `physical` (to the end of its page) as the guest's program
   * has them: this engine's traps (and `other`'s) replaced by the bytes they cover.
   */
  originalCode(physical: bigint, other?: PatchBreakpoints): Uint8Array {
    const room = 4096 - Number(physical & 0xfffn);
    const bytes = readCode(this.#cpu.memory, physical).slice(0, room);
    const end = physical + BigInt(bytes.length);
    for (const patches of other ? [this.#patches, other.#patches] : [this.#patches]) {
      for (const [at, original] of patches) {
        if (at + BigInt(original.length) <= physical || at >= end) continue;
        for (let i = 0; i < original.length; i++) {
          const a = at + BigInt(i);
          if (a >= physical && a < end) bytes[Number(a - physical)] = original[i] as number;
        }
      }
    }
    return bytes;
  }

  /**
   * Exits a hit on the target at `physical` (RIP `rip`) costs with the CPU in the state `sregs`:
   * 1 out of line; 2 in place (the trap, then the successor trap that re-arms it); 3 in place
   * when the instruction is shorter than the trap (its successor lies under the re-armed trap,
   * so re-arming hops one more instruction). For the cost model; changes nothing.
   */
  exitsPerHit(physical: bigint, rip: bigint, sregs: Sregs): 1 | 2 | 3 {
    const code = this.originalCode(physical);
    const tr = this.#outOfLineOn ? this.#xolTrampoline(sregs) : undefined;
    if (tr !== undefined && this.#relocate(code, rip, sregs, tr.virtual) !== undefined) return 1;
    const bits = bitnessOf(sregs);
    const length = bits === 16 ? this.trapLength : decodeBytes(code, rip, bits).length;
    return length > 0 && length < this.trapLength ? 3 : 2;
  }

  /** The trampoline, if out-of-line copies can run from it: outside 64-bit mode RIP is CS-relative and the trampoline's address linear, so CS must be flat. */
  #xolTrampoline(sregs: Sregs): { readonly physical: bigint; readonly virtual: bigint; readonly size: number } | undefined {
    const tr = this.#trampoline(sregs);
    return tr && (bitnessOf(sregs) === 64 || sregs.cs.base === 0n) ? tr : undefined;
  }

  /** The relocated copy of the instructions at the start of `bytes` for address `at`, if it fits a slot. */
  #relocate(bytes: Uint8Array, rip: bigint, sregs: Sregs, at: bigint): Uint8Array | undefined {
    const copy = relocateOutOfLine(bytes, rip, bitnessOf(sregs), this.trapLength, at);
    return copy && copy.code.length <= SLOT ? copy.code : undefined;
  }

  /**
   * The slot of target `t`'s out-of-line copy (made on first use, remade when its bytes
   * changed), or undefined when it must run in place (see {@link relocateOutOfLine}).
   */
  #outOfLine(t: TargetState, rip: bigint, sregs: Sregs): bigint | undefined {
    const bytes = this.originalCode(t.physical);
    const have = this.#copies.get(t.physical);
    if (have && have.rip === rip && sameBytes(have.bytes, bytes)) return have.slot;
    const tr = this.#xolTrampoline(sregs);
    if (!tr) return undefined;
    const key = `x${t.physical}`;
    const { index } = this.#slot(tr, key);
    const slot = tr.virtual + BigInt(index * SLOT);
    const copy = this.#relocate(bytes, rip, sregs, slot);
    if (!copy) {
      this.#slotOf.delete(key);
      this.#slotOwner[index] = undefined;
      this.#copies.set(t.physical, { bytes, rip, slot: undefined });
      return undefined;
    }
    const code = new Uint8Array(SLOT).fill(0xcc);
    code.set(copy);
    this.#cpu.memory.write(tr.physical + BigInt(index * SLOT), code);
    this.#copies.set(t.physical, { bytes, rip, slot });
    return slot;
  }

  /** Re-arms lazily waiting targets; call at any exit after the one that hit them. */
  rearmLazy(seq: number): void {
    const rip = this.#cpu.regs().rip;
    for (const t of this.#targets.values()) {
      if (!t.lazy || t.state !== 'stepping' || seq <= t.lazySince || t.virtual === rip) continue;
      this.#rearm(t, seq);
    }
  }

  #rearm(t: TargetState, seq: number): void {
    if (!this.#targets.has(t.physical) || t.state !== 'stepping') return;
    // Another successor of the same hit may still hold a trap: it is no longer needed.
    for (const [at, set] of this.#rearmAt) {
      if (set.delete(t) && set.size === 0) { this.#rearmAt.delete(at); if (!this.#targets.has(at)) this.#unpatch(at); }
    }
    if (this.#overlaps(t.physical)) { this.#goLazy(t, seq); return; }
    this.#patch(t.physical);
    t.state = 'armed';
    t.lazy = false;
  }

  #goLazy(t: TargetState, seq: number): void {
    t.lazy = true;
    t.lazySince = seq;
    this.#stats.lazyRearms++;
  }

  /** Arms traps at the successors of the instruction at `at` (RIP `rip`); t is re-armed when one fires. */
  #armSuccessors(t: TargetState, at: bigint, rip: bigint, sregs: Sregs, seq: number): void {
    const mem = this.#cpu.memory;
    const bitness = bitnessOf(sregs);
    const bytes = readCode(mem, at);
    const regs = { ...this.#cpu.regs(), rip };
    const read = (va: bigint, width: 2 | 4 | 8): bigint | undefined => {
      const pa = translateVirtual(mem, sregs, va);
      if (pa === undefined) return undefined;
      try { return width === 8 ? mem.readU64(pa) : BigInt(mem.readUint(pa, width)); } catch { return undefined; }
    };
    const succ = successors(bytes, rip, bitness, { regs, read, lstar: () => this.#cpu.msr(IA32_LSTAR) });
    let armed = 0;
    for (const s of succ.addresses) {
      const pa = translateVirtual(mem, sregs, linearRip(sregs, s));
      if (pa === undefined || pa === at) continue;
      if (pa === t.physical && at !== t.physical) { this.#rearm(t, seq); armed++; break; }
      const existing = this.#rearmAt.get(pa);
      if (existing) { existing.add(t); armed++; continue; }
      const other = this.#targets.get(pa);
      if (other && other.state === 'armed') { this.#rearmAt.set(pa, new Set([t])); armed++; continue; }
      if (this.#overlaps(pa)) continue;
      try { this.#patch(pa); } catch { continue; }
      this.#rearmAt.set(pa, new Set([t]));
      armed++;
    }
    // Some successor could not be trapped: re-arm at the next exit as well (hits before it are missed).
    if (armed === 0 || !succ.complete) this.#goLazy(t, seq);
  }

  #overlaps(at: bigint): boolean {
    const len = BigInt(this.trapLength);
    for (const p of this.#patches.keys()) if (p !== at && at < p + len && p < at + len) return true;
    return this.#patches.has(at);
  }

  #patch(at: bigint): void {
    const trap = TRAP[this.kind];
    const original = this.#cpu.memory.read(at, trap.length);
    this.#cpu.memory.write(at, trap);
    this.#patches.set(at, original);
  }

  #unpatch(at: bigint): void {
    const original = this.#patches.get(at);
    if (!original) return;
    this.#cpu.memory.write(at, original);
    this.#patches.delete(at);
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
