/**
 * Learns, once per backend, which CPUID feature bits this host's KVM can actually hide from
 * ring-0 code. On VMX/SVM every CPUID exits and KVM answers from the `KVM_SET_CPUID2` table, so
 * every bit is controlled. On PVM (measured, see HOST-FACTS) ring-0 CPUID answers only the bits
 * KVM itself supports (the hypervisor bit, x2APIC, TSC-deadline, CMPXCHG16B …) from the table
 * and passes the others (SSE4, AVX, AES …) through from the CPU underneath. A throw-away
 * real-mode VM runs `cpuid` on every feature register with a table whose feature registers are
 * all zero; whatever it still sees is uncontrolled. About one VM creation and a dozen exits; runs
 * only when a machine asks for a CPU model other than `'host'`. Ring-3 code is not probed: on PVM
 * it sees the outer hypervisor's values entirely.
 * @module
 */
import type { Backend } from '../backend.js';
import { runScratchGuest } from '../backend/scratch-guest.js';
import { applyCpuModel, CPU_FEATURE_REGISTERS, type CpuFeatureRegister } from './models.js';

/** What the probe found. */
export interface CpuidControl {
  /** Per feature register, the bits ring-0 code sees even when the table hides them (0: all controlled). */
  readonly uncontrolled: Readonly<Record<CpuFeatureRegister, number>>;
  /** Whether the probe ran to the end; otherwise `why` says what failed (and every bit counts as controlled). */
  readonly probed: boolean;
  /** Why the probe did not finish. */
  readonly why?: string;
}

const PORT = 0x80;
const REGISTERS = Object.keys(CPU_FEATURE_REGISTERS) as CpuFeatureRegister[];
const cache = new WeakMap<Backend, CpuidControl>();

function imm32(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

/** Real mode at 0: per register `mov eax, leaf; mov ecx, subleaf; cpuid; out PORT, al`, then `hlt`. */
function program(): Uint8Array {
  const code: number[] = [];
  for (const name of REGISTERS) {
    const r = CPU_FEATURE_REGISTERS[name];
    code.push(0x66, 0xb8, ...imm32(r.leaf), 0x66, 0xb9, ...imm32(r.subleaf ?? 0), 0x0f, 0xa2, 0xe6, PORT);
  }
  code.push(0xf4);
  return Uint8Array.from(code);
}

const none = (): Record<CpuFeatureRegister, number> => Object.fromEntries(REGISTERS.map((r) => [r, 0])) as Record<CpuFeatureRegister, number>;

/** Runs the probe guest on `backend` (once; the result is cached per backend). Never throws. */
export function probeCpuidControl(backend: Backend): CpuidControl {
  const hit = cache.get(backend);
  if (hit) return hit;
  const uncontrolled = none();
  let why: string | undefined;
  try {
    let n = 0;
    const halted = runScratchGuest(backend, {
      name: 'tsvm-cpuid-probe', code: program(), maxExits: REGISTERS.length + 1,
      // Every feature register zero; leaf limits as the host's, so every leaf exists.
      setup: (vcpu) => vcpu.setCpuid(applyCpuModel({ name: 'probe', features: {} }, vcpu.supportedCpuid()).cpuid),
      onExit: (exit, vcpu) => {
        if (exit.kind !== 'io' || exit.port !== PORT) { why = `unexpected ${exit.kind} exit`; return false; }
        const name = REGISTERS[n++];
        if (name === undefined) { why = 'more exits than cpuid probes'; return false; }
        const regs = vcpu.getRegs();
        const reg = CPU_FEATURE_REGISTERS[name].reg;
        const value = reg === 'eax' ? regs.rax : reg === 'ebx' ? regs.rbx : reg === 'ecx' ? regs.rcx : regs.rdx;
        uncontrolled[name] = Number(value & 0xffff_ffffn);
        return true;
      },
    });
    if (why === undefined && (!halted || n !== REGISTERS.length)) why = `saw ${n} of ${REGISTERS.length} cpuid probes`;
  } catch (e) {
    why = `probe failed: ${e instanceof Error ? e.message : String(e)}`;
  }
  const result: CpuidControl = why === undefined
    ? { uncontrolled: Object.freeze(uncontrolled), probed: true }
    : { uncontrolled: Object.freeze(none()), probed: false, why };
  cache.set(backend, result);
  return result;
}
