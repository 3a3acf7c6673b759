/**
 * Learns, once per backend, where this host's KVM leaves RIP at a port-I/O exit for each
 * instruction form ({@link IoRipBehaviour}). A throw-away real-mode VM executes every form
 * once (`out imm8`, `out dx`, `outsb`, `rep outsb`, and the `in` forms), each followed by a
 * `nop` so "on the instruction" and "after it" are distinct addresses, and the RIP at each
 * exit is compared with where the instruction starts and ends. Costs about one VM creation and
 * eight exits (well under a millisecond on PVM); runs on any {@link Backend}.
 * @module
 */
import type { Backend } from '../backend.js';
import { runScratchGuest } from './scratch-guest.js';
import { IO_INSTRUCTION_CLASSES, RIP_ON_INSTRUCTION, type IoInstructionClass, type IoRipBehaviour, type IoRipRule } from '../cpu/io-rip.js';

/** What the probe found. */
export interface IoRipProbeResult {
  /** Per-class rule (`on` for any class the probe could not observe). */
  readonly behaviour: IoRipBehaviour;
  /** Whether every class was observed; otherwise `why` says what went wrong. */
  readonly probed: boolean;
  /** Why some class fell back to `on`. */
  readonly why?: string;
}

const PORT = 0x80;
const DATA = 0x200;

interface Piece { readonly bytes: readonly number[]; readonly cls?: IoInstructionClass }

// Real mode, CS=DS=ES=0. Every I/O instruction is followed by a nop.
const PROGRAM: readonly Piece[] = [
  { bytes: [0xba, PORT, 0x00] },                   // mov dx, PORT
  { bytes: [0xbe, DATA & 0xff, DATA >> 8] },       // mov si, DATA
  { bytes: [0xbf, DATA & 0xff, DATA >> 8] },       // mov di, DATA
  { bytes: [0xe6, PORT], cls: 'out-imm' }, { bytes: [0x90] },
  { bytes: [0xee], cls: 'out-dx' }, { bytes: [0x90] },
  { bytes: [0x6e], cls: 'outs' }, { bytes: [0x90] },
  { bytes: [0xb9, 0x02, 0x00] },                   // mov cx, 2
  { bytes: [0xf3, 0x6e], cls: 'rep-outs' }, { bytes: [0x90] },
  { bytes: [0xe4, PORT], cls: 'in-imm' }, { bytes: [0x90] },
  { bytes: [0xec], cls: 'in-dx' }, { bytes: [0x90] },
  { bytes: [0x6c], cls: 'ins' }, { bytes: [0x90] },
  { bytes: [0xb9, 0x02, 0x00] },                   // mov cx, 2
  { bytes: [0xf3, 0x6c], cls: 'rep-ins' }, { bytes: [0x90] },
  { bytes: [0xf4] },                               // hlt
];

function layout(): { code: Uint8Array; spans: Array<{ cls: IoInstructionClass; start: bigint; end: bigint }> } {
  const code: number[] = [];
  const spans: Array<{ cls: IoInstructionClass; start: bigint; end: bigint }> = [];
  for (const p of PROGRAM) {
    if (p.cls) spans.push({ cls: p.cls, start: BigInt(code.length), end: BigInt(code.length + p.bytes.length) });
    code.push(...p.bytes);
  }
  return { code: Uint8Array.from(code), spans };
}

/** Runs the probe guest on `backend` and reports the per-class rule. Never throws. */
export function probeIoRip(backend: Backend): IoRipProbeResult {
  const found = new Map<IoInstructionClass, IoRipRule>();
  let why: string | undefined;
  try {
    const { code, spans } = layout();
    runScratchGuest(backend, {
      name: 'tsvm-io-rip-probe', code, maxExits: 32,
      onExit: (exit, vcpu) => {
        if (exit.kind !== 'io') { why = `unexpected ${exit.kind} exit`; return false; }
        const rip = vcpu.getRegs().rip;
        const span = spans.find((s) => s.start === rip || s.end === rip);
        if (span && !found.has(span.cls)) found.set(span.cls, span.start === rip ? 'on' : 'after');
        if (exit.direction === 'in') vcpu.completeRead(new Uint8Array(exit.size * exit.count));
        return true;
      },
    });
  } catch (e) {
    why = `probe failed: ${e instanceof Error ? e.message : String(e)}`;
  }
  const behaviour = Object.fromEntries(IO_INSTRUCTION_CLASSES.map((c) => [c, found.get(c) ?? RIP_ON_INSTRUCTION[c]])) as Record<IoInstructionClass, IoRipRule>;
  const missing = IO_INSTRUCTION_CLASSES.filter((c) => !found.has(c));
  if (missing.length > 0) why ??= `not observed: ${missing.join(', ')}`;
  return why === undefined ? { behaviour: Object.freeze(behaviour), probed: true } : { behaviour: Object.freeze(behaviour), probed: false, why };
}
