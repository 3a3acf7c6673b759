/**
 * A host-side L2 switch connecting machines' {@link VirtioNet} cards and host endpoints. It learns
 * source MACs, forwards known unicast to one port and floods broadcast, multicast and unknown
 * unicast to every other port; every frame, for every port it would reach, passes a
 * {@link FrameMediator} (the monitor's `FlowMonitor` fits) before that port sees a byte — so a
 * flooded frame is decided per receiver, whose label may differ.
 *
 * Bounded by construction: the MAC table holds at most `maxMacsPerPort` entries per port and
 * `maxMacs` in all (a MAC flood evicts the flooding port's own oldest entries, never another
 * port's); a port whose reader does not keep up loses frames (counted as `congested`) instead of
 * growing host memory — a switch drops rather than stall every sender behind one slow receiver;
 * frames waiting for an asynchronous verdict are capped per source port (`maxPendingPerPort`).
 *
 * Hostile input gets a defined result, counted per port and reason: shorter than an Ethernet
 * header (`runt`), longer than the MTU allows (`oversized`), a multicast source MAC
 * (`bad-source`), a source other than a locked port's own MAC (`spoofed`), a frame back to the
 * port it came from (`hairpin`), a mediator denial or failure (`denied`). Nothing a guest sends
 * makes the switch throw.
 * @module
 */
import { InvalidArgumentError, StateError, yieldSlice } from '@tsvm/core';
import { DEFAULT_MTU, ETHERNET_HEADER_SIZE, formatMac, maxFrameSize, parseMac, type MacAddress, type VirtioNet } from '../virtio/net.js';

/** One frame as the switch asks the mediator about it, for one receiving port. */
export interface SwitchFrame {
  /** Sending port's principal name. */
  readonly source: string;
  /** Receiving port's principal name. */
  readonly destination: string;
  /** EtherType (after an 802.1Q tag, if any). */
  readonly ethertype: number;
  /** Whether the frame is flooded (broadcast, multicast or unknown destination). */
  readonly flooded: boolean;
  /** The frame, Ethernet header included. The mediator must not modify it (rewrite returns new bytes). */
  readonly data: Uint8Array;
}

/** The mediator's answer to one frame for one port. */
export type FrameVerdict =
  | { readonly verdict: 'allow'; readonly data: Uint8Array }
  | { readonly verdict: 'deny'; readonly reason: string };

/** What decides frames. `FlowMonitor` from `@tsvm/monitor` implements it (`frame`). */
export interface FrameMediator {
  /** Decides one frame for one receiving port. May be asynchronous; frames of one port stay in order. */
  frame(frame: SwitchFrame): FrameVerdict | Promise<FrameVerdict>;
}

/** A mediator that allows every frame — for tests and for ports in one trust domain. */
export const allowAllFrames: FrameMediator = { frame: (f) => ({ verdict: 'allow', data: f.data }) };

/** Why the switch dropped a frame. */
export type SwitchDropReason = 'runt' | 'oversized' | 'bad-source' | 'spoofed' | 'hairpin' | 'denied' | 'congested' | 'mediation-backlog';

/** Counters of one port. */
export interface SwitchPortStats {
  /** Frames the port sent into the switch. */
  framesIn: number;
  /** Bytes the port sent into the switch. */
  bytesIn: number;
  /** Frames delivered to the port. */
  framesOut: number;
  /** Bytes delivered to the port. */
  bytesOut: number;
  /** Frames dropped, by reason: input faults count at the sender, `congested` at the receiver. */
  dropped: Record<SwitchDropReason, number>;
}

/** Options of a {@link VirtualSwitch}. */
export interface VirtualSwitchOptions {
  /** Decides every frame. Required: there is no unmediated switch. */
  readonly mediator: FrameMediator;
  /** MTU of every port, 68..65535. Default 1500. */
  readonly mtu?: number;
  /** Learned MACs per port. Default 64. */
  readonly maxMacsPerPort?: number;
  /** Learned MACs in all. Default 4096. */
  readonly maxMacs?: number;
  /** Frames per source port waiting for an asynchronous verdict. Default 64. */
  readonly maxPendingPerPort?: number;
}

/** Options of one port. */
export interface SwitchPortOptions {
  /**
   * Source MAC the port may use; frames from any other are dropped as `spoofed`. A card's port
   * is locked to the card's MAC unless `null` is given (e.g. a host endpoint bridging a LAN).
   */
  readonly mac?: MacAddress | null;
  /** Host endpoint: frames kept for {@link HostPort.receive}. Default 256. */
  readonly queueLimit?: number;
}

/** A host endpoint on the switch. */
export interface HostPort {
  /** Principal name. */
  readonly name: string;
  /** Counters. */
  readonly stats: SwitchPortStats;
  /** Called when a frame was queued for {@link HostPort.receive}. */
  onFrame: (() => void) | undefined;
  /** Sends one frame into the switch (checked and mediated like a guest's). */
  send(frame: Uint8Array): void;
  /** Takes the frames delivered so far (at most `queueLimit` are kept; the rest were dropped as `congested`). */
  receive(): Uint8Array[];
  /** Leaves the switch. Idempotent. */
  close(): void;
}

interface Port {
  readonly id: number;
  readonly name: string;
  readonly lock: Uint8Array | null;
  readonly stats: SwitchPortStats;
  readonly deliver: (frame: Uint8Array) => boolean;
  /** Learned MACs of this port in learning order (oldest first). */
  readonly macs: string[];
  /** Frames waiting for the mediator, and whether one is being decided. */
  readonly pending: { frame: Uint8Array; targets: Port[]; flooded: boolean; ethertype: number }[];
  busy: boolean;
  closed: boolean;
}

const newStats = (): SwitchPortStats => ({
  framesIn: 0, bytesIn: 0, framesOut: 0, bytesOut: 0,
  dropped: { runt: 0, oversized: 0, 'bad-source': 0, spoofed: 0, hairpin: 0, denied: 0, congested: 0, 'mediation-backlog': 0 },
});

class HostEndpoint implements HostPort {
  onFrame: (() => void) | undefined;
  readonly name: string;
  readonly stats: SwitchPortStats;
  readonly #queue: Uint8Array[] = [];
  readonly #limit: number;
  readonly #send: (f: Uint8Array) => void;
  readonly #close: () => void;

  constructor(name: string, stats: SwitchPortStats, limit: number, send: (f: Uint8Array) => void, close: () => void) {
    this.name = name;
    this.stats = stats;
    this.#limit = limit;
    this.#send = send;
    this.#close = close;
  }

  push(frame: Uint8Array): boolean {
    if (this.#queue.length >= this.#limit) return false;
    // A flooded frame is one buffer shared by every port: the host gets its own copy.
    this.#queue.push(frame.slice());
    this.onFrame?.();
    return true;
  }

  send(frame: Uint8Array): void {
    if (!(frame instanceof Uint8Array)) throw new InvalidArgumentError('frame', 'must be a Uint8Array');
    this.#send(frame.slice());
  }

  receive(): Uint8Array[] {
    return this.#queue.splice(0);
  }

  close(): void {
    this.#close();
  }
}

/** Switch-wide counters. */
export interface SwitchStats {
  /** Frames that entered the switch. */
  framesIn: number;
  /** Deliveries to a port (a flooded frame counts once per port). */
  delivered: number;
  /** Frames flooded. */
  flooded: number;
  /** MAC table entries evicted because a port or the switch was at its bound. */
  macEvictions: number;
}

/** An Ethernet switch between virtio-net cards and host endpoints, mediating every frame per receiver. */
export class VirtualSwitch {
  /** MTU of every port. */
  readonly mtu: number;
  /** Counters. */
  readonly stats: SwitchStats = { framesIn: 0, delivered: 0, flooded: 0, macEvictions: 0 };
  readonly #mediator: FrameMediator;
  readonly #maxPerPort: number;
  readonly #maxMacs: number;
  readonly #maxPending: number;
  readonly #ports = new Map<number, Port>();
  readonly #names = new Set<string>();
  readonly #table = new Map<string, Port>();
  #nextId = 1;
  #closed = false;

  /** @param options - mediator (required), MTU, MAC table and pending bounds. */
  constructor(options: VirtualSwitchOptions) {
    if (options?.mediator === undefined || typeof options.mediator.frame !== 'function') throw new InvalidArgumentError('mediator', 'a switch needs a mediator (use allowAllFrames to allow everything explicitly)');
    this.#mediator = options.mediator;
    this.mtu = options.mtu ?? DEFAULT_MTU;
    if (!Number.isInteger(this.mtu) || this.mtu < 68 || this.mtu > 65535) throw new InvalidArgumentError('mtu', `must be an integer 68..65535, got ${this.mtu}`);
    const posInt = (v: number | undefined, d: number, arg: string): number => {
      const n = v ?? d;
      if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(arg, 'must be a positive integer');
      return n;
    };
    this.#maxPerPort = posInt(options.maxMacsPerPort, 64, 'maxMacsPerPort');
    this.#maxMacs = posInt(options.maxMacs, 4096, 'maxMacs');
    this.#maxPending = posInt(options.maxPendingPerPort, 64, 'maxPendingPerPort');
  }

  /** Learned MAC → port name (a copy). */
  macTable(): Map<MacAddress, string> {
    return new Map([...this.#table].map(([m, p]) => [m, p.name]));
  }

  /** Counters of the port called `name`, or undefined. */
  portStats(name: string): SwitchPortStats | undefined {
    for (const p of this.#ports.values()) if (p.name === name) return p.stats;
    return undefined;
  }

  /** Attaches a machine's card as port `name` (its principal); returns a detach function. */
  attach(device: VirtioNet, name: string, options: SwitchPortOptions = {}): () => void {
    const lock = options.mac === null ? null : parseMac(options.mac ?? device.mac, 'options.mac');
    // A frame for another machine's card ends the sender's slice so the receiver runs now (frames
    // never hairpin, so the target is never the machine whose exit is being handled).
    const port = this.#addPort(name, lock, (f) => { const ok = device.deliver(f); yieldSlice(); return ok; });
    device.setUplink({ transmit: (f) => this.#input(port, f) });
    return () => {
      if (port.closed) return;
      device.setUplink(undefined);
      this.#removePort(port);
    };
  }

  /** Adds a host endpoint as port `name`. */
  hostPort(name: string, options: SwitchPortOptions = {}): HostPort {
    const lock = options.mac === undefined || options.mac === null ? null : parseMac(options.mac, 'options.mac');
    const limit = options.queueLimit ?? 256;
    if (!Number.isInteger(limit) || limit < 1) throw new InvalidArgumentError('options.queueLimit', 'must be a positive integer');
    let ep: HostEndpoint | undefined;
    const port = this.#addPort(name, lock, (f) => (ep as HostEndpoint).push(f));
    ep = new HostEndpoint(name, port.stats, limit, (f) => this.#input(port, f), () => this.#removePort(port));
    return ep;
  }

  /** Detaches every port. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of [...this.#ports.values()]) this.#removePort(p);
  }

  #addPort(name: string, lock: Uint8Array | null, deliver: (f: Uint8Array) => boolean): Port {
    if (this.#closed) throw new StateError('the switch is closed');
    if (typeof name !== 'string' || name === '') throw new InvalidArgumentError('name', 'must be a non-empty string');
    if (this.#names.has(name)) throw new InvalidArgumentError('name', `a port called '${name}' is already attached`);
    const port: Port = { id: this.#nextId++, name, lock, stats: newStats(), deliver, macs: [], pending: [], busy: false, closed: false };
    this.#ports.set(port.id, port);
    this.#names.add(name);
    return port;
  }

  #removePort(port: Port): void {
    if (port.closed) return;
    port.closed = true;
    port.pending.length = 0;
    for (const m of port.macs) this.#table.delete(m);
    port.macs.length = 0;
    this.#ports.delete(port.id);
    this.#names.delete(port.name);
  }

  #drop(port: Port, reason: SwitchDropReason): void {
    port.stats.dropped[reason]++;
  }

  /** One frame from `port`: check, learn, find targets, queue for mediation. */
  #input(port: Port, frame: Uint8Array): void {
    if (port.closed || this.#closed) return;
    port.stats.framesIn++;
    port.stats.bytesIn += frame.length;
    this.stats.framesIn++;
    if (frame.length < ETHERNET_HEADER_SIZE) return this.#drop(port, 'runt');
    if (frame.length > maxFrameSize(this.mtu, frame)) return this.#drop(port, 'oversized');
    if ((frame[6] as number) & 1) return this.#drop(port, 'bad-source');
    if (port.lock !== null && !sameMac(frame, 6, port.lock)) return this.#drop(port, 'spoofed');
    this.#learn(port, formatMac(frame, 6));
    let targets: Port[];
    let flooded = false;
    if ((frame[0] as number) & 1) flooded = true;
    const known = flooded ? undefined : this.#table.get(formatMac(frame, 0));
    if (known === port) return this.#drop(port, 'hairpin');
    if (known !== undefined) targets = [known];
    else {
      flooded = true;
      targets = [...this.#ports.values()].filter((p) => p !== port);
    }
    if (flooded) this.stats.flooded++;
    if (targets.length === 0) return;
    if (port.pending.length >= this.#maxPending) return this.#drop(port, 'mediation-backlog');
    const tagged = frame[12] === 0x81 && frame[13] === 0x00 && frame.length >= ETHERNET_HEADER_SIZE + 4;
    const ethertype = tagged ? ((frame[16] as number) << 8) | (frame[17] as number) : ((frame[12] as number) << 8) | (frame[13] as number);
    port.pending.push({ frame, targets, flooded, ethertype });
    this.#pump(port);
  }

  #learn(port: Port, mac: string): void {
    const owner = this.#table.get(mac);
    if (owner === port) return;
    if (owner !== undefined) owner.macs.splice(owner.macs.indexOf(mac), 1);
    // A port at its quota forgets its own oldest address: a MAC flood cannot evict other ports.
    if (port.macs.length >= this.#maxPerPort || (owner === undefined && this.#table.size >= this.#maxMacs)) {
      const old = port.macs.shift();
      if (old !== undefined) {
        this.#table.delete(old);
        this.stats.macEvictions++;
      } else {
        this.stats.macEvictions++;
        return; // the table is full of other ports' addresses: this one stays unknown (flooded to).
      }
    }
    this.#table.set(mac, port);
    port.macs.push(mac);
  }

  /** Mediates `port.pending` in order; an asynchronous verdict holds the rest of this port's frames back. */
  #pump(port: Port): void {
    while (!port.busy && !port.closed && port.pending.length > 0) {
      const item = port.pending[0] as Port['pending'][number];
      const target = item.targets.shift();
      if (target === undefined) {
        port.pending.shift();
        continue;
      }
      if (target.closed) continue;
      let v: FrameVerdict | Promise<FrameVerdict>;
      try {
        v = this.#mediator.frame({ source: port.name, destination: target.name, ethertype: item.ethertype, flooded: item.flooded, data: item.frame });
      } catch (e) {
        v = { verdict: 'deny', reason: `mediator threw: ${String(e)}` };
      }
      if (v instanceof Promise) {
        port.busy = true;
        yieldSlice(); // the verdict settles on the event loop, which the running slice holds
        v.then((r) => r, (e: unknown): FrameVerdict => ({ verdict: 'deny', reason: `mediator failed: ${String(e)}` })).then((r) => {
          port.busy = false;
          if (port.closed) return;
          this.#apply(port, target, r);
          this.#pump(port);
        });
        return;
      }
      this.#apply(port, target, v);
    }
  }

  #apply(from: Port, to: Port, v: FrameVerdict): void {
    if (to.closed) return;
    const ok = typeof v === 'object' && v !== null && v.verdict === 'allow' && v.data instanceof Uint8Array;
    if (!ok) return this.#drop(from, 'denied');
    const data = v.data;
    // A rewritten frame is checked again: a guard must not be a way around the MTU.
    if (data.length < ETHERNET_HEADER_SIZE) return this.#drop(from, 'runt');
    if (data.length > maxFrameSize(this.mtu, data)) return this.#drop(from, 'oversized');
    let delivered: boolean;
    try {
      delivered = to.deliver(data);
    } catch {
      delivered = false;
    }
    if (!delivered) return this.#drop(to, 'congested');
    to.stats.framesOut++;
    to.stats.bytesOut += data.length;
    this.stats.delivered++;
  }
}

function sameMac(frame: Uint8Array, at: number, mac: Uint8Array): boolean {
  for (let i = 0; i < 6; i++) if (frame[at + i] !== mac[i]) return false;
  return true;
}
