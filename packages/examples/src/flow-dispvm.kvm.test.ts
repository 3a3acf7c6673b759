// Disposable endpoints on real KVM: CID 5 is served by forks of a snapshot of a freestanding vsock
// server guest taken while it waits for its connection (data path at ring 3). Each connection the
// FlowMonitor allows (policy destination `@dispvm:scan`) gets a machine of its own, forked at
// connect time; when the guest has served its 3 messages it exits, the connection ends, and the
// machine is reset into a pool of one (or closed). The audit log names the fork behind every
// connection.
import { Machine } from '@tsvm/core';
import { kvmAvailability } from '@tsvm/core/testing';
import { forkEndpoint, VsockRouter, type VsockHostStream } from '@tsvm/devices';
import { AuditLog, FlowMonitor, type FlowPolicy, type Topology } from '@tsvm/monitor';
import { describe, expect, it } from 'vitest';
import { attachVsockGuestDevices, buildVsockGuest, guestMessage, vsockGuestMachine, vsockGuestToolchain } from '../../devices/src/net/vsock-guest.fixture.js';

const kvm = kvmAvailability();
const cc = vsockGuestToolchain();
const skip = !kvm.available ? kvm.reason : !cc.available ? cc.reason : '';
const COUNT = 3;

const topology: Topology = { version: 1, principals: { client: { kind: 'host' }, scanner: { kind: 'machine', cid: 5, disposable: 'scan' } } };
const policy: FlowPolicy = { version: 1, rules: [{ id: 'to-scan', source: 'client', destination: '@dispvm:scan', port: 80, action: 'allow' }] };

/** Waits until `cond()` or fails after `ms`. */
async function until(cond: () => boolean, ms = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** One connection's session: COUNT messages, each answered with the same 64 bytes; then the guest exits. */
async function session(router: VsockRouter<unknown>): Promise<{ replies: Uint8Array[]; closed: string }> {
  const s: VsockHostStream = await router.connect('client', 5, 80);
  let got = new Uint8Array(0);
  let closed = '';
  s.onData = (d) => { const n = new Uint8Array(got.length + d.length); n.set(got); n.set(d, got.length); got = n; };
  s.onClose = (why) => { closed = why; };
  const replies: Uint8Array[] = [];
  for (let i = 0; i < COUNT; i++) {
    expect(s.write(guestMessage(i, 64))).toBe(true);
    await until(() => got.length >= 64 * (i + 1) || closed !== '');
    replies.push(got.slice(64 * i, 64 * (i + 1)));
  }
  await until(() => closed !== '');
  return { replies, closed };
}

describe.skipIf(skip !== '')(`disposable vsock endpoints on real KVM${skip ? ` (SKIPPED: ${skip})` : ''}`, () => {
  it('each connection is served by a fork of the waiting server; a used machine is reset into the pool; the audit names the fork', async () => {
    const elf = await buildVsockGuest();
    const template = await vsockGuestMachine(elf, { role: 'server', cid: 5, port: 80, count: COUNT, msg: 64, reply: 64 });
    // Run it until it sits in its ring-3 loop waiting for a REQUEST (no router: nothing arrives).
    const first = await template.vm.run({ timeout: 50 });
    expect(first.reason).toBe('timeout');
    using snapshot = await template.vm.snapshot();
    await template.vm.close();

    const lines: string[] = [];
    const monitor = new FlowMonitor({ policy, topology, audit: new AuditLog(lines) });
    const router = new VsockRouter<unknown>({ mediator: monitor });
    const stops: string[] = [];
    const endpoint = forkEndpoint({
      snapshot, keep: 1,
      setup: (m: Machine) => attachVsockGuestDevices(m, 5).device,
      onStop: (instance, stop) => { stops.push(`${instance} ${stop.reason}${stop.reason === 'debug-exit' ? ` ${stop.code}` : ''}`); },
    });
    router.serveDisposable(5, 'scanner', endpoint, { maxInstances: 2 });
    try {
      // Two connections at once: two forks. Each fork's guest starts from the snapshot, so each
      // serves messages 0..2 (it checks the message numbers) and exits with 0 (debug-exit 1).
      const [a, b] = await Promise.all([session(router), session(router)]);
      for (const r of [a, b]) {
        expect(r.replies).toEqual([0, 1, 2].map((i) => guestMessage(i, 64)));
        expect(r.closed).toMatch(/disposable machine '.+' stopped: debug-exit 1/);
      }
      await until(() => endpoint.stats.running === 0);
      expect(endpoint.stats).toMatchObject({ forked: 2, reused: 1, closed: 1 });
      // A third connection: the pooled machine, reset to the snapshot, serves from message 0 again.
      const c = await session(router);
      expect(c.replies).toEqual([0, 1, 2].map((i) => guestMessage(i, 64)));
      await until(() => endpoint.stats.running === 0);
      expect(endpoint.stats).toMatchObject({ forked: 2, reused: 2 });

      const served = lines.map((l) => JSON.parse(l) as { event: string; flow: { instance?: string; connection: number; rule: string } }).filter((e) => e.event === 'flow:disposable');
      const instances = served.map((e) => e.flow.instance as string);
      expect(served.every((e) => e.flow.rule === 'to-scan')).toBe(true);
      expect(new Set(instances.slice(0, 2)).size).toBe(2);
      expect(instances.slice(0, 2)).toContain(instances[2]); // the pooled one
      expect(stops.filter((s) => s.endsWith('debug-exit 1'))).toHaveLength(3);
      expect(router.stats).toMatchObject({ disposableServed: 3, disposableFailed: 0, connectionsOpened: 3 });
    } finally {
      router.close();
      await until(() => endpoint.stats.running === 0);
      await endpoint.close();
    }
  }, 60_000);
});
