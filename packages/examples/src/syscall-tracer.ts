/**
 * Example 2 — a system-call tracer. A 64-bit ring-3 program makes `syscall`s; the host points
 * `IA32_LSTAR` at a tiny handler; the monitor hooks the instruction at the `LSTAR` entry (an
 * `exec` event: KVM guest debug where calibration says it works at that CPL, else the patched
 * probe) and logs each call's number and arguments. The cost report prices the hook.
 *
 * The handler returns with `jmp rcx` (RCX holds the return RIP after `syscall`), not `sysretq`:
 * on PVM the LSTAR handler runs at CPL3, where `sysretq` faults; `jmp rcx` works on every host
 * (on VMX/SVM the program simply continues at CPL0 after its first call).
 *
 *   pnpm example:syscall-tracer
 *
 * @module
 */
import { Machine, type Stop } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Monitor, predict, renderTable, report, type CostReport, type PlanEntry, type Prediction } from '@tsvm/monitor';
import { hex, hostCalibration, isMain, runCli } from './support.js';

const IA32_STAR = 0xc000_0081;
const IA32_LSTAR = 0xc000_0082;
const IA32_FMASK = 0xc000_0084;
/** Where the program is loaded. */
export const PROGRAM_AT = 0x1000;
/** Where the LSTAR handler is loaded. */
export const HANDLER_AT = 0x3000;

/** The calls the program makes: [number, rdi, rsi, rdx]. */
export const CALLS: ReadonlyArray<readonly [number, number, number, number]> = [
  [1, 1, 0x2000, 14], // write(1, buf, 14)
  [39, 0, 0, 0], // getpid()
  [9, 0, 4096, 3], // mmap(0, 4096, PROT_READ|PROT_WRITE)
  [60, 7, 0, 0], // exit(7)
];

function program(): string {
  const calls = CALLS.map(([nr, a, b, c]) => `mov eax, ${nr}\n mov edi, ${a}\n mov esi, ${b}\n mov edx, ${c}\n syscall`).join('\n');
  return `${calls}\n mov dx, 0xf4\n mov al, 0\n out dx, al`;
}

// The kernel side: count the call in r15, return to the caller.
const HANDLER = 'inc r15\n jmp rcx';

/** One traced call. */
export interface TracedCall {
  /** rax. */
  readonly nr: number;
  /** rdi, rsi, rdx. */
  readonly args: readonly [bigint, bigint, bigint];
  /** Return address (rcx). */
  readonly from: bigint;
}

/** What {@link runSyscallTracer} found. */
export interface SyscallTracerResult {
  /** Why the guest stopped (expected: `debug-exit`). */
  readonly stop: Stop;
  /** Calls in order. */
  readonly calls: readonly TracedCall[];
  /** The guest's own count (r15). */
  readonly guestCount: bigint;
  /** CPL the handler runs at here. */
  readonly handlerCpl: 0 | 3;
  /** The plan (mechanism and why). */
  readonly plan: readonly PlanEntry[];
  /** Predicted before the run. */
  readonly prediction: Prediction;
  /** Priced after it. */
  readonly report: CostReport;
}

/** Runs the example and returns what happened (prints nothing). */
export async function runSyscallTracer(): Promise<SyscallTracerResult> {
  const calibration = await hostCalibration();
  await using vm = await Machine.create({ memory: 2 * 1024 * 1024, name: 'syscall-tracer' });
  vm.io.register({ port: 0xf4, size: 1 }, { name: 'debug-exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  vm.memory.write(HANDLER_AT, await asm(HANDLER, { bits: 64, address: HANDLER_AT }));
  vm.loadFlat(await asm(program(), { bits: 64, address: PROGRAM_AT }), { at: PROGRAM_AT, mode: 'long', ring: 3 });
  const vcpu = vm.vcpu(0);
  vcpu.setMsrs([
    { index: IA32_STAR, data: 0x0018_0008n << 32n },
    { index: IA32_LSTAR, data: BigInt(HANDLER_AT) },
    { index: IA32_FMASK, data: 0x4700n }, // TF, IF, DF, NT cleared on entry
  ]);
  vcpu.setRegs({ r15: 0n });

  // On PVM the LSTAR handler runs at CPL3 (HOST-FACTS); on VMX/SVM `syscall` enters CPL0.
  const handlerCpl = vm.capabilities.flavour === 'pvm' ? 3 : 0;
  const mon = new Monitor(vm, calibration ? { calibration } : {});
  const calls: TracedCall[] = [];
  mon.observe({ event: 'exec', address: HANDLER_AT, cpl: handlerCpl }, (_ev, ctx) => {
    const r = ctx.machine.vcpu(ctx.vcpu).getRegs();
    calls.push({ nr: Number(r.rax), args: [r.rdi, r.rsi, r.rdx], from: r.rcx });
  }, { name: 'syscall-entry' });
  mon.seal();
  const plan = mon.plan();
  const prediction = predict(plan, { 'syscall-entry': CALLS.length }, mon.calibration);
  const stop = await vm.run({ timeout: 10_000 });
  const guestCount = vcpu.getRegs().r15;
  const cost = report(mon, { run: stop });
  mon.close();
  return { stop, calls, guestCount, handlerCpl, plan, prediction, report: cost };
}

/** Prints the trace and the cost; 0 when every call was traced with the right arguments. */
export async function main(): Promise<number> {
  const r = await runSyscallTracer();
  const p = r.plan[0];
  console.log(`LSTAR handler at ${hex(HANDLER_AT)} runs at CPL${r.handlerCpl}; hooked with ${p?.mechanism}: ${p?.why}`);
  for (const c of r.calls) console.log(`  syscall ${String(c.nr).padStart(3)}(${c.args.map((a) => hex(a)).join(', ')})  from ${hex(c.from)}`);
  console.log(`guest stopped: ${r.stop.reason}; the handler counted ${r.guestCount} calls, the tracer ${r.calls.length}`);
  console.log(`predicted overhead: ${(r.prediction.totalNs / 1e3).toFixed(1)} µs (${r.prediction.source} prices)`);
  console.log(renderTable(r.report));
  const ok = r.stop.reason === 'debug-exit' && r.calls.length === CALLS.length && Number(r.guestCount) === CALLS.length
    && r.calls.every((c, i) => c.nr === CALLS[i]?.[0] && c.args.every((a, j) => a === BigInt(CALLS[i]?.[j + 1] ?? -1)));
  console.log(ok ? 'OK: every system call was traced with its number and arguments' : 'FAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('syscall-tracer', main);
