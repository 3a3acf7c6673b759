/**
 * Starting the vCPU: `loadFlat` (an image in real, protected or long mode, ring 0 or 3),
 * `enter` (a loader's entry state), the host-reserved *system area* at the top of the first
 * region that protected and long mode need (page tables, GDT, TSS, IDT), and the exception
 * reporter its IDT stubs write to.
 * @module
 */
import { REG_NAMES } from '@tsvm/kvm-backend';
import { hex } from '../address.js';
import { checkBigint, checkObject, show } from '../check.js';
import { EXCEPTION_PORT, SYS, SYSTEM_AREA_SIZE, setupCpu, type CpuMode } from '../cpu/x86.js';

const IA32_LSTAR = 0xc000_0082, IA32_CSTAR = 0xc000_0083;
import { InvalidArgumentError } from '../errors.js';
import type { EntryState } from '../loaders/bootinfo.js';
import type { MachineState } from './state.js';

/** Options of {@link Machine.loadFlat}. */
export interface LoadFlatOptions {
  /** Guest-physical load address. */
  readonly at: number;
  /** CPU mode to start in. Default `'real'`. */
  readonly mode?: CpuMode;
  /** Privilege level to start at (protected and long mode). Default 0. */
  readonly ring?: 0 | 3;
  /** Entry point; defaults to `at`. */
  readonly entry?: number;
  /** Initial stack pointer; defaults below the system area (or below `at` in real mode). */
  readonly stack?: number;
}

/** Where the host put things in guest memory. */
export interface MachineLayout {
  /** Base of the 64 KiB area holding host-built GDT/IDT/TSS/page tables (protected/long mode). */
  readonly systemArea: number | undefined;
  /** Port the exception stubs report to. */
  readonly exceptionPort: number;
  /**
   * A free, identity-mapped, user-accessible page of the system area kept for the monitor's
   * probe trampolines (undefined without a system area, i.e. in real mode).
   */
  readonly probeTrampoline: { readonly address: number; readonly size: number } | undefined;
}

/** @internal `Machine.layout`. */
export function layoutOf(s: MachineState): MachineLayout {
  const sys = s.systemArea;
  return {
    systemArea: sys, exceptionPort: EXCEPTION_PORT,
    probeTrampoline: sys === undefined ? undefined : { address: sys + SYS.PROBE_TRAMPOLINE, size: 0x1000 },
  };
}

/**
 * @internal Where the system area goes: the top 64 KiB of the first region (below 4 GiB), which
 * must start at 0 and hold at least two system areas; undefined when it does not.
 */
export function systemAreaBase(s: MachineState): number | undefined {
  const first = s.memory.regions()[0];
  if (!first || Number(first.start) !== 0 || first.size < 2 * SYSTEM_AREA_SIZE) return undefined;
  return Math.min(first.size, 0x100000000) - SYSTEM_AREA_SIZE;
}

/** @internal `Machine.hostReserved`. */
export function hostReserved(s: MachineState): Array<{ start: number; size: number }> {
  const sys = systemAreaBase(s);
  return sys === undefined ? [] : [{ start: sys, size: SYSTEM_AREA_SIZE }];
}

/** @internal `Machine.loadFlat`. */
export function loadFlat(s: MachineState, image: Uint8Array, options: LoadFlatOptions): void {
  s.assertOpen();
  if (!(image instanceof Uint8Array) || image.length === 0) throw new InvalidArgumentError('image', 'must be a non-empty Uint8Array');
  if (!options || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  const mode = options.mode ?? 'real';
  if (!['real', 'protected', 'long'].includes(mode)) throw new InvalidArgumentError('mode', `must be 'real', 'protected' or 'long', got ${show(mode)}`);
  const ring = options.ring ?? 0;
  if (ring !== 0 && ring !== 3) throw new InvalidArgumentError('ring', `must be 0 or 3, got ${show(ring)}`);
  if (mode === 'real' && ring !== 0) throw new InvalidArgumentError('ring', 'real mode has no rings; use protected or long mode for ring 3');
  const at = checkAddr(options.at, 'at');
  const entry = options.entry === undefined ? at : checkAddr(options.entry, 'entry');
  if (!s.memory.contains(at, image.length)) throw new InvalidArgumentError('at', `image [${hex(at)}, +${image.length}) is not inside guest RAM`);
  if (mode === 'real' && at + image.length > 0x100000) throw new InvalidArgumentError('at', 'real-mode code must lie below 1 MiB');
  let systemArea: number | undefined;
  if (mode !== 'real') {
    systemArea = systemAreaBase(s);
    if (systemArea === undefined) throw new InvalidArgumentError('memory', `protected and long mode need a RAM region at 0 of at least ${2 * SYSTEM_AREA_SIZE} bytes`);
    if (at < systemArea + SYSTEM_AREA_SIZE && at + image.length > systemArea) throw new InvalidArgumentError('at', `image overlaps the system area at ${hex(systemArea)}`);
  }
  const stack = options.stack === undefined ? (systemArea ?? Math.min(at, 0x10000) & ~0xf) : checkAddr(options.stack, 'stack');
  if (!s.memory.contains(entry, 1)) throw new InvalidArgumentError('entry', `${hex(entry)} is not inside guest RAM`);
  s.memory.write(at, image);
  const vcpu = s.vcpu(0).backend;
  const state = setupCpu(s.memory, { regs: vcpu.getRegs(), sregs: vcpu.getSregs() }, { mode, ring, entry, stack, systemArea: systemArea ?? 0 });
  vcpu.setSregs(state.sregs);
  vcpu.setRegs(state.regs);
  if (mode === 'long' && systemArea !== undefined) syscallToStub(vcpu, systemArea);
  adoptCpu(s, mode, systemArea);
}

/**
 * Points `syscall` (EFER.SCE is set) at the host's stub, which reports it as #UD, instead of
 * `IA32_LSTAR`'s reset value 0: guest RAM, where a ring-3 guest could put code to run at CPL0.
 * A guest kernel, or the host (`vcpu.setMsrs`), sets its own handler over it.
 */
function syscallToStub(vcpu: { setMsrs(m: readonly { index: number; data: bigint }[]): void }, sys: number): void {
  const at = BigInt(sys + SYS.SYSCALL_STUB);
  vcpu.setMsrs([{ index: IA32_LSTAR, data: at }, { index: IA32_CSTAR, data: at }]);
}

/** @internal `Machine.enter`. */
export function enter(s: MachineState, entry: EntryState): void {
  s.assertOpen();
  if (!entry || (entry.mode !== 'protected32' && entry.mode !== 'long64')) throw new InvalidArgumentError('entry', "must be a loader EntryState ('protected32' or 'long64')");
  checkBigint(entry.rip, 'entry.rip', 0n, (1n << 64n) - 1n);
  const registers = checkObject(entry.registers, 'entry.registers');
  for (const [k, v] of Object.entries(registers)) {
    if (!(REG_NAMES as readonly string[]).includes(k)) throw new InvalidArgumentError(`entry.registers.${k}`, 'unknown register');
    if (v !== undefined) checkBigint(v, `entry.registers.${k}`, 0n, (1n << 64n) - 1n);
  }
  const sys = systemAreaBase(s);
  if (sys === undefined) throw new InvalidArgumentError('memory', `entering an image needs a RAM region at 0 of at least ${2 * SYSTEM_AREA_SIZE} bytes`);
  if (entry.rip >= BigInt(sys) && entry.rip < BigInt(sys + SYSTEM_AREA_SIZE)) throw new InvalidArgumentError('entry.rip', 'lies in the host-reserved system area');
  const vcpu = s.vcpu(0).backend;
  const mode: CpuMode = entry.mode === 'long64' ? 'long' : 'protected';
  // A stack below the system area until the guest sets its own: with RSP=0 the first
  // exception would push into unmapped memory and triple-fault instead of being reported.
  const state = setupCpu(s.memory, { regs: vcpu.getRegs(), sregs: vcpu.getSregs() }, { mode, ring: 0, entry: Number(entry.rip), stack: sys, systemArea: sys });
  if (mode === 'protected') { state.sregs.cr4 = 0n; }
  for (const [k, v] of Object.entries(entry.registers)) if (v !== undefined) state.regs[k as 'rax' | 'rbx' | 'rsi'] = v;
  vcpu.setSregs(state.sregs);
  vcpu.setRegs(state.regs);
  if (mode === 'long') syscallToStub(vcpu, sys);
  adoptCpu(s, mode, sys);
}

/**
 * @internal Records the CPU set-up the host made (by `loadFlat`, `enter` or a snapshot restore);
 * outside real mode the IDT stubs report exceptions, so their port gets its reporter.
 */
export function adoptCpu(s: MachineState, mode: CpuMode, systemArea: number | undefined): void {
  s.mode = mode;
  s.systemArea = systemArea;
  if (mode !== 'real') registerExceptionReporter(s);
}

function registerExceptionReporter(s: MachineState): void {
  if (s.io.find(BigInt(EXCEPTION_PORT))) return;
  s.io.register({ port: EXCEPTION_PORT, size: 1 }, {
    name: 'tsvm-exception-reporter',
    write: (_o, value, _s, access) => {
      if (value === 1) s.debugTraps++;
      access.requestStop({ reason: 'exception', vector: value });
    },
  }, { claim: 'exception' });
}

function checkAddr(v: unknown, name: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new InvalidArgumentError(name, `must be a non-negative integer address, got ${show(v)}`);
  return v;
}
