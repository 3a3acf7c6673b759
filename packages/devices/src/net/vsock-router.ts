/**
 * The host side of virtio-vsock: a router that connects machines' {@link VirtioVsock} devices by
 * CID, and host endpoints a Node service registers, with every connection and every message
 * passing a {@link VsockMediator} (the monitor's `FlowMonitor` fits) before the receiver sees a
 * byte. The router is each guest's peer, not a wire: it terminates credit on both sides, so a
 * message the mediator drops or a guard rewrites never confuses either guest's credit accounting.
 *
 * Bounded by construction: per connection and direction the router holds at most
 * `connectionBuffer` bytes (the credit it grants the sender; a sender that exceeds it is reset),
 * and it sends a guest only what that guest's advertised credit allows (at most
 * `connectionBuffer` again), so a peer that never reads stalls its sender (back-pressure) instead
 * of growing host memory. Connections per machine are capped (`maxConnectionsPerPeer`); a flood
 * of requests beyond it is answered with RST without asking the mediator.
 *
 * SEQPACKET connections (type 2, for guests that negotiated `VIRTIO_VSOCK_F_SEQPACKET`, and host
 * endpoints that ask for it) keep message boundaries: the router collects a message's RW
 * fragments up to the one flagged `SEQ_EOM` and the mediator decides the *whole* message at once
 * (a guard sees what the receiver will read, never half of it); the receiver gets it again in
 * fragments its credit allows, EOM (and EOR) on the last. An unfinished message never reaches
 * the receiver: a SHUTDOWN or RST in the middle discards it, and one that outgrows the window
 * (`connectionBuffer`, or the receiver's own `buf_alloc`) resets the connection, as do more than
 * `max(1024, connectionBuffer / 64)` messages waiting for a receiver that does not read (empty
 * messages use no credit, so credit alone would not bound them).
 *
 * A CID can be a **disposable endpoint** ({@link VsockRouter.serveDisposable}), as Qubes' `@dispvm`
 * is: each connection to it that the mediator allows is served by a fresh machine (a fork of a
 * snapshot, see `forkEndpoint`) created at connect time and released — destroyed, or reset into
 * a pool — when the connection ends. The mediator decides before anything is forked, hears which
 * instance served the connection (`served`, which the `FlowMonitor` audits), and forks are capped
 * per endpoint, so a connection flood cannot fork without bound.
 *
 * Hostile input gets a defined result: unknown CID, no listener, unknown connection, bad type or
 * op, a type the guest did not negotiate or that differs from its connection's → RST; spoofed or
 * malformed headers are dropped by the device; credit abuse → RST of that connection only. No
 * packet from a guest makes the router throw.
 * @module
 */
import { InvalidArgumentError, StateError, yieldSlice } from '@tsvm/core';
import {
  VSOCK_HOST_CID,
  VSOCK_MAX_PAYLOAD,
  VSOCK_SEQ_EOM,
  VSOCK_SEQ_EOR,
  VSOCK_TYPE_SEQPACKET,
  VSOCK_TYPE_STREAM,
  VsockOp,
  VsockShutdown,
  type VirtioVsock,
  type VsockPacket,
} from '../virtio/vsock.js';

/** A connection attempt as the router asks the mediator about it (names are principal names). */
export interface VsockConnectRequest {
  /** Connecting principal. */
  readonly source: string;
  /** Listening principal. */
  readonly destination: string;
  /** Destination port. */
  readonly port: number;
  /** Service name of a host listener. */
  readonly service?: string;
  /** `seqpacket` for a SEQPACKET connection (each message is then decided whole); absent for a stream. */
  readonly socket?: 'seqpacket';
}

/** The mediator's answer to a connection. */
export interface VsockConnectVerdict<C> {
  /** Allow or deny. */
  readonly verdict: 'allow' | 'deny';
  /** The mediator's handle for the connection (passed back with each message). */
  readonly connection: C | null;
  /** Why. */
  readonly reason: string;
}

/** The mediator's answer to a message. */
export type VsockMessageVerdict =
  | { readonly verdict: 'allow'; readonly data: Uint8Array }
  | { readonly verdict: 'deny'; readonly reason: string };

/** What decides connections and messages. `FlowMonitor` from `@tsvm/monitor` implements it. */
export interface VsockMediator<C> {
  /** Decides a connection before the listener hears of it. */
  connect(request: VsockConnectRequest): VsockConnectVerdict<C> | Promise<VsockConnectVerdict<C>>;
  /** Decides one message before the receiver sees it (`forward` = from the connecting side). */
  message(connection: C, direction: 'forward' | 'reverse', data: Uint8Array): VsockMessageVerdict | Promise<VsockMessageVerdict>;
  /** The connection ended. */
  close?(connection: C): void;
  /** A disposable endpoint's connection is served by machine `instance` (before the listener hears of it). */
  served?(connection: C, instance: string): void;
}

/** One fresh machine serving one connection to a disposable endpoint. */
export interface DisposableLease {
  /** Which machine serves it (a fork's name): told to the mediator, shown in the audit log. */
  readonly instance: string;
  /** Its vsock device, with the endpoint's CID (the router installs itself as its uplink). */
  readonly device: VirtioVsock;
  /** Settles with why if the machine stops on its own while serving; the connection is then reset. */
  readonly stopped?: Promise<string>;
  /** The connection is over: stop and destroy the machine, or reset it into a pool. */
  release(reason: string): void | Promise<void>;
}

/** Makes the machine that serves one connection to a disposable endpoint (`forkEndpoint` forks a snapshot). */
export interface DisposableProvider {
  /** A fresh machine for `request` (already allowed by the mediator), running, its device ready. */
  acquire(request: VsockConnectRequest): Promise<DisposableLease>;
}

/** Options of {@link VsockRouter.serveDisposable}. */
export interface DisposableEndpointOptions {
  /** Most machines serving this endpoint at once; requests beyond it get RST. Default 4. */
  readonly maxInstances?: number;
  /** Longest wait for `acquire`; then the request is reset. Default 10 s. */
  readonly acquireTimeoutMs?: number;
}

/** A mediator that allows everything — for tests and for machines that share one trust domain. */
export const allowAllMediator: VsockMediator<null> = {
  connect: () => ({ verdict: 'allow', connection: null, reason: 'allow-all mediator' }),
  message: (_c, _d, data) => ({ verdict: 'allow', data }),
};

/** Options of a {@link VsockRouter}. */
export interface VsockRouterOptions<C> {
  /** Decides every connection and message. Required: there is no unmediated router. */
  readonly mediator: VsockMediator<C>;
  /** Bytes the router buffers per connection and direction (the credit it grants). Default 256 KiB. */
  readonly connectionBuffer?: number;
  /** Most connections (pending or open) a machine may have started. Default 64. */
  readonly maxConnectionsPerPeer?: number;
  /** What a denied message does: `reset` the connection (default) or `drop` the message. */
  readonly onDeny?: 'reset' | 'drop';
}

/** Router counters. */
export interface VsockRouterStats {
  /** Connections established. */
  connectionsOpened: number;
  /** Connections the mediator refused. */
  connectionsRefused: number;
  /** Connections reset (by a peer, a violation or a denied message). */
  connectionsReset: number;
  /** Requests refused because the machine had too many connections. */
  connectionsOverLimit: number;
  /** Messages delivered. */
  messagesDelivered: number;
  /** Messages the mediator denied. */
  messagesDenied: number;
  /** Payload bytes delivered. */
  bytesDelivered: number;
  /** Senders that exceeded the credit they were granted. */
  creditViolations: number;
  /** RST packets sent for packets nobody could take (unknown CID, port, connection, op). */
  rstUnroutable: number;
  /** Unfinished SEQPACKET messages discarded (a SHUTDOWN or RST before their EOM). */
  partialMessagesDropped: number;
  /** Connections a disposable machine served. */
  disposableServed: number;
  /** Requests to a disposable endpoint refused because its instance cap was reached. */
  disposableOverLimit: number;
  /** Disposable machines that could not be made (acquire failed or timed out). */
  disposableFailed: number;
}

/** A host-side end of a connection, handed to a listener or returned by {@link VsockRouter.connect}. */
export interface VsockHostStream {
  /** Router connection id. */
  readonly id: number;
  /** The guest principal on the other end. */
  readonly peer: string;
  /** Called with each message the mediator allowed. */
  onData: ((data: Uint8Array) => void) | undefined;
  /** Called when the guest shut down its sending side. */
  onEnd: (() => void) | undefined;
  /** Called once when the connection is gone, with why. */
  onClose: ((reason: string) => void) | undefined;
  /** Called when a write that returned false may be retried. */
  onDrain: (() => void) | undefined;
  /** Queues `data` for the guest (mediated first). False: buffer full or closed; nothing was queued. */
  write(data: Uint8Array): boolean;
  /** Sends SHUTDOWN (no more data from the host). */
  end(): void;
  /** Resets the connection. Idempotent. */
  close(): void;
}

interface Side {
  readonly kind: 'guest' | 'host';
  readonly name: string;
  readonly cid: number;
  readonly port: number;
  /** The guest's device (for a disposable endpoint, set once its machine exists). */
  dev: VirtioVsock | null;
  host: HostStream | null;
  /** What this side advertised about its receive buffer (for sending to it). */
  bufAlloc: number;
  fwdCnt: number;
  /** Payload bytes sent to this side. */
  txCnt: number;
}

/** `eom`: a SEQPACKET message (its last fragment says EOM; `eor` adds EOR). */
type Item = { readonly kind: 'data'; data: Uint8Array; readonly orig: number; readonly eom?: boolean; readonly eor?: boolean; started?: boolean } | { readonly kind: 'shutdown'; readonly flags: number };

interface Dir {
  readonly from: Side;
  readonly to: Side;
  readonly direction: 'forward' | 'reverse';
  rxCnt: number;
  fwdCnt: number;
  advertised: number;
  readonly pending: Item[];
  readonly out: Item[];
  busy: boolean;
  wantDrain: boolean;
  /** Fragments of the SEQPACKET message being received (before its EOM) and their bytes. */
  readonly partial: Uint8Array[];
  partialLen: number;
}

interface Conn<C> {
  readonly id: number;
  readonly a: Side;
  readonly b: Side;
  readonly ab: Dir;
  readonly ba: Dir;
  /** {@link VSOCK_TYPE_STREAM} or {@link VSOCK_TYPE_SEQPACKET}. */
  readonly type: number;
  state: 'deciding' | 'provisioning' | 'requested' | 'open' | 'closed';
  flow: C | null;
  /** The disposable endpoint side `b` belongs to, and the machine serving it once made. */
  disposable?: Disposable;
  lease?: DisposableLease | undefined;
  resolve?: (s: VsockHostStream) => void;
  reject?: (e: Error) => void;
}

interface Disposable {
  readonly name: string;
  readonly provider: DisposableProvider;
  readonly max: number;
  readonly timeoutMs: number;
  /** Connections being provisioned or served. */
  live: number;
}

interface Listener {
  readonly name: string;
  readonly service: string | undefined;
  readonly type: number;
  readonly onConnection: (s: VsockHostStream) => void;
}

interface HostOps {
  write(id: number, d: Uint8Array): boolean;
  end(id: number): void;
  reset(id: number, why: string): void;
}

class HostStream implements VsockHostStream {
  onData: ((data: Uint8Array) => void) | undefined;
  onEnd: (() => void) | undefined;
  onClose: ((reason: string) => void) | undefined;
  onDrain: (() => void) | undefined;
  readonly id: number;
  readonly peer: string;
  readonly #router: HostOps;

  constructor(id: number, peer: string, router: HostOps) {
    this.id = id;
    this.peer = peer;
    this.#router = router;
  }

  write(data: Uint8Array): boolean {
    return this.#router.write(this.id, data);
  }

  end(): void {
    this.#router.end(this.id);
  }

  close(): void {
    this.#router.reset(this.id, 'closed by the host');
  }
}

function u32(n: number): number {
  return n >>> 0;
}

/** Routes vsock streams between machines and host endpoints, mediating every connection and message. */
export class VsockRouter<C> {
  /** Counters. */
  readonly stats: VsockRouterStats = {
    connectionsOpened: 0, connectionsRefused: 0, connectionsReset: 0, connectionsOverLimit: 0,
    messagesDelivered: 0, messagesDenied: 0, bytesDelivered: 0, creditViolations: 0, rstUnroutable: 0, partialMessagesDropped: 0,
    disposableServed: 0, disposableOverLimit: 0, disposableFailed: 0,
  };
  readonly #mediator: VsockMediator<C>;
  readonly #buf: number;
  readonly #maxConns: number;
  readonly #onDeny: 'reset' | 'drop';
  readonly #devices = new Map<number, { dev: VirtioVsock; name: string }>();
  readonly #listeners = new Map<number, Listener>();
  readonly #disposables = new Map<number, Disposable>();
  readonly #byKey = new Map<string, Conn<C>>();
  readonly #byId = new Map<number, Conn<C>>();
  readonly #perPeer = new Map<string, number>();
  /** The device whose packet is being routed (a delivery back to it needs no other machine). */
  #handling: VirtioVsock | undefined;
  #nextId = 1;
  #nextHostPort = 0x40000000;
  #closed = false;

  /** @param options - mediator (required), buffer and connection bounds, what a denial does. */
  constructor(options: VsockRouterOptions<C>) {
    if (options?.mediator === undefined) throw new InvalidArgumentError('mediator', 'a router needs a mediator (use allowAllMediator to allow everything explicitly)');
    this.#mediator = options.mediator;
    this.#buf = options.connectionBuffer ?? 256 * 1024;
    if (!Number.isInteger(this.#buf) || this.#buf < 4096 || this.#buf > 0x7fffffff) throw new InvalidArgumentError('connectionBuffer', 'must be an integer 4096..2^31-1');
    this.#maxConns = options.maxConnectionsPerPeer ?? 64;
    if (!Number.isInteger(this.#maxConns) || this.#maxConns < 1) throw new InvalidArgumentError('maxConnectionsPerPeer', 'must be a positive integer');
    this.#onDeny = options.onDeny ?? 'reset';
  }

  /** Open connections (any state). */
  get connections(): number {
    return this.#byId.size;
  }

  /** Attaches a machine's device under principal `name`; returns a detach function. */
  attach(device: VirtioVsock, name: string): () => void {
    if (this.#closed) throw new StateError('the router is closed');
    if (this.#devices.has(device.cid)) throw new InvalidArgumentError('device', `CID ${device.cid} is already attached as '${this.#devices.get(device.cid)?.name ?? ''}'`);
    if (this.#disposables.has(device.cid)) throw new InvalidArgumentError('device', `CID ${device.cid} is the disposable endpoint '${this.#disposables.get(device.cid)?.name ?? ''}'`);
    this.#devices.set(device.cid, { dev: device, name });
    device.setUplink({ transmit: (p) => this.#fromGuest(device, name, p), deviceReset: () => this.#dropDevice(device, 'device reset') });
    return () => {
      if (this.#devices.get(device.cid)?.dev !== device) return;
      this.#dropDevice(device, 'device detached');
      this.#devices.delete(device.cid);
      device.setUplink(undefined);
    };
  }

  /**
   * Registers a host endpoint on host CID 2 `port` under principal `name`; returns an unlisten
   * function. `seqpacket: true` makes it a SEQPACKET listener: each `onData` is one whole
   * message, each `write` sends one, and stream requests to the port are refused (and vice versa).
   */
  listen(port: number, name: string, onConnection: (stream: VsockHostStream) => void, options: { service?: string; seqpacket?: boolean } = {}): () => void {
    if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) throw new InvalidArgumentError('port', 'must be a u32');
    if (this.#listeners.has(port)) throw new InvalidArgumentError('port', `host port ${port} already has a listener`);
    this.#listeners.set(port, { name, service: options.service, type: options.seqpacket === true ? VSOCK_TYPE_SEQPACKET : VSOCK_TYPE_STREAM, onConnection });
    return () => { this.#listeners.delete(port); };
  }

  /**
   * Makes CID `cid` a disposable endpoint under principal `name`: each allowed connection to it
   * (from a guest or {@link VsockRouter.connect}) gets a machine of its own from `provider`, made
   * after the mediator allowed the request and released when the connection ends. Returns a
   * function that stops serving (connections already served keep their machines until they end).
   */
  serveDisposable(cid: number, name: string, provider: DisposableProvider, options: DisposableEndpointOptions = {}): () => void {
    if (this.#closed) throw new StateError('the router is closed');
    if (!Number.isInteger(cid) || cid < 3 || cid > 0xfffffffe) throw new InvalidArgumentError('cid', `must be an integer 3..0xfffffffe, got ${cid}`);
    if (this.#devices.has(cid) || this.#disposables.has(cid)) throw new InvalidArgumentError('cid', `CID ${cid} is already in use`);
    if (typeof provider?.acquire !== 'function') throw new InvalidArgumentError('provider', 'must have an acquire(request) method');
    const max = options.maxInstances ?? 4;
    if (!Number.isInteger(max) || max < 1) throw new InvalidArgumentError('maxInstances', 'must be a positive integer');
    const timeoutMs = options.acquireTimeoutMs ?? 10_000;
    if (!(timeoutMs > 0)) throw new InvalidArgumentError('acquireTimeoutMs', 'must be a positive number of milliseconds');
    const d: Disposable = { name, provider, max, timeoutMs, live: 0 };
    this.#disposables.set(cid, d);
    return () => { if (this.#disposables.get(cid) === d) this.#disposables.delete(cid); };
  }

  /**
   * Connects host endpoint `name` to a guest listener at `cid:port` (mediated like any
   * connection). `seqpacket: true` opens a SEQPACKET connection (the guest must have negotiated it).
   */
  connect(name: string, cid: number, port: number, options: { seqpacket?: boolean } = {}): Promise<VsockHostStream> {
    const t = this.#devices.get(cid);
    const disp = t === undefined ? this.#disposables.get(cid) : undefined;
    if (t === undefined && disp === undefined) return Promise.reject(new InvalidArgumentError('cid', `no machine with CID ${cid}`));
    const seq = options.seqpacket === true;
    // (A disposable machine's driver is not known before it exists; its RST answers a mismatch.)
    if (seq && t !== undefined && !t.dev.seqpacket) return Promise.reject(new InvalidArgumentError('seqpacket', `machine '${t.name}' (CID ${cid}) did not negotiate VIRTIO_VSOCK_F_SEQPACKET`));
    if (disp !== undefined && disp.live >= disp.max) {
      this.stats.disposableOverLimit++;
      return Promise.reject(new StateError(`disposable endpoint '${disp.name}' already serves ${disp.max} connections`));
    }
    const a = this.#side('host', name, VSOCK_HOST_CID, this.#nextHostPort++, null);
    const b = this.#side('guest', t?.name ?? (disp as Disposable).name, cid, port, t?.dev ?? null);
    return new Promise((resolve, reject) => {
      const c = this.#newConn(a, b, seq ? VSOCK_TYPE_SEQPACKET : VSOCK_TYPE_STREAM, disp);
      c.resolve = resolve;
      c.reject = reject;
      this.#decide(c, { source: name, destination: b.name, port, ...(seq ? { socket: 'seqpacket' as const } : {}) });
    });
  }

  /** Resets every connection and detaches everything. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const c of [...this.#byId.values()]) this.#reset(c, 'router closed', null);
    for (const { dev } of this.#devices.values()) dev.setUplink(undefined);
    this.#devices.clear();
    this.#listeners.clear();
    this.#disposables.clear();
  }

  #side(kind: 'guest' | 'host', name: string, cid: number, port: number, dev: VirtioVsock | null): Side {
    return { kind, name, cid, port, dev, host: null, bufAlloc: 0, fwdCnt: 0, txCnt: 0 };
  }

  #newConn(a: Side, b: Side, type: number, disposable?: Disposable): Conn<C> {
    const dir = (from: Side, to: Side, direction: 'forward' | 'reverse'): Dir => ({ from, to, direction, rxCnt: 0, fwdCnt: 0, advertised: 0, pending: [], out: [], busy: false, wantDrain: false, partial: [], partialLen: 0 });
    const c: Conn<C> = { id: this.#nextId++, a, b, ab: dir(a, b, 'forward'), ba: dir(b, a, 'reverse'), type, state: 'deciding', flow: null };
    if (disposable !== undefined) {
      c.disposable = disposable;
      disposable.live++;
    }
    this.#byId.set(c.id, c);
    for (const s of [a, b]) if (s.kind === 'guest') this.#byKey.set(this.#key(s, s === a ? b : a), c);
    this.#perPeer.set(a.name, (this.#perPeer.get(a.name) ?? 0) + 1);
    return c;
  }

  #key(local: { cid: number; port: number }, remote: { cid: number; port: number }): string {
    return `${local.cid}:${local.port}|${remote.cid}:${remote.port}`;
  }

  #decide(c: Conn<C>, req: VsockConnectRequest): void {
    let v: VsockConnectVerdict<C> | Promise<VsockConnectVerdict<C>>;
    try {
      v = this.#mediator.connect(req);
    } catch (e) {
      v = { verdict: 'deny', connection: null, reason: `mediator threw: ${String(e)}` };
    }
    const done = (r: VsockConnectVerdict<C>): void => {
      if (c.state === 'closed') {
        if (r.verdict === 'allow' && r.connection !== null) this.#mediator.close?.(r.connection);
        return;
      }
      if (r.verdict !== 'allow') {
        this.stats.connectionsRefused++;
        this.#reset(c, `refused: ${r.reason}`, null);
        return;
      }
      c.flow = r.connection;
      if (c.disposable !== undefined) {
        this.#provision(c, c.disposable, req);
      } else if (c.b.kind === 'host') {
        this.#open(c);
        this.#listeners.get(c.b.port)?.onConnection(c.b.host as HostStream);
      } else {
        c.state = 'requested';
        this.#send(c, c.b, VsockOp.Request);
      }
    };
    if (v instanceof Promise) {
      v.then(done, (e: unknown) => done({ verdict: 'deny', connection: null, reason: `mediator failed: ${String(e)}` }));
      // The verdict settles on the event loop, which the running slice holds until it ends.
      yieldSlice();
    } else {
      done(v);
    }
  }

  /**
   * Gets the machine that serves `c` (allowed, to a disposable endpoint), then sends it the
   * REQUEST. The endpoint counts the instance from here until the acquire has settled *and* its
   * machine is released, so neither a requester that gives up early nor a provider slower than
   * the timeout lets more than `maxInstances` machines exist; a machine that arrives after its
   * connection is gone is released at once.
   */
  #provision(c: Conn<C>, d: Disposable, req: VsockConnectRequest): void {
    c.state = 'provisioning';
    const timer = setTimeout(() => {
      if (c.state !== 'provisioning') return;
      this.stats.disposableFailed++;
      this.#reset(c, `no disposable machine for '${d.name}': none within ${d.timeoutMs} ms`, null);
    }, d.timeoutMs);
    Promise.resolve().then(() => d.provider.acquire({ ...req })).then((lease) => {
      clearTimeout(timer);
      if (c.state !== 'provisioning' || this.#closed) {
        // The requester went away, the wait timed out or the router closed while it was made.
        d.live--;
        void Promise.resolve().then(() => lease.release('connection ended before it was served')).catch(() => {});
        return;
      }
      const dev = lease.device;
      if (dev.cid !== c.b.cid) {
        d.live--;
        void Promise.resolve().then(() => lease.release('wrong CID')).catch(() => {});
        this.stats.disposableFailed++;
        this.#reset(c, `disposable machine '${lease.instance}' has CID ${dev.cid}, not ${c.b.cid}`, null);
        return;
      }
      c.lease = lease;
      c.b.dev = dev;
      dev.setUplink({ transmit: (p) => this.#fromGuest(dev, d.name, p), deviceReset: () => this.#dropDevice(dev, 'device reset') });
      this.stats.disposableServed++;
      if (c.flow !== null) this.#mediator.served?.(c.flow, lease.instance);
      lease.stopped?.then((why) => { if (c.lease === lease) this.#reset(c, `disposable machine '${lease.instance}' stopped: ${why}`, null); }, () => {});
      c.state = 'requested';
      this.#send(c, c.b, VsockOp.Request);
    }, (e: unknown) => {
      clearTimeout(timer);
      d.live--;
      if (c.state !== 'provisioning') return;
      this.stats.disposableFailed++;
      this.#reset(c, `no disposable machine for '${d.name}': ${e instanceof Error ? e.message : String(e)}`, null);
    });
  }

  #open(c: Conn<C>): void {
    c.state = 'open';
    this.stats.connectionsOpened++;
    for (const s of [c.a, c.b]) {
      if (s.kind !== 'host') continue;
      const ops: HostOps = {
        write: (id, d) => this.#hostWrite(id, s, d),
        end: (id) => this.#hostEnd(id, s),
        reset: (id, why) => { const x = this.#byId.get(id); if (x) this.#reset(x, why, s); },
      };
      s.host = new HostStream(c.id, s === c.a ? c.b.name : c.a.name, ops);
    }
    if (c.a.kind === 'guest') this.#send(c, c.a, VsockOp.Response);
    if (c.a.kind === 'host') c.resolve?.(c.a.host as HostStream);
  }

  #fromGuest(dev: VirtioVsock, name: string, p: VsockPacket): void {
    if (this.#closed) return;
    const outer = this.#handling;
    this.#handling = dev;
    try {
      this.#route(dev, name, p);
    } finally {
      this.#handling = outer;
    }
  }

  #route(dev: VirtioVsock, name: string, p: VsockPacket): void {
    const c = this.#byKey.get(this.#key({ cid: p.srcCid, port: p.srcPort }, { cid: p.dstCid, port: p.dstPort }));
    const typeOk = p.type === VSOCK_TYPE_STREAM || (p.type === VSOCK_TYPE_SEQPACKET && dev.seqpacket);
    if (!typeOk || (c !== undefined && p.type !== c.type)) {
      const why = typeOk ? `on a connection of type ${c?.type}` : p.type === VSOCK_TYPE_SEQPACKET ? 'without negotiating VIRTIO_VSOCK_F_SEQPACKET' : '';
      if (c) this.#reset(c, `${name} sent socket type ${p.type}${why ? ` ${why}` : ''}`, null);
      else this.#rstReply(dev, p);
      return;
    }
    if (c === undefined) {
      if (p.op === VsockOp.Request) this.#request(dev, name, p);
      else this.#rstReply(dev, p);
      return;
    }
    // The side the packet claims to come from must be this device's: the CID of a disposable
    // endpoint is shared by its instances, and one must never speak on another's connection.
    const me = c.a.dev === dev && c.a.cid === p.srcCid && c.a.port === p.srcPort ? c.a
      : c.b.dev === dev && c.b.cid === p.srcCid && c.b.port === p.srcPort ? c.b : undefined;
    if (me === undefined) { this.#rstReply(dev, p); return; }
    const fromMe = me === c.a ? c.ab : c.ba;
    const toMe = me === c.a ? c.ba : c.ab;
    me.bufAlloc = p.bufAlloc;
    me.fwdCnt = p.fwdCnt;
    switch (p.op) {
      case VsockOp.Request:
        this.#reset(c, `${name} sent REQUEST on an existing connection`, null);
        return;
      case VsockOp.Response:
        if (c.state === 'requested' && me === c.b) this.#open(c);
        else this.#reset(c, `${name} sent an unexpected RESPONSE`, null);
        return;
      case VsockOp.Rst:
        this.#reset(c, `reset by ${name}`, me);
        return;
      case VsockOp.Shutdown:
        this.#dropPartial(fromMe);
        fromMe.pending.push({ kind: 'shutdown', flags: p.flags & (VsockShutdown.Receive | VsockShutdown.Send) });
        this.#pump(c, fromMe);
        return;
      case VsockOp.Rw: {
        if (c.state !== 'open') { this.#reset(c, `${name} sent data before the connection was open`, null); return; }
        const held = fromMe.rxCnt - fromMe.fwdCnt;
        if (held + p.payload.length > this.#buf) {
          this.stats.creditViolations++;
          this.#reset(c, `${name} exceeded its credit (${held} + ${p.payload.length} > ${this.#buf} bytes)`, null);
          return;
        }
        if (c.type === VSOCK_TYPE_SEQPACKET) {
          if (!this.#fragment(c, fromMe, p)) return;
        } else {
          if (p.payload.length === 0) return;
          fromMe.rxCnt += p.payload.length;
          fromMe.pending.push({ kind: 'data', data: p.payload, orig: p.payload.length });
        }
        this.#pump(c, fromMe);
        this.#flush(c, toMe);
        return;
      }
      case VsockOp.CreditUpdate:
        this.#flush(c, toMe);
        return;
      case VsockOp.CreditRequest:
        this.#send(c, me, VsockOp.CreditUpdate);
        return;
      default:
        this.#reset(c, `${name} sent op ${p.op}`, null);
    }
  }

  /**
   * Collects one SEQPACKET fragment; at EOM the whole message is queued for mediation.
   * @returns false if the connection was reset (a message that can never fit the window).
   */
  #fragment(c: Conn<C>, d: Dir, p: VsockPacket): boolean {
    d.rxCnt += p.payload.length;
    if (p.payload.length > 0) d.partial.push(p.payload);
    d.partialLen += p.payload.length;
    if ((p.flags & VSOCK_SEQ_EOM) === 0) {
      // Without its EOM the message waits; once it fills the whole window it can never end.
      if (d.partialLen >= this.#buf) {
        this.#reset(c, `${d.from.name} sent a SEQPACKET message larger than the ${this.#buf}-byte window`, null);
        return false;
      }
      return true;
    }
    // Credit bounds a direction's bytes, not its messages: empty ones cost none. Cap the count
    // (never reached before the credit is by messages of 64 bytes or more).
    if (d.pending.length + d.out.length >= Math.max(1024, this.#buf / 64)) {
      this.#reset(c, `${d.from.name} has ${d.pending.length + d.out.length} SEQPACKET messages its peer has not taken`, null);
      return false;
    }
    const data = d.partial.length === 1 ? (d.partial[0] as Uint8Array) : new Uint8Array(d.partialLen);
    if (d.partial.length > 1) {
      let at = 0;
      for (const f of d.partial) { data.set(f, at); at += f.length; }
    }
    d.partial.length = 0;
    d.partialLen = 0;
    d.pending.push({ kind: 'data', data, orig: data.length, eom: true, eor: (p.flags & VSOCK_SEQ_EOR) !== 0 });
    return true;
  }

  /** An unfinished SEQPACKET message is discarded (never delivered, never mediated); its credit is returned. */
  #dropPartial(d: Dir): void {
    if (d.partial.length === 0 && d.partialLen === 0) return;
    this.stats.partialMessagesDropped++;
    d.fwdCnt += d.partialLen;
    d.partial.length = 0;
    d.partialLen = 0;
  }

  #request(dev: VirtioVsock, name: string, p: VsockPacket): void {
    let b: Side;
    let service: string | undefined;
    let disp: Disposable | undefined;
    if (p.dstCid === VSOCK_HOST_CID) {
      const l = this.#listeners.get(p.dstPort);
      if (l === undefined || l.type !== p.type) { this.#rstReply(dev, p); return; }
      b = this.#side('host', l.name, VSOCK_HOST_CID, p.dstPort, null);
      service = l.service;
    } else if (this.#disposables.has(p.dstCid)) {
      disp = this.#disposables.get(p.dstCid) as Disposable;
      if (disp.live >= disp.max) {
        this.stats.disposableOverLimit++;
        this.#rstReply(dev, p);
        return;
      }
      b = this.#side('guest', disp.name, p.dstCid, p.dstPort, null);
    } else {
      const t = this.#devices.get(p.dstCid);
      // A SEQPACKET request to a guest that cannot take one is refused here, as its driver would.
      if (t === undefined || t.dev === dev || (p.type === VSOCK_TYPE_SEQPACKET && !t.dev.seqpacket)) { this.#rstReply(dev, p); return; }
      b = this.#side('guest', t.name, p.dstCid, p.dstPort, t.dev);
    }
    if ((this.#perPeer.get(name) ?? 0) >= this.#maxConns) {
      this.stats.connectionsOverLimit++;
      this.#rstReply(dev, p);
      return;
    }
    const a = this.#side('guest', name, p.srcCid, p.srcPort, dev);
    a.bufAlloc = p.bufAlloc;
    a.fwdCnt = p.fwdCnt;
    const c = this.#newConn(a, b, p.type, disp);
    this.#decide(c, { source: name, destination: b.name, port: p.dstPort, ...(service !== undefined ? { service } : {}), ...(p.type === VSOCK_TYPE_SEQPACKET ? { socket: 'seqpacket' as const } : {}) });
  }

  #hostWrite(id: number, s: Side, data: Uint8Array): boolean {
    const c = this.#byId.get(id);
    if (c === undefined || c.state !== 'open') return false;
    const d = s === c.a ? c.ab : c.ba;
    if (d.rxCnt - d.fwdCnt + data.length > this.#buf) {
      d.wantDrain = true;
      return false;
    }
    if (c.type === VSOCK_TYPE_SEQPACKET) {
      // One write, one message (split into fragments by #flush as the receiver's credit allows).
      const copy = data.slice();
      d.rxCnt += copy.length;
      d.pending.push({ kind: 'data', data: copy, orig: copy.length, eom: true, eor: false });
      this.#pump(c, d);
      return true;
    }
    for (let at = 0; at < data.length; at += VSOCK_MAX_PAYLOAD) {
      const part = data.slice(at, at + VSOCK_MAX_PAYLOAD);
      d.rxCnt += part.length;
      d.pending.push({ kind: 'data', data: part, orig: part.length });
    }
    this.#pump(c, d);
    return true;
  }

  #hostEnd(id: number, s: Side): void {
    const c = this.#byId.get(id);
    if (c === undefined || c.state !== 'open') return;
    const d = s === c.a ? c.ab : c.ba;
    d.pending.push({ kind: 'shutdown', flags: VsockShutdown.Send });
    this.#pump(c, d);
  }

  /** Mediates `d.pending` in order, one message at a time (an async guard holds the rest back). */
  #pump(c: Conn<C>, d: Dir): void {
    while (!d.busy && c.state === 'open' && d.pending.length > 0) {
      const item = d.pending.shift() as Item;
      if (item.kind === 'shutdown') { d.out.push(item); continue; }
      let v: VsockMessageVerdict | Promise<VsockMessageVerdict>;
      try {
        v = this.#mediator.message(c.flow as C, d.direction, item.data);
      } catch (e) {
        v = { verdict: 'deny', reason: `mediator threw: ${String(e)}` };
      }
      if (v instanceof Promise) {
        d.busy = true;
        yieldSlice(); // as in #decide: the verdict needs the event loop
        v.then((r) => r, (e: unknown): VsockMessageVerdict => ({ verdict: 'deny', reason: `mediator failed: ${String(e)}` })).then((r) => {
          d.busy = false;
          if (c.state !== 'open') return;
          if (this.#apply(c, d, item, r)) this.#pump(c, d);
        });
        return;
      }
      if (!this.#apply(c, d, item, v)) return;
    }
    this.#flush(c, d);
  }

  /** @returns false if the connection was reset. */
  #apply(c: Conn<C>, d: Dir, item: Item & { kind: 'data' }, v: VsockMessageVerdict): boolean {
    if (v.verdict === 'allow' && v.data instanceof Uint8Array && v.data.length <= this.#buf) {
      d.out.push(item.eom === true ? { kind: 'data', data: v.data, orig: item.orig, eom: true, eor: item.eor === true } : { kind: 'data', data: v.data, orig: item.orig });
      this.#flush(c, d);
      return true;
    }
    this.stats.messagesDenied++;
    const reason = v.verdict === 'deny' ? v.reason : 'mediator returned an unusable message';
    if (this.#onDeny === 'reset') {
      this.#reset(c, `message denied: ${reason}`, null);
      return false;
    }
    d.fwdCnt += item.orig;
    this.#credit(c, d);
    return true;
  }

  /** Sends what `d.to` has room for. */
  #flush(c: Conn<C>, d: Dir): void {
    while (c.state === 'open' && d.out.length > 0) {
      const item = d.out[0] as Item;
      if (item.kind === 'shutdown') {
        d.out.shift();
        if (d.to.kind === 'host') {
          d.to.host?.onEnd?.();
          if ((item.flags & (VsockShutdown.Receive | VsockShutdown.Send)) === (VsockShutdown.Receive | VsockShutdown.Send)) this.#reset(c, 'shut down', null);
        } else {
          this.#send(c, d.to, VsockOp.Shutdown, item.flags);
        }
        continue;
      }
      if (d.to.kind === 'host') {
        d.out.shift();
        d.fwdCnt += item.orig;
        this.stats.messagesDelivered++;
        this.stats.bytesDelivered += item.data.length;
        d.to.host?.onData?.(item.data);
        continue;
      }
      const window = Math.min(d.to.bufAlloc, this.#buf);
      // A SEQPACKET receiver takes a message only whole: one larger than its window never arrives.
      if (item.eom === true && item.started !== true && item.data.length > window) {
        this.#reset(c, `a ${item.data.length}-byte SEQPACKET message does not fit ${d.to.name}'s ${window}-byte receive window`, null);
        return;
      }
      const credit = window - u32(d.to.txCnt - d.to.fwdCnt);
      if (credit <= 0 && !(item.eom === true && item.data.length === 0)) break;
      const n = Math.max(0, Math.min(credit, VSOCK_MAX_PAYLOAD, item.data.length));
      const last = n === item.data.length;
      const flags = item.eom === true && last ? VSOCK_SEQ_EOM | (item.eor === true ? VSOCK_SEQ_EOR : 0) : 0;
      if (!this.#send(c, d.to, VsockOp.Rw, flags, item.data.subarray(0, n))) break;
      if (item.eom === true) item.started = true;
      d.to.txCnt = u32(d.to.txCnt + n);
      this.stats.bytesDelivered += n;
      if (n < item.data.length) {
        item.data = item.data.subarray(n);
      } else {
        d.out.shift();
        d.fwdCnt += item.orig;
        this.stats.messagesDelivered++;
      }
    }
    this.#credit(c, d);
  }

  /** Tells `d.from` about freed buffer space when its view of our free space runs low. */
  #credit(c: Conn<C>, d: Dir): void {
    if (c.state !== 'open' || d.fwdCnt === d.advertised) return;
    if (d.from.kind === 'host') {
      if (d.wantDrain && d.rxCnt - d.fwdCnt < this.#buf / 2) {
        d.wantDrain = false;
        d.from.host?.onDrain?.();
      }
      return;
    }
    const theirFree = this.#buf - (d.rxCnt - d.advertised);
    // Like Linux, only when the sender may soon stall: a credit update per message would double
    // the packets of a request/response exchange.
    if (theirFree < this.#buf / 2) {
      this.#send(c, d.from, VsockOp.CreditUpdate);
    }
  }

  /**
   * Sends a packet of connection `c` to guest side `to` (from the other side). It carries the
   * credit of the direction `to` sends on, so `to` learns how much more it may send.
   */
  #send(c: Conn<C>, to: Side, op: number, flags = 0, payload: Uint8Array = new Uint8Array(0)): boolean {
    if (to.kind !== 'guest' || to.dev === null) return true;
    const from = to === c.a ? c.b : c.a;
    const back = to === c.a ? c.ab : c.ba;
    back.advertised = back.fwdCnt;
    const ok = to.dev.deliver({
      srcCid: from.cid, srcPort: from.port, dstCid: to.cid, dstPort: to.port, type: c.type, op, flags,
      bufAlloc: this.#buf, fwdCnt: u32(back.fwdCnt), payload,
    });
    this.#wake(to.dev);
    return ok;
  }

  /**
   * A packet for another machine than the one whose exit is being handled: end the running slice
   * so the receiver's run loop runs now (machines sharing a thread run alternately; see
   * `yieldSlice`). Without it a reply waits for the rest of the sender's slice.
   */
  #wake(dev: VirtioVsock): void {
    if (dev !== this.#handling) yieldSlice();
  }

  #rstReply(dev: VirtioVsock, p: VsockPacket): void {
    if (p.op === VsockOp.Rst) return;
    this.stats.rstUnroutable++;
    // The RST answers in the packet's own type when it is one the guest may use.
    const type = p.type === VSOCK_TYPE_SEQPACKET && dev.seqpacket ? VSOCK_TYPE_SEQPACKET : VSOCK_TYPE_STREAM;
    dev.deliver({ srcCid: p.dstCid, srcPort: p.dstPort, dstCid: p.srcCid, dstPort: p.srcPort, type, op: VsockOp.Rst, flags: 0, bufAlloc: 0, fwdCnt: 0, payload: new Uint8Array(0) });
  }

  /** Ends `c`: RST to every guest side that knows of it except `quiet`, close host sides, tell the mediator. */
  #reset(c: Conn<C>, why: string, quiet: Side | null): void {
    if (c.state === 'closed') return;
    const before = c.state;
    c.state = 'closed';
    if (before === 'open') this.stats.connectionsReset++;
    this.#dropPartial(c.ab);
    this.#dropPartial(c.ba);
    for (const s of [c.a, c.b]) {
      if (s === quiet) continue;
      // While the mediator decides, the listener has not heard of the connection.
      if (s === c.b && before === 'deciding') continue;
      if (s.kind === 'guest') this.#sendRst(s, s === c.a ? c.b : c.a, c.type);
      else s.host?.onClose?.(why);
    }
    c.reject?.(new StateError(`vsock connect failed: ${why}`));
    for (const s of [c.a, c.b]) if (s.kind === 'guest') this.#byKey.delete(this.#key(s, s === c.a ? c.b : c.a));
    this.#byId.delete(c.id);
    // While provisioning, the acquire in flight still holds the instance: it counts down when it settles.
    if (c.disposable !== undefined && before !== 'provisioning') {
      c.disposable.live--;
      const lease = c.lease;
      c.lease = undefined;
      if (lease !== undefined) {
        // Whatever else the instance opened ends with it: its device goes to the next tenant.
        this.#dropDevice(lease.device, `disposable machine '${lease.instance}' released`);
        lease.device.setUplink(undefined);
        // Released off this call stack: a release that throws or never settles harms no one.
        void Promise.resolve().then(() => lease.release(why)).catch(() => {});
      }
    }
    this.#perPeer.set(c.a.name, Math.max(0, (this.#perPeer.get(c.a.name) ?? 1) - 1));
    if (c.flow !== null) this.#mediator.close?.(c.flow);
  }

  #sendRst(to: Side, from: Side, type: number): void {
    if (to.dev === null) return;
    to.dev.deliver({ srcCid: from.cid, srcPort: from.port, dstCid: to.cid, dstPort: to.port, type, op: VsockOp.Rst, flags: 0, bufAlloc: 0, fwdCnt: 0, payload: new Uint8Array(0) });
    this.#wake(to.dev);
  }

  #dropDevice(dev: VirtioVsock, why: string): void {
    for (const c of [...this.#byId.values()]) {
      if (c.a.dev === dev) this.#reset(c, why, c.a);
      else if (c.b.dev === dev) this.#reset(c, why, c.b);
    }
  }
}
