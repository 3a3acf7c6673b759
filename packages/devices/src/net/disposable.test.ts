// Disposable endpoints in the router, with a fake provider whose "machines" are driver-side test
// guests. The KVM version with forks of a real guest, under a FlowMonitor, is
// examples/src/flow-dispvm.kvm.test.ts.
import { describe, expect, it } from 'vitest';
import { VsockOp, type VsockPacket } from '../virtio/vsock.js';
import { allowAllMediator, VsockRouter, type DisposableEndpointOptions, type DisposableLease, type DisposableProvider, type VsockMediator } from './vsock-router.js';
import { VsockTestGuest } from './vsock-test-guest.js';

const flush = async (n = 3) => { for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r)); };
const ops = (ps: VsockPacket[]) => ps.map((p) => p.op);

/** A provider whose instances are test guests with CID 5; `answer` makes each accept its REQUEST. */
function fakeProvider(opts: { fail?: string; never?: boolean; delayMs?: number } = {}) {
  const made: { guest: VsockTestGuest; instance: string; released: string | null; stop: (why: string) => void }[] = [];
  const provider: DisposableProvider = {
    async acquire() {
      if (opts.never) return new Promise<DisposableLease>(() => {});
      if (opts.delayMs) await new Promise((r) => setTimeout(r, opts.delayMs));
      if (opts.fail) throw new Error(opts.fail);
      const guest = new VsockTestGuest({ cid: 5 });
      let stop!: (why: string) => void;
      const stopped = new Promise<string>((r) => { stop = r; });
      const entry = { guest, instance: `fork-${made.length + 1}`, released: null as string | null, stop };
      made.push(entry);
      return { instance: entry.instance, device: guest.device, stopped, release: (why) => { entry.released = why; } };
    },
  };
  return { provider, made };
}

/** A router allowing everything, a disposable endpoint 'scanner' at CID 5 served by `p`, and guest `a` (CID 3) attached. */
function scannerRouter(options: DisposableEndpointOptions = {}, p = fakeProvider()) {
  const router = new VsockRouter({ mediator: allowAllMediator });
  router.serveDisposable(5, 'scanner', p.provider, options);
  const a = new VsockTestGuest({ cid: 3 });
  router.attach(a.device, 'a');
  return { router, a, ...p };
}

async function requestFrom(a: VsockTestGuest, port: number) {
  a.send({ op: VsockOp.Request, dstCid: 5, srcPort: port, dstPort: 80 });
  await flush();
}

describe('VsockRouter: disposable endpoints', () => {
  it('each allowed connection gets a fresh machine, made after the verdict, released when the connection ends', async () => {
    const asked: string[] = [];
    const served: string[] = [];
    const mediator: VsockMediator<number> = {
      connect: (r) => { asked.push(`${r.source}->${r.destination}:${r.port}`); return { verdict: 'allow', connection: asked.length, reason: 'ok' }; },
      message: (_c, _d, data) => ({ verdict: 'allow', data }),
      served: (c, instance) => { served.push(`${c}@${instance}`); },
    };
    const router = new VsockRouter({ mediator });
    const { provider, made } = fakeProvider();
    router.serveDisposable(5, 'scanner', provider);
    const a = new VsockTestGuest({ cid: 3 });
    router.attach(a.device, 'a');
    await requestFrom(a, 1000);
    await requestFrom(a, 1001);
    expect(asked).toEqual(['a->scanner:80', 'a->scanner:80']);
    expect(made.map((m) => m.instance)).toEqual(['fork-1', 'fork-2']);
    expect(served).toEqual(['1@fork-1', '2@fork-2']);
    for (const [i, m] of made.entries()) {
      expect(m.guest.receive()).toMatchObject([{ op: VsockOp.Request, srcCid: 3, srcPort: 1000 + i, dstCid: 5, dstPort: 80 }]);
      m.guest.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 + i });
    }
    expect(ops(a.receive())).toEqual([VsockOp.Response, VsockOp.Response]);
    // Data reaches only the fork serving that connection.
    a.send({ op: VsockOp.Rw, dstCid: 5, srcPort: 1001, dstPort: 80, payload: new Uint8Array([1, 2, 3]) });
    expect(ops(made[1]?.guest.receive() ?? [])).toEqual([VsockOp.Rw]);
    expect(made[0]?.guest.receive()).toEqual([]);
    a.send({ op: VsockOp.Rst, dstCid: 5, srcPort: 1000, dstPort: 80 });
    await flush();
    expect(made.map((m) => m.released)).toEqual(['reset by a', null]);
    expect(router.stats.disposableServed).toBe(2);
    router.close();
    await flush();
    expect(made[1]?.released).toBe('router closed');
  });

  it('a denied request forks nothing', async () => {
    const router = new VsockRouter({ mediator: { connect: () => ({ verdict: 'deny', connection: null, reason: 'no' }), message: (_c, _d, data) => ({ verdict: 'allow', data }) } });
    const { provider, made } = fakeProvider();
    router.serveDisposable(5, 'scanner', provider);
    const a = new VsockTestGuest({ cid: 3 });
    router.attach(a.device, 'a');
    await requestFrom(a, 1000);
    expect(made).toHaveLength(0);
    expect(ops(a.receive())).toEqual([VsockOp.Rst]);
  });

  it('hostile: a connection flood is capped per endpoint (RST beyond it, nothing forked)', async () => {
    const { router, a, made } = scannerRouter({ maxInstances: 2 });
    for (let p = 0; p < 10; p++) await requestFrom(a, 2000 + p);
    expect(made).toHaveLength(2);
    expect(router.stats.disposableOverLimit).toBe(8);
    expect(ops(a.receive()).filter((o) => o === VsockOp.Rst)).toHaveLength(8);
    await expect(router.connect('host', 5, 80)).rejects.toThrow(/already serves 2/);
  });

  it('a provider that fails or never answers resets the request; one that answers late finds it gone and is released', async () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const failing = fakeProvider({ fail: 'out of VMs' });
    router.serveDisposable(5, 'scanner', failing.provider);
    const never = fakeProvider({ never: true });
    router.serveDisposable(6, 'stuck', never.provider, { acquireTimeoutMs: 20 });
    const late = fakeProvider({ delayMs: 30 });
    router.serveDisposable(7, 'late', late.provider);
    const a = new VsockTestGuest({ cid: 3 });
    router.attach(a.device, 'a');
    await requestFrom(a, 1);
    expect(ops(a.receive())).toEqual([VsockOp.Rst]);
    a.send({ op: VsockOp.Request, dstCid: 6, srcPort: 2, dstPort: 80 });
    await new Promise((r) => setTimeout(r, 40));
    expect(ops(a.receive())).toEqual([VsockOp.Rst]);
    expect(router.stats.disposableFailed).toBe(2);
    a.send({ op: VsockOp.Request, dstCid: 7, srcPort: 3, dstPort: 80 });
    await flush();
    a.send({ op: VsockOp.Rst, dstCid: 7, srcPort: 3, dstPort: 80 }); // gives up before the machine exists
    await new Promise((r) => setTimeout(r, 50));
    expect(late.made[0]?.released).toBe('connection ended before it was served');
    expect(late.made[0]?.guest.receive()).toEqual([]);
    expect(router.connections).toBe(0);
  });

  it('hostile: one instance cannot speak on a sibling instance\'s connection (same CID, forged ports)', async () => {
    const { router, a, made } = scannerRouter();
    await requestFrom(a, 1000);
    await requestFrom(a, 1001);
    for (const [i, m] of made.entries()) { m.guest.receive(); m.guest.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 + i }); }
    a.receive();
    // fork-2 writes as if it were fork-1 (5:80 → 3:1000): refused, fork-1's connection untouched.
    made[1]?.guest.send({ op: VsockOp.Rw, dstCid: 3, srcPort: 80, dstPort: 1000, payload: new Uint8Array([6, 6, 6]) });
    made[1]?.guest.send({ op: VsockOp.Rst, dstCid: 3, srcPort: 80, dstPort: 1000 });
    expect(a.receive()).toEqual([]);
    expect(ops(made[1]?.guest.receive() ?? [])).toEqual([VsockOp.Rst]); // for the RW (an RST is never answered)
    expect(router.connections).toBe(2);
    made[0]?.guest.send({ op: VsockOp.Rw, dstCid: 3, srcPort: 80, dstPort: 1000, payload: new Uint8Array([1]) });
    expect(a.receive()).toMatchObject([{ op: VsockOp.Rw, srcPort: 80, dstPort: 1000, payload: new Uint8Array([1]) }]);
  });

  it('hostile: request-then-RST cannot start more machines than maxInstances; one slower than the timeout is released when it comes', async () => {
    const slow = fakeProvider({ delayMs: 40 });
    const { router, a } = scannerRouter({ maxInstances: 2, acquireTimeoutMs: 10 }, slow);
    for (let p = 0; p < 6; p++) {
      a.send({ op: VsockOp.Request, dstCid: 5, srcPort: 3000 + p, dstPort: 80 });
      a.send({ op: VsockOp.Rst, dstCid: 5, srcPort: 3000 + p, dstPort: 80 });
    }
    await flush();
    expect(router.stats.disposableOverLimit).toBe(4); // two acquires in flight hold both slots
    // Past the 10 ms timeout, and past the 40 ms the provider takes: both late machines released.
    await new Promise((r) => setTimeout(r, 80));
    expect(slow.made).toHaveLength(2);
    expect(slow.made.map((m) => m.released)).toEqual(['connection ended before it was served', 'connection ended before it was served']);
    // The slots are free again: a new request gets a machine (and times out again, then is released).
    a.send({ op: VsockOp.Request, dstCid: 5, srcPort: 4000, dstPort: 80 });
    await new Promise((r) => setTimeout(r, 25));
    expect(ops(a.receive()).at(-1)).toBe(VsockOp.Rst);
    await new Promise((r) => setTimeout(r, 60));
    expect(slow.made).toHaveLength(3);
    expect(slow.made[2]?.released).toBe('connection ended before it was served');
    expect(router.stats.disposableOverLimit).toBe(4);
  });

  it('what an instance opened itself ends when it is released, so a reused device carries nothing to its next tenant', async () => {
    const { router, a, made } = scannerRouter();
    await requestFrom(a, 1000);
    const fork = made[0]?.guest as VsockTestGuest;
    fork.receive();
    fork.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
    // The instance opens a connection of its own, to a's port 7 (a accepts).
    fork.send({ op: VsockOp.Request, dstCid: 3, srcPort: 555, dstPort: 7 });
    await flush();
    a.receive();
    a.send({ op: VsockOp.Response, dstCid: 5, srcPort: 7, dstPort: 555 });
    expect(router.connections).toBe(2);
    a.send({ op: VsockOp.Rst, dstCid: 5, srcPort: 1000, dstPort: 80 });
    await flush();
    expect(made[0]?.released).toBe('reset by a');
    expect(router.connections).toBe(0);
    // a heard the instance's own connection end too.
    expect(a.receive()).toMatchObject([{ op: VsockOp.Rst, srcCid: 5, srcPort: 555, dstPort: 7 }]);
  });

  it('a machine that stops on its own resets its connection', async () => {
    const { router, a, made } = scannerRouter();
    await requestFrom(a, 1000);
    made[0]?.guest.receive();
    made[0]?.guest.send({ op: VsockOp.Response, dstCid: 3, srcPort: 80, dstPort: 1000 });
    a.receive();
    made[0]?.stop('debug-exit 0');
    await flush();
    expect(ops(a.receive())).toEqual([VsockOp.Rst]);
    expect(made[0]?.released).toMatch(/stopped: debug-exit 0/);
  });

  it('bad input: CIDs in use, a provider without acquire, bad bounds', () => {
    const router = new VsockRouter({ mediator: allowAllMediator });
    const a = new VsockTestGuest({ cid: 3 });
    router.attach(a.device, 'a');
    const p = fakeProvider().provider;
    expect(() => router.serveDisposable(3, 'x', p)).toThrow(/already in use/);
    router.serveDisposable(5, 'x', p);
    expect(() => router.serveDisposable(5, 'y', p)).toThrow(/already in use/);
    expect(() => router.attach(new VsockTestGuest({ cid: 5 }).device, 'z')).toThrow(/disposable endpoint 'x'/);
    expect(() => router.serveDisposable(2, 'x', p)).toThrow(/3\.\.0xfffffffe/);
    expect(() => router.serveDisposable(9, 'x', {} as DisposableProvider)).toThrow(/acquire/);
    expect(() => router.serveDisposable(9, 'x', p, { maxInstances: 0 })).toThrow(/maxInstances/);
  });
});
