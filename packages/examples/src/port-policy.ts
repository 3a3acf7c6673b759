/**
 * Example 1 — port-I/O access control. A 64-bit ring-3 guest prints through the UART, then
 * tries to read the CMOS clock (ports 0x70/0x71), which the policy forbids. The monitor stops
 * it with a violation naming the port and the instruction; the hash-chained audit log shows
 * every decision and why; the chain verifies, and an edited or removed line is detected.
 *
 *   pnpm example:port-policy
 *
 * @module
 */
import { Machine, type Stop } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Uart16550 } from '@tsvm/devices';
import { Monitor, applyPolicy, verifyAuditLog, type AuditVerification, type Policy } from '@tsvm/monitor';
import { isMain, runCli } from './support.js';

/** The guest: prints "hi\n", then touches the CMOS index port. */
export const GUEST = `
    mov dx, 0x3f8
    mov al, 0x68
    out dx, al
    mov al, 0x69
    out dx, al
    mov al, 0x0a
    out dx, al
    mov al, 0x00
    out 0x70, al
    in al, 0x71
    mov dx, 0xf4
    out dx, al
`;

/** The policy, as data (it could come from a JSON file). */
export const POLICY: Policy = {
  version: 1,
  default: 'deny',
  rules: [
    { id: 'uart-out', event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out', action: 'allow' },
    { id: 'cmos', event: 'pio', ports: [0x70, 0x71], action: 'deny', effect: 'stop', reason: 'the CMOS clock is off limits to this guest' },
    { id: 'exit', event: 'pio', ports: [0xf4, 0xf4], direction: 'out', action: 'allow' },
  ],
};

/** What {@link runPortPolicy} found. */
export interface PortPolicyResult {
  /** Why the guest stopped (expected: `violation`). */
  readonly stop: Stop;
  /** What the guest printed before it was stopped. */
  readonly printed: string;
  /** Accesses that reached the CMOS device (expected: 0 — the deny came first). */
  readonly cmosAccesses: number;
  /** The audit log, one JSON line per decision. */
  readonly audit: readonly string[];
  /** The chain verified as written. */
  readonly verification: AuditVerification;
  /** Verification after editing one line (a deny turned into an allow). */
  readonly afterEdit: AuditVerification;
  /** Verification after removing the first line. */
  readonly afterRemoval: AuditVerification;
}

/** Runs the example and returns what happened (prints nothing). */
export async function runPortPolicy(): Promise<PortPolicyResult> {
  await using vm = await Machine.create({ memory: 2 * 1024 * 1024, name: 'port-policy' });
  const uart = new Uart16550();
  let printed = '';
  uart.onOutput((b) => { printed += Buffer.from(b).toString('latin1'); });
  vm.attachDevice(uart);
  let cmosAccesses = 0;
  // A stand-in CMOS: it counts what reaches it (complete mediation says: nothing).
  vm.io.register({ port: 0x70, size: 2 }, { name: 'cmos', read: () => { cmosAccesses++; return 0; }, write: () => { cmosAccesses++; } });
  vm.io.register({ port: 0xf4, size: 1 }, { name: 'debug-exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  vm.loadFlat(await asm(GUEST, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });

  const audit: string[] = [];
  const mon = new Monitor(vm, { audit });
  applyPolicy(mon, POLICY);
  mon.seal();
  const stop = await vm.run({ timeout: 10_000 });
  uart.flush();
  mon.close();

  const head = mon.audit?.head;
  const verification = verifyAuditLog(audit, head === undefined ? {} : { head });
  const edited = audit.map((l) => l.replace('"decision":"deny"', '"decision":"allow"'));
  return {
    stop, printed, cmosAccesses, audit, verification,
    afterEdit: verifyAuditLog(edited, head === undefined ? {} : { head }),
    afterRemoval: verifyAuditLog(audit.slice(1), head === undefined ? {} : { head }),
  };
}

function describe(v: AuditVerification): string {
  return v.ok ? 'chain intact' : `TAMPERING DETECTED at line ${v.line}: ${v.problem}`;
}

/** Prints the run; 0 when the guest was stopped at the forbidden port and the log checks out. */
export async function main(): Promise<number> {
  const r = await runPortPolicy();
  console.log(`guest printed: ${JSON.stringify(r.printed)}`);
  console.log(`guest stopped: ${r.stop.reason}${r.stop.reason === 'violation' ? `\n  ${r.stop.violation.message}` : ''}`);
  console.log(`accesses that reached the CMOS device: ${r.cmosAccesses}`);
  console.log(`\naudit log (${r.audit.length} lines, sha256-chained):`);
  for (const line of r.audit) console.log(`  ${line}`);
  console.log(`\nverify as written:        ${describe(r.verification)}`);
  console.log(`verify, deny edited:      ${describe(r.afterEdit)}`);
  console.log(`verify, first line gone:  ${describe(r.afterRemoval)}`);
  const denied = r.audit.some((l) => /"decision":"deny".*off limits/.test(l));
  const ok = r.stop.reason === 'violation' && r.printed === 'hi\n' && r.cmosAccesses === 0 && denied
    && r.verification.ok && !r.afterEdit.ok && !r.afterRemoval.ok;
  console.log(ok ? '\nOK: the forbidden port was stopped and the audit log says why' : '\nFAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('port-policy', main);
