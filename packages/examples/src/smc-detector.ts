/**
 * Example 3 — a self-modifying-code detector (the malware-unpacking pattern). The guest
 * "unpacks" a payload: it XOR-decodes bytes from its data into a code buffer, then jumps to the
 * buffer. The monitor write-watches the code page (mediate: every write exits, and the monitor
 * performs it) and hooks execution at the buffer's entry; it reports the first execution of
 * bytes the guest itself wrote: where, which instruction (decoded from the *new* bytes), and
 * who wrote them.
 *
 * The write-watch and the exec hook share a page: the monitor performs the guest's writes
 * through its patch engine, so a probe on the buffer survives being overwritten and restores
 * the freshly written instruction when it fires.
 *
 *   pnpm example:smc-detector
 *
 * @module
 */
import { Machine, type Stop } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Monitor, allow, formatInstruction, type PlanEntry } from '@tsvm/monitor';
import { hex, hostCalibration, isMain, runCli } from './support.js';

/** Code page the unpacker writes into. */
export const BUFFER = 0x10_0000;
const PACKED_AT = 0x2000;
const KEY = 0x5a;

/** The payload, before packing: prints "unpacked!\n" and ends the run. */
const PAYLOAD = `
    lea rsi, [rip + msg]
    mov dx, 0x3f8
  next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
  done:
    mov dx, 0xf4
    out dx, al
  msg:
    .asciz "unpacked!\\n"
`;

/** The unpacker: XOR-decodes `len` bytes from PACKED_AT into BUFFER, then jumps there. */
function unpacker(len: number): string {
  return `
    mov rsi, ${PACKED_AT}
    mov rdi, ${BUFFER}
    mov ecx, ${len}
  copy:
    lodsb
    xor al, ${KEY}
    stosb
    dec ecx
    jnz copy
    mov rax, ${BUFFER}
    jmp rax
  `;
}

/** One guest write into the watched page. */
export interface CodeWrite {
  /** Guest-physical address. */
  readonly address: bigint;
  /** Bytes written. */
  readonly size: number;
  /** RIP of the writing instruction. */
  readonly rip: bigint;
}

/** The detection. */
export interface SmcDetection {
  /** Where the written bytes first executed. */
  readonly address: bigint;
  /** The instruction there, decoded from the bytes the guest wrote. */
  readonly instruction: string;
  /** Writes that produced the executed byte (the first one). */
  readonly writtenBy: CodeWrite;
  /** Guest writes into the page before the execution. */
  readonly writesBefore: number;
}

/** What {@link runSmcDetector} found. */
export interface SmcDetectorResult {
  /** Why the guest stopped (expected: `debug-exit`, after the payload ran). */
  readonly stop: Stop;
  /** What the payload printed. */
  readonly printed: string;
  /** Every guest write into the page. */
  readonly writes: readonly CodeWrite[];
  /** The first execution of written bytes (undefined: none seen). */
  readonly detection: SmcDetection | undefined;
  /** The plan (mechanisms). */
  readonly plan: readonly PlanEntry[];
}

/** Runs the example and returns what happened (prints nothing). */
export async function runSmcDetector(): Promise<SmcDetectorResult> {
  const calibration = await hostCalibration();
  await using vm = await Machine.create({ memory: 4 * 1024 * 1024, name: 'smc-detector' });
  let printed = '';
  vm.io.register({ port: 0x3f8, size: 1 }, { name: 'console', write: (_o, v) => { printed += String.fromCharCode(v); } });
  vm.io.register({ port: 0xf4, size: 1 }, { name: 'debug-exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  const payload = await asm(PAYLOAD, { bits: 64, address: BUFFER });
  vm.memory.write(PACKED_AT, payload.map((b) => b ^ KEY));
  vm.memory.fill(BUFFER, 0x1000, 0xcc); // the buffer starts as int3 filler
  vm.loadFlat(await asm(unpacker(payload.length), { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });

  const mon = new Monitor(vm, calibration ? { calibration } : {});
  const writes: CodeWrite[] = [];
  const written = new Map<bigint, CodeWrite>(); // byte address → first write
  mon.mediate({ event: 'write-watch', range: [BUFFER, BUFFER + 0xfff] }, (ev, ctx) => {
    if (ev.event !== 'write-watch') return allow();
    const w: CodeWrite = { address: ev.address, size: ev.size, rip: ctx.rip() };
    writes.push(w);
    for (let i = 0n; i < BigInt(ev.size); i++) if (!written.has(ev.address + i)) written.set(ev.address + i, w);
    return allow();
  }, { name: 'code-page-writes' });
  let detection: SmcDetection | undefined;
  mon.observe({ event: 'exec', address: BUFFER }, (ev, ctx) => {
    if (ev.event !== 'exec' || detection) return;
    const by = written.get(ev.address);
    if (!by) return; // original code executing: not self-modified
    detection = { address: ev.address, instruction: formatInstruction(ev.code, ev.rip, 64), writtenBy: by, writesBefore: writes.length };
  }, { name: 'buffer-entry' });
  mon.seal();
  const plan = mon.plan();
  const stop = await vm.run({ timeout: 20_000 });
  mon.close();
  return { stop, printed, writes, detection, plan };
}

/** Prints the detection; 0 when the first execution of written code was caught. */
export async function main(): Promise<number> {
  const r = await runSmcDetector();
  for (const p of r.plan) console.log(`hook ${p.name}: ${p.mechanism} — ${p.why}`);
  console.log(`guest wrote ${r.writes.length} times into the code page ${hex(BUFFER)}..${hex(BUFFER + 0xfff)}`);
  const d = r.detection;
  if (d) {
    console.log(`SELF-MODIFIED CODE EXECUTED at ${hex(d.address)}: ${d.instruction}`);
    console.log(`  byte written by the instruction at RIP ${hex(d.writtenBy.rip)} (${d.writesBefore} writes into the page before it ran)`);
  } else {
    console.log('no execution of written bytes was seen');
  }
  console.log(`payload printed ${JSON.stringify(r.printed)}; guest stopped: ${r.stop.reason}`);
  const ok = d !== undefined && r.stop.reason === 'debug-exit' && r.printed === 'unpacked!\n' && d.writesBefore === r.writes.length;
  console.log(ok ? 'OK: the first execution of self-written code was detected' : 'FAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('smc-detector', main);
