/**
 * A few lines of "guest program" for the host-level flow examples: a stream socket on the driver
 * side of a {@link VsockTestGuest} (REQUEST, wait for RESPONSE or RST, send RW with correct credit
 * fields, collect what arrives). A real machine runs a driver in the guest instead; the router and
 * the flow monitor see the same packets either way.
 * @module
 */
import { VsockOp, VsockTestGuest, type VsockPacket } from '@tsvm/devices';

/** Lets the router and async mediators run. */
export const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

/** One guest-side stream. */
export class GuestStream {
  /** Bytes received so far, as text. */
  received = '';
  /** Whether the peer (or the router) reset the stream. */
  reset = false;
  readonly #g: GuestSockets;
  readonly #dst: number;
  readonly #dstPort: number;
  readonly #port: number;

  /** @internal */
  constructor(g: GuestSockets, dst: number, dstPort: number, port: number) {
    this.#g = g;
    this.#dst = dst;
    this.#dstPort = dstPort;
    this.#port = port;
  }

  /** Sends text. */
  send(text: string): void {
    this.#g.guest.send({ op: VsockOp.Rw, dstCid: this.#dst, srcPort: this.#port, dstPort: this.#dstPort, payload: new TextEncoder().encode(text) });
  }

  /** @internal */
  take(p: VsockPacket): boolean {
    if (p.srcCid !== this.#dst || p.srcPort !== this.#dstPort || p.dstPort !== this.#port) return false;
    if (p.op === VsockOp.Rw) {
      this.received += new TextDecoder().decode(p.payload);
      this.#g.guest.fwdCnt += p.payload.length;
    }
    if (p.op === VsockOp.Rst) this.reset = true;
    return true;
  }
}

/** Guest-side sockets over one test guest: connect out, accept in, pump packets. */
export class GuestSockets {
  /** The test guest. */
  readonly guest: VsockTestGuest;
  readonly #streams: GuestStream[] = [];
  readonly #listening = new Map<number, (s: GuestStream) => void>();
  readonly #world: GuestSockets[];
  #nextPort = 50000;

  /**
   * @param cid - the machine's CID.
   * @param world - the machines that run alongside (pumped while this one waits); it joins it.
   */
  constructor(cid: number, world: GuestSockets[] = []) {
    this.guest = new VsockTestGuest({ cid });
    this.#world = world;
    world.push(this);
  }

  /** Accepts connections to `port`. */
  listen(port: number, onStream: (s: GuestStream) => void): void {
    this.#listening.set(port, onStream);
  }

  /** Connects to `cid:port`; resolves with the stream, or null if refused (RST). */
  async connect(cid: number, port: number): Promise<GuestStream | null> {
    const mine = this.#nextPort++;
    this.guest.send({ op: VsockOp.Request, dstCid: cid, srcPort: mine, dstPort: port });
    let result: GuestStream | null | undefined;
    for (let i = 0; i < 100 && result === undefined; i++) {
      await tick();
      for (const other of this.#world) if (other !== this) other.pump();
      for (const p of this.guest.receive()) {
        const answer = result === undefined && p.srcCid === cid && p.dstPort === mine;
        if (answer && p.op === VsockOp.Response) {
          result = new GuestStream(this, cid, port, mine);
          this.#streams.push(result);
        } else if (answer && p.op === VsockOp.Rst) {
          result = null;
        } else {
          this.#dispatch(p);
        }
      }
    }
    return result ?? null;
  }

  /** Handles everything that arrived (accepting, data, resets). */
  pump(): void {
    for (const p of this.guest.receive()) this.#dispatch(p);
  }

  #dispatch(p: VsockPacket): void {
    if (p.op === VsockOp.Request) {
      const on = this.#listening.get(p.dstPort);
      if (on === undefined) {
        this.guest.send({ op: VsockOp.Rst, dstCid: p.srcCid, srcPort: p.dstPort, dstPort: p.srcPort });
        return;
      }
      this.guest.send({ op: VsockOp.Response, dstCid: p.srcCid, srcPort: p.dstPort, dstPort: p.srcPort });
      const s = new GuestStream(this, p.srcCid, p.srcPort, p.dstPort);
      this.#streams.push(s);
      on(s);
      return;
    }
    for (const s of this.#streams) if (s.take(p)) return;
  }
}
