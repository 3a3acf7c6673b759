/**
 * Learning mode for the vault example: run the workload under a permissive, auditing policy
 * (`mode: 'learn'` allows everything and records what enforcement would have said), then propose
 * the smallest policy that admits exactly the observed connections, as a diff to review. Enforcing
 * the proposal admits every observed flow and refuses one that was never seen.
 *
 *   pnpm example:flow-learn
 *
 * @module
 */
import { VsockRouter } from '@tsvm/devices';
import { AuditLog, FlowMonitor, learnPolicy, type ConnectRequest, type LearnedPolicy } from '@tsvm/monitor';
import { dlp, KEY, TOPOLOGY } from './flow-vault.js';
import { GuestSockets, tick } from './flow-support.js';
import { isMain, runCli } from './support.js';

/** Allows anything; in learn mode it only names the rule the observations matched. */
const PERMISSIVE = { version: 1 as const, lattice: false, rules: [{ id: 'anything', source: '*', destination: '*', action: 'allow' as const }] };

/** What {@link runFlowLearn} found. */
export interface FlowLearnResult {
  /** The proposal. */
  readonly learned: LearnedPolicy;
  /** Observed requests and whether the learned policy admits each. */
  readonly observed: readonly { readonly request: ConnectRequest; readonly admitted: boolean }[];
  /** A new request never observed, and whether the learned policy admits it. */
  readonly unseen: { readonly request: ConnectRequest; readonly admitted: boolean };
}

/** Runs the workload in learn mode, learns, and checks the proposal under enforcement. */
export async function runFlowLearn(): Promise<FlowLearnResult> {
  const flow = new FlowMonitor({ policy: PERMISSIVE, topology: TOPOLOGY, mode: 'learn', audit: new AuditLog([]) });
  const router = new VsockRouter({ mediator: flow });
  const world: GuestSockets[] = [];
  const vault = new GuestSockets(3, world), worker = new GuestSockets(4, world), outside = new GuestSockets(5, world);
  for (const [g, n] of [[vault, 'vault'], [worker, 'worker'], [outside, 'outside']] as const) router.attach(g.guest.device, n);
  vault.listen(1, (s) => s.send(KEY));
  outside.listen(80, () => {});
  await worker.connect(3, 1);
  const out = await worker.connect(5, 80);
  out?.send('result: 42\n');
  for (let i = 0; i < 3; i++) { await tick(); for (const g of world) g.pump(); }
  router.close();

  const learned = learnPolicy(flow.observations, { current: PERMISSIVE, guards: { dlp: { declassify: ['key'], timeoutMs: 50 } } });
  const enforce = new FlowMonitor({ policy: JSON.stringify(learned.policy), topology: TOPOLOGY, guards: { dlp } });
  const observed = [];
  for (const o of flow.observations) observed.push({ request: o.request, admitted: (await enforce.connect(o.request)).verdict === 'allow' });
  const unseenReq = { source: 'vault', destination: 'outside', port: 80 };
  return { learned, observed, unseen: { request: unseenReq, admitted: (await enforce.connect(unseenReq)).verdict === 'allow' } };
}

/** Prints the proposal; 0 when it admits every observed flow and refuses the unseen one. */
export async function main(): Promise<number> {
  const r = await runFlowLearn();
  console.log('proposed policy (review this diff, then enforce it):\n');
  console.log(r.learned.diff);
  console.log(JSON.stringify(r.learned.policy, null, 2));
  for (const o of r.observed) console.log(`observed ${o.request.source} → ${o.request.destination}:${o.request.port}: ${o.admitted ? 'admitted' : 'REFUSED'}`);
  console.log(`unseen   ${r.unseen.request.source} → ${r.unseen.request.destination}:${r.unseen.request.port}: ${r.unseen.admitted ? 'ADMITTED' : 'refused'}`);
  const ok = r.observed.length > 0 && r.observed.every((o) => o.admitted) && !r.unseen.admitted && r.learned.unresolved.length === 0;
  console.log(ok ? '\nOK: the learned policy admits exactly what was observed' : '\nFAILED');
  return ok ? 0 : 1;
}

if (isMain(import.meta.url)) await runCli('flow-learn', main);
