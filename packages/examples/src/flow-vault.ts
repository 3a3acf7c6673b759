/**
 * Information flow between machines — three machines on a vsock router under a flow policy:
 * `vault` holds a key, `worker` computes with it, `outside` is the sink. The policy lets the key
 * reach `worker`, and `worker` reach `outside` only through the `dlp` guard, which declassifies
 * `key` for messages that do not contain key material and blocks the rest. The analysis proves
 * every path from `key` to `outside` passes `dlp`; the run shows a result going out, an
 * exfiltration attempt blocked and a direct vault → outside connection refused, all in the
 * hash-chained audit log.
 *
 * The machines are host-level here (their drivers run in this process over real virtio-mmio
 * transports and test guest memory); the router, policy and audit are the ones a real guest meets.
 *
 *   pnpm example:flow-vault
 *
 * @module
 */
import { VsockRouter } from '@tsvm/devices';
import {
  AuditLog, FlowMonitor, analyzeFlows, explain, verifyAuditLog,
  type FlowPolicy, type GuardFn, type FlowCostReport, formatNs, type Topology, type TagReach, type AuditVerification, type ConnectDecision,
} from '@tsvm/monitor';
import { GuestSockets, tick, type GuestStream } from './flow-support.js';
import { isMain, runCli } from './support.js';

/** The key the vault hands out. */
export const KEY = 'K3Y-5f1a9c0de4b27731';

/** Machines, CIDs and labels. */
export const TOPOLOGY: Topology = {
  version: 1,
  principals: {
    vault: { kind: 'machine', cid: 3, secrecy: ['key'] },
    worker: { kind: 'machine', cid: 4, secrecy: ['key'] },
    outside: { kind: 'machine', cid: 5 },
  },
};

/** The policy, as data. */
export const POLICY: FlowPolicy = {
  version: 1,
  guards: { dlp: { declassify: ['key'], timeoutMs: 50, description: 'blocks anything that looks like key material' } },
  rules: [
    { id: 'fetch-key', source: 'worker', destination: 'vault', port: 1, action: 'allow' },
    { id: 'publish', source: 'worker', destination: 'outside', port: 80, action: 'allow', guard: 'dlp' },
  ],
};

/** The DLP guard: key-shaped strings are blocked; everything else leaves without the `key` tag. */
export const dlp: GuardFn = (data) => (/K3Y-[0-9a-f]{16}/.test(new TextDecoder().decode(data))
  ? { action: 'block', reason: 'key material in the message' }
  : { action: 'allow', declassify: ['key'] });

/** What {@link runFlowVault} found. */
export interface FlowVaultResult {
  /** Paths from `key` to `outside`. */
  readonly reach: TagReach;
  /** Whether every such path passes `dlp`. */
  readonly onlyThroughDlp: boolean;
  /** The flow graph. */
  readonly dot: string;
  /** What `outside` received. */
  readonly outsideReceived: string;
  /** Whether the worker's stream to outside was reset by the blocked message. */
  readonly exfiltrationReset: boolean;
  /** The refused direct vault → outside connection, as the monitor decided it. */
  readonly direct: ConnectDecision;
  /** Whether the vault's own attempt through the router got an RST. */
  readonly directViaRouterRefused: boolean;
  /** What mediation cost, per rule and guard. */
  readonly costs: FlowCostReport;
  /** Audit lines. */
  readonly audit: readonly string[];
  /** Chain check. */
  readonly verification: AuditVerification;
}

/** Runs the scenario. */
export async function runFlowVault(): Promise<FlowVaultResult> {
  const analysis = analyzeFlows(POLICY, TOPOLOGY);
  const audit: string[] = [];
  const log = new AuditLog(audit);
  const flow = new FlowMonitor({ policy: POLICY, topology: TOPOLOGY, guards: { dlp }, audit: log });
  const router = new VsockRouter({ mediator: flow });
  const world: GuestSockets[] = [];
  const vault = new GuestSockets(3, world), worker = new GuestSockets(4, world), outside = new GuestSockets(5, world);
  router.attach(vault.guest.device, 'vault');
  router.attach(worker.guest.device, 'worker');
  router.attach(outside.guest.device, 'outside');
  vault.listen(1, (s) => s.send(KEY));
  const accepted: GuestStream[] = [];
  outside.listen(80, (s) => accepted.push(s));
  const pumpAll = async (): Promise<void> => {
    for (let i = 0; i < 5; i++) {
      await tick();
      vault.pump(); worker.pump(); outside.pump();
    }
  };

  const keyStream = await worker.connect(3, 1);
  await pumpAll();
  const key = keyStream?.received ?? '';
  const out = await worker.connect(5, 80);
  await pumpAll();
  out?.send(`result computed with a ${key.length}-char key: 42\n`);
  await pumpAll();
  out?.send(`oops: ${key}\n`); // the exfiltration attempt
  await pumpAll();
  const direct = await flow.connect({ source: 'vault', destination: 'outside', port: 80 });
  const viaRouter = await vault.connect(5, 80);
  await pumpAll();
  const outsideReceived = accepted.map((s) => s.received).join('');
  router.close();
  return {
    reach: analysis.reach('key', 'outside'),
    onlyThroughDlp: analysis.onlyThrough('key', 'outside', 'dlp'),
    dot: analysis.toDot(),
    outsideReceived,
    exfiltrationReset: out?.reset ?? false,
    direct,
    directViaRouterRefused: viaRouter === null,
    costs: flow.costs(),
    audit,
    verification: verifyAuditLog(audit, { head: log.head }),
  };
}

/** Prints the run; 0 when the key reached outside only through dlp and the exfiltration was blocked. */
export async function main(): Promise<number> {
  const r = await runFlowVault();
  console.log('analysis: paths from tag `key` to `outside`, shortest first:');
  for (const p of r.reach.paths) console.log(`  ${p.hops.join(' → ')}   guards: ${p.guards.join(', ') || '(none)'}`);
  console.log(`every path passes dlp: ${r.onlyThroughDlp}\n`);
  console.log(r.dot);
  console.log(`outside received: ${JSON.stringify(r.outsideReceived)}`);
  console.log(`worker's stream to outside reset after the exfiltration attempt: ${r.exfiltrationReset}`);
  console.log(`\n${explain(r.direct)}\n`);
  console.log(`audit log (${r.audit.length} lines, sha256-chained):`);
  for (const l of r.audit) {
    const e = JSON.parse(l) as { event: string; decision: string; reason: string; flow: { from: string; to: string } };
    console.log(`  ${e.event.padEnd(13)} ${e.flow.from} → ${e.flow.to}  ${e.decision.toUpperCase().padEnd(5)} ${e.reason}`);
  }
  console.log(`chain: ${r.verification.ok ? 'intact' : 'BROKEN'}`);
  console.log('\ncost of mediation (measured, audit logging included):');
  for (const row of r.costs.rows) console.log(`  ${row.kind} ${row.name.padEnd(10)} ${row.connections} conn  ${row.messages} msg  ${row.bytes} B  ${formatNs(row.connectionNs + row.messageNs)} total`);
  for (const h of r.costs.hints) console.log(`  hint: ${h}`);
  const blocked = r.audit.some((l) => l.includes('"decision":"deny"') && l.includes('key material'));
  const ok = r.onlyThroughDlp && r.reach.reachable && blocked && r.exfiltrationReset && r.direct.verdict === 'deny' && r.directViaRouterRefused && r.verification.ok && !r.outsideReceived.includes('K3Y');
  console.log(ok ? '\nOK: the key reaches outside only through dlp, and the exfiltration was blocked' : '\nFAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('flow-vault', main);
