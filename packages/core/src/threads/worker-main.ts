/**
 * The worker side of a {@link MachineWorker}: imports the machine module, builds the machine
 * with its builder and answers requests. The guest's run loop lives here, on this thread's own
 * event loop and slice timer, so a guest that spins or storms exits costs the caller's thread
 * nothing but the CPU the scheduler gives this one.
 * Not a public module: the bootstrap in `spawn.ts` imports it inside the worker.
 * @module
 */
import { setPriority } from 'node:os';
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { attachLedger, libc, setThreadIdle, yieldThread } from '@tsvm/kvm-backend';
import { closeSharedBackend, kvmBackend } from '../backend/kvm.js';
import type { Backend } from '../backend.js';
import type { Device } from '../device.js';
import { InvalidArgumentError, StateError } from '../errors.js';
import { Machine } from '../machine.js';
import { Snapshot } from '../snapshot/snapshot.js';
import type { BuiltMachine, MachineBuilder, WorkerContext } from './builder.js';
import type { FromWorker, Ops, RemoteRunOptions, ToWorker, WorkerBoot } from './protocol.js';
import { encodeError, encodeStop } from './wire.js';

/** The caller's end: the worker thread's parent port, or a child process's IPC channel. */
interface Port {
  post(m: FromWorker, transfer?: ArrayBuffer[]): void;
  on(listener: (m: ToWorker) => void): void;
  close(): void;
}
/** Set by the child process's bootstrap (`isolation: 'process'`). */
const childBoot = (globalThis as Record<symbol, unknown>)[Symbol.for('tsvm.workerBoot')] as WorkerBoot | undefined;
const boot = (childBoot ?? workerData) as WorkerBoot;
const port: Port | undefined = parentPort
  ? { post: (m, t) => parentPort?.postMessage(m, t), on: (l) => { parentPort?.on('message', l); }, close: () => parentPort?.close() }
  : childBoot && process.send
    ? childPort()
    : undefined;

/** The child process's IPC channel; `close()` disconnects once what was sent has been written. */
function childPort(): Port {
  let sent: Promise<void> = Promise.resolve();
  return {
    // No transfer lists over IPC: the bytes are serialized either way.
    post: (m) => {
      if (!process.connected) return;
      sent = new Promise((resolve) => { process.send?.(m, undefined, {}, () => resolve()); });
    },
    on: (l) => { process.on('message', (m) => l(m as ToWorker)); },
    close: () => { void sent.then(() => { if (process.connected) process.disconnect(); }); },
  };
}
// A child whose parent went away (crashed, killed) has nobody to serve: it ends too.
if (childBoot) process.once('disconnect', () => process.exit(0));
const post = (m: FromWorker, transfer?: ArrayBuffer[]): void => port?.post(m, transfer);

/** Console bytes batched into few messages: a guest printing a byte per exit must not post a message per exit. */
class ConsoleStream {
  #parts: Uint8Array[] = [];
  #bytes = 0;
  #dropped = 0;
  #timer: NodeJS.Timeout | undefined;

  write(data: Uint8Array): void {
    if (this.#bytes + data.length > boot.consoleLimit) {
      this.#dropped += data.length;
      this.#arm();
      return;
    }
    this.#parts.push(data.slice());
    this.#bytes += data.length;
    if (this.#bytes >= boot.consoleChunk) this.flush();
    else this.#arm();
  }

  #arm(): void {
    this.#timer ??= setTimeout(() => { this.#timer = undefined; this.flush(); }, boot.consoleFlushMs);
  }

  flush(): void {
    if (this.#timer) { clearTimeout(this.#timer); this.#timer = undefined; }
    if (this.#bytes === 0 && this.#dropped === 0) return;
    const all = new Uint8Array(this.#bytes);
    let at = 0;
    for (const p of this.#parts) { all.set(p, at); at += p.length; }
    const dropped = this.#dropped;
    this.#parts = [];
    this.#bytes = 0;
    this.#dropped = 0;
    if (all.length === 0) { post({ t: 'console', data: all, dropped }); return; }
    for (let off = 0; off < all.length; off += boot.consoleChunk) {
      const chunk = all.slice(off, off + boot.consoleChunk);
      post({ t: 'console', data: chunk, dropped: off === 0 ? dropped : 0 }, [chunk.buffer as ArrayBuffer]);
    }
  }
}

/** Audit entries batched like console bytes, and bounded in count. */
class AuditStream {
  #entries: unknown[] = [];
  #dropped = 0;
  #timer: NodeJS.Timeout | undefined;

  write(entry: unknown): void {
    if (this.#entries.length >= boot.auditLimit) this.#dropped++;
    else this.#entries.push(entry);
    this.#timer ??= setTimeout(() => { this.#timer = undefined; this.flush(); }, boot.consoleFlushMs);
  }

  flush(): void {
    if (this.#timer) { clearTimeout(this.#timer); this.#timer = undefined; }
    if (this.#entries.length === 0 && this.#dropped === 0) return;
    let entries = this.#entries;
    let dropped = this.#dropped;
    this.#entries = [];
    this.#dropped = 0;
    try {
      post({ t: 'audit', entries, dropped });
    } catch {
      // An entry structured clone cannot carry (a function, a socket): drop those, count them.
      entries = entries.filter((e) => { try { structuredClone(e); return true; } catch { dropped++; return false; } });
      post({ t: 'audit', entries, dropped });
    }
  }
}

const consoleStream = new ConsoleStream();
const auditStream = new AuditStream();
let template: Snapshot | undefined;
let fileSnapshot: Snapshot | undefined;

const ctx: WorkerContext = {
  threadId: childBoot ? process.pid : threadId,
  snapshot(backend?: Backend): Snapshot | undefined {
    if (template) return template;
    if (boot.snapshotFile === undefined) return undefined;
    fileSnapshot ??= Snapshot.load(boot.snapshotFile, backend ?? kvmBackend());
    return fileSnapshot;
  },
  console(data: Uint8Array | string): void {
    consoleStream.write(typeof data === 'string' ? Buffer.from(data, 'utf8') : data);
  },
  consoleDevice(name = 'console'): Device {
    const one = new Uint8Array(1);
    return { name, write: (_offset, value) => { one[0] = value & 0xff; consoleStream.write(one); } };
  },
  audit(entry: unknown): void {
    auditStream.write(entry);
  },
};

function normalize(b: Machine | BuiltMachine): BuiltMachine {
  if (b instanceof Machine) return { machine: b };
  if (typeof b === 'object' && b !== null && (b as BuiltMachine).machine instanceof Machine) return b;
  throw new InvalidArgumentError('builder', 'must resolve to a Machine or { machine, report?, input?, close? }');
}

async function closeBuilt(b: BuiltMachine): Promise<void> {
  try { await b.machine.close(); } finally { await b.close?.(); }
}

async function build(): Promise<BuiltMachine> {
  const mod = await import(boot.module) as Record<string, unknown>;
  const builder = mod[boot.export];
  if (typeof builder !== 'function') throw new InvalidArgumentError('export', `the module ${boot.module} has no function export '${boot.export}'`);
  const make = builder as MachineBuilder;
  let built = normalize(await make(boot.init, ctx));
  if (boot.template) {
    // Fork from an in-memory snapshot of what the builder made, so reset() has a base to return to.
    try { template = await built.machine.snapshot(); } finally { await closeBuilt(built); }
    built = normalize(await make(boot.init, ctx));
  }
  return built;
}

let controller: AbortController | undefined;

/**
 * Longest slice of a deprioritised worker (`nice > 0` or `idle`), which yields the CPU between
 * slices. Linux's fair scheduler (EEVDF) does not give a normal thread strict precedence over
 * `SCHED_IDLE` or niced ones: a caller's thread that wakes with negative lag (it ran more than
 * its share against its own process's other normal threads — a load generator, V8's helpers)
 * is not eligible yet, the scheduler picks a deprioritised thread instead, and nothing picks
 * again until the next scheduler tick (4 ms at HZ=250) unless that thread blocks. A guest that
 * storms exits never blocks: measured with `perf sched` in `bench:threads`, the caller's event
 * loop waited a whole tick behind its workers (p99 ~3.5 ms). A yield every millisecond bounds
 * that wait to about a millisecond, for ~1 µs and one slice-end exit per millisecond.
 */
const DEPRIORITISED_SLICE_MS = 1;
const deprioritised = boot.idle || boot.nice > 0;

/** The run's slice length: the caller's, capped for a deprioritised worker (a bad value is left for `run()` to refuse). */
function sliceFor(sliceMs: number | undefined): number | undefined {
  if (!deprioritised) return sliceMs;
  if (sliceMs === undefined) return DEPRIORITISED_SLICE_MS;
  return typeof sliceMs === 'number' && sliceMs > DEPRIORITISED_SLICE_MS && sliceMs <= 1000 ? DEPRIORITISED_SLICE_MS : sliceMs;
}

async function serve(built: BuiltMachine, op: keyof Ops, args: unknown): Promise<unknown> {
  const vm = built.machine;
  switch (op) {
    case 'run': {
      const { withInput, input, ...a } = (args ?? {}) as RemoteRunOptions;
      if (controller) throw new StateError('the machine is already running');
      controller = new AbortController();
      try {
        if (withInput === true) {
          if (!built.input) throw new InvalidArgumentError('input', 'the machine module takes no per-run input (its builder returns no input())');
          await built.input(input);
        }
        const sliceMs = sliceFor(a.sliceMs);
        return encodeStop(await vm.run({ ...a, ...(sliceMs === undefined ? {} : { sliceMs }), signal: controller.signal }));
      } finally {
        controller = undefined;
        consoleStream.flush();
        auditStream.flush();
      }
    }
    case 'snapshot': {
      const { path } = args as Ops['snapshot']['args'];
      if (typeof path !== 'string' || path === '') throw new InvalidArgumentError('path', 'must be a non-empty string');
      const snap = await vm.snapshot();
      try {
        const fileBytes = snap.save(path);
        return { path, fileBytes, memorySize: snap.memorySize, storedBytes: snap.storedBytes };
      } finally {
        snap.close();
      }
    }
    case 'reset':
      return vm.reset({ full: (args as Ops['reset']['args']).full === true });
    case 'report':
      return built.report ? await built.report() : undefined;
    case 'stats':
      return vm.stats();
    case 'close':
      consoleStream.flush();
      auditStream.flush();
      await closeBuilt(built);
      template?.close();
      fileSnapshot?.close();
      // This thread's own KVM backend (its /dev/kvm fd and the VMs it kept for reuse): nobody
      // here creates a machine again.
      closeSharedBackend();
      return null;
  }
}

async function main(): Promise<void> {
  if (!port) throw new StateError('worker-main runs only inside a machine worker');
  // Before anything opens an fd: the parent releases what this thread still holds when it ends.
  if (boot.ledger) attachLedger(boot.ledger);
  // setpriority(PRIO_PROCESS, tid) on Linux sets one thread's nice value: this worker's only.
  if (boot.nice !== 0) setPriority(libc().gettid(), boot.nice);
  // SCHED_IDLE for this thread only (sched_setscheduler takes a thread id on Linux).
  if (boot.idle) {
    try { setThreadIdle(); } catch (e) { post({ t: 'failed', error: encodeError(e) }); return; }
  }
  let built: BuiltMachine;
  try {
    built = await build();
    // Between slices (see DEPRIORITISED_SLICE_MS): the scheduler picks again, and a waiting
    // normal thread of the caller's gets the CPU now rather than at the next tick.
    if (deprioritised) built.machine.addSliceHook('tsvm:worker-yield', yieldThread);
  } catch (e) {
    post({ t: 'failed', error: encodeError(e) });
    return;
  }
  let closing = false;
  port.on((m) => {
    if (m.t === 'abort') { controller?.abort(); return; }
    if (closing) {
      post({ t: 'result', id: m.id, ok: false, error: encodeError(new StateError('the machine worker is closing')) });
      return;
    }
    if (m.op === 'close') closing = true;
    serve(built, m.op, m.args).then(
      (value) => {
        post({ t: 'result', id: m.id, ok: true, value });
        if (m.op === 'close') port.close();
      },
      (e: unknown) => post({ t: 'result', id: m.id, ok: false, error: encodeError(e) }),
    );
  });
  post({ t: 'ready' });
}

await main();
