/**
 * `gdbServer(machine, { port })`: a gdb remote stub on a TCP port (`node:net`), one client at a
 * time, for vCPU 0. `target remote :PORT` in gdb, then registers, memory, `break`/`hbreak`,
 * `continue`, `stepi`, Ctrl-C and `detach`. The protocol is in `session.ts`; this file owns the
 * socket, the acknowledgements and the lifecycle.
 *
 * It lives in `@tsvm/monitor`, not on core's `Machine` (core does not depend on the monitor):
 * breakpoints are the monitor's `exec` hooks, so they work through whatever mechanism the host
 * allows (the VMM-side probe where KVM guest debug does not).
 * @module
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { EventEmitter } from 'node:events';
import { InvalidArgumentError, StateError, type Machine, type Stop } from '@tsvm/core';
import { Monitor } from '../monitor.js';
import { PacketReader, frame } from './packets.js';
import { GdbSession } from './session.js';

/** Options of {@link gdbServer}. */
export interface GdbServerOptions {
  /** TCP port; default 0 (the system picks one: read {@link GdbServer.address}). */
  readonly port?: number;
  /** Address to listen on; default `127.0.0.1` (a debugger can read and write all guest RAM: keep it local). */
  readonly host?: string;
  /**
   * The machine's monitor, not sealed (gdb's breakpoints are hooks registered and removed while
   * the session runs). Default: the server makes one, and closes it with the server. A machine
   * that already has a monitor must pass it: two monitors would patch the same code. A hit is a
   * `deny` of that monitor, so its audit log (if any) records gdb's breakpoint hits.
   */
  readonly monitor?: Monitor;
}

/** Lifecycle events of a {@link GdbServer}. */
export interface GdbServerEvents {
  /** A client connected (its remote address). */
  connect: [remote: string];
  /** The client detached, killed the session or disconnected; the machine is stopped and can be resumed. */
  disconnect: [remote: string];
  /**
   * A `continue`/`step` ended with this stop; `byGdb` when it is one of gdb's own breakpoints or
   * steps (a `violation` of gdb's hook), false when the guest stopped for its own reasons.
   */
  stop: [stop: Stop, byGdb: boolean];
}

/** A listening gdb stub. */
export interface GdbServer extends AsyncDisposable {
  /** Where it listens. */
  readonly address: { readonly host: string; readonly port: number };
  /** The monitor whose hooks implement the breakpoints. */
  readonly monitor: Monitor;
  /** Lifecycle events. */
  readonly events: EventEmitter<GdbServerEvents>;
  /** Whether a client is connected. */
  readonly connected: boolean;
  /**
   * Disconnects the client (stopping a run in progress: the machine keeps its state), removes
   * gdb's breakpoints, stops listening, and closes the monitor if the server made it. Idempotent.
   */
  close(): Promise<void>;
}

/**
 * Starts a gdb remote stub for `machine` (vCPU 0). `machine.gdb()` does not exist: core must not
 * depend on the monitor, so the stub is this function of `@tsvm/monitor`.
 *
 * While a client is connected the stub drives the machine (`continue` calls `machine.run()`);
 * between runs, and after the client goes, the machine is stopped and its owner may run it. A
 * `continue` while the owner is running it gets an error reply (`run()` refuses a second run).
 * @throws InvalidArgumentError for bad options; StateError when the monitor is sealed or closed.
 */
export async function gdbServer(machine: Machine, options: GdbServerOptions = {}): Promise<GdbServer> {
  if (!machine || typeof machine.run !== 'function') throw new InvalidArgumentError('machine', 'must be a Machine');
  if (!options || typeof options !== 'object') throw new InvalidArgumentError('options', 'must be an object');
  const port = options.port ?? 0;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError('options.port', `must be an integer in 0..65535, got ${String(port)}`);
  const host = options.host ?? '127.0.0.1';
  if (typeof host !== 'string' || host === '') throw new InvalidArgumentError('options.host', 'must be a non-empty string');
  if (options.monitor !== undefined) {
    if (!(options.monitor instanceof Monitor)) throw new InvalidArgumentError('options.monitor', 'must be a Monitor');
    if (options.monitor.machine !== machine) throw new InvalidArgumentError('options.monitor', "must be this machine's monitor");
    if (options.monitor.sealed) throw new StateError('the monitor is sealed: gdb breakpoints are hooks added and removed during the session');
  }
  const monitor = options.monitor ?? new Monitor(machine, { name: `${machine.name}:gdb` });
  const server = new Stub(machine, monitor, options.monitor === undefined);
  try {
    await server.listen(port, host);
  } catch (e) {
    if (options.monitor === undefined) monitor.close();
    throw e;
  }
  return server;
}

interface Client { readonly socket: Socket; readonly session: GdbSession; readonly remote: string; ended: Promise<void> | undefined }

class Stub implements GdbServer {
  readonly events = new EventEmitter<GdbServerEvents>();
  readonly monitor: Monitor;
  readonly #machine: Machine;
  readonly #ownsMonitor: boolean;
  readonly #server: Server;
  #client: Client | undefined;
  #closed: Promise<void> | undefined;
  #machineClosed = false;

  constructor(machine: Machine, monitor: Monitor, ownsMonitor: boolean) {
    this.#machine = machine;
    this.monitor = monitor;
    this.#ownsMonitor = ownsMonitor;
    this.#server = createServer((socket) => this.#accept(socket));
    machine.events.once('closed', this.#onMachineClosed);
  }

  /** The machine went away under the stub: drop the client, nothing is left to restore. */
  readonly #onMachineClosed = (): void => {
    this.#machineClosed = true;
    void this.close();
  };

  get address(): { readonly host: string; readonly port: number } {
    const a = this.#server.address() as AddressInfo | null;
    return { host: a?.address ?? '', port: a?.port ?? 0 };
  }

  get connected(): boolean {
    return this.#client !== undefined;
  }

  listen(port: number, host: string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#server.once('error', reject);
      this.#server.listen(port, host, () => { this.#server.off('error', reject); resolve(); });
    });
  }

  #accept(socket: Socket): void {
    if (this.#client || this.#closed) { socket.destroy(); return; } // one debugger at a time
    socket.setNoDelay(true);
    const remote = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}`;
    const reader = new PacketReader();
    const send = (payload: string): void => { if (!socket.destroyed) socket.write(frame(payload)); };
    const session = new GdbSession(this.#machine, this.monitor, { send, stopped: (stop, byGdb) => this.events.emit('stop', stop, byGdb) });
    const client: Client = { socket, session, remote, ended: undefined };
    this.#client = client;
    this.events.emit('connect', remote);
    socket.on('data', (chunk: Buffer) => {
      for (const ev of reader.push(chunk)) {
        if (client.ended) return;
        switch (ev.kind) {
          case 'interrupt': session.interrupt(); break;
          case 'ack': break; // replies are not resent on '-': gdb resends its request instead
          case 'bad-checksum': if (!session.noAck) socket.write('-'); break;
          case 'overflow':
            if (!session.noAck) socket.write('+');
            send('E16');
            break;
          case 'packet': {
            if (!session.noAck) socket.write('+');
            const p = ev.payload;
            if (p === 'k') { void this.#end(client); return; }
            try {
              session.handle(p);
            } catch {
              send('E05'); // a host error while serving one request: report it, keep the session
            }
            if (p === 'D' || p.startsWith('D;')) { void this.#end(client); return; }
            break;
          }
        }
      }
    });
    socket.on('error', () => { /* the close event follows */ });
    socket.on('close', () => { void this.#end(client); });
  }

  /** Ends `client`'s session: the machine stopped, breakpoints removed, the socket closed. */
  #end(client: Client): Promise<void> {
    client.ended ??= (async () => {
      try {
        await client.session.end(!this.#machineClosed);
      } finally {
        client.socket.end();
        client.socket.destroy();
        if (this.#client === client) this.#client = undefined;
        this.events.emit('disconnect', client.remote);
      }
    })();
    return client.ended;
  }

  close(): Promise<void> {
    this.#closed ??= (async () => {
      await new Promise<void>((resolve) => {
        this.#server.close(() => resolve());
        if (this.#client) void this.#end(this.#client);
      });
      if (this.#client) await this.#end(this.#client);
      this.#machine.events.off('closed', this.#onMachineClosed);
      // A closed machine has no RAM to restore the monitor's patches into.
      if (this.#ownsMonitor && !this.#machineClosed) this.monitor.close();
    })();
    return this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
