/**
 * What this thread holds of the kernel's through kvm-backend — fds (`/dev/kvm`, VMs, vCPUs,
 * memfds), mappings (guest RAM, `kvm_run`, dirty rings) and its slice timer — mirrored into
 * shared memory its parent can read once the thread is gone.
 *
 * Why: fds and mappings belong to the process, not to the thread that made them. A worker that
 * closes its machines releases them; a worker ended by `Worker.terminate()` or a heap OOM runs
 * no more JavaScript, so nothing of its own would ever close its VMs or unmap its guest RAM —
 * each such end leaked a VM, its kernel thread and its memory into the process. The parent
 * calls {@link releaseLedger} after the thread's `exit` and closes and unmaps what is left.
 *
 * Order makes it safe: an entry is written after its resource exists and removed *before* the
 * resource is released, so the ledger never names an fd number or a range that was already
 * given back (and may since belong to someone else). A thread ended in between leaks that one
 * resource; it never makes the parent close another's.
 *
 * Without {@link attachLedger} (the main thread, a child process) every call here is a no-op.
 * @module
 */
import { addressOf, libc, type NativePointer } from './raw/libc.js';

/** Entry kinds in the shared words. */
const FREE = 0n;
const FD = 1n;
const MAPPING = 2n;
const TIMER = 3n;
/** Words per entry: kind, fd or address, length. */
const STRIDE = 3;
/** Words before the first entry: how many resources did not fit. */
const HEAD = 1;

/** What {@link releaseLedger} gave back. */
export interface LedgerRelease {
  /** fds closed. */
  readonly fds: number;
  /** Mappings unmapped. */
  readonly mappings: number;
  /** POSIX timers deleted (the thread's slice timer, its vCPU runners'). */
  readonly timers: number;
  /** Resources the thread held that did not fit in the ledger (left as they are). */
  readonly unrecorded: number;
}

/** This thread's side: the shared words and where each held resource's entry is. */
interface Attached {
  readonly words: BigInt64Array;
  readonly slots: Map<string, number>;
  readonly free: number[];
}
let attached: Attached | undefined;

/**
 * Shared memory for one thread's ledger, made by its parent before the thread starts. Room for
 * `capacity` resources (a machine holds about 6: its VM, vCPU, `kvm_run`, memfd and mapping).
 */
export function createLedger(capacity = 4096): SharedArrayBuffer {
  return new SharedArrayBuffer((HEAD + capacity * STRIDE) * 8);
}

/** Makes this thread record what it opens and maps into `ledger` (once, before it opens anything). */
export function attachLedger(ledger: SharedArrayBuffer): void {
  const words = new BigInt64Array(ledger);
  const n = Math.floor((words.length - HEAD) / STRIDE);
  attached = { words, slots: new Map(), free: Array.from({ length: n }, (_, i) => n - 1 - i) };
}

/** @internal Stops recording (tests: the ledger is per thread, a test file's module state is its own). */
export function detachLedger(): void {
  attached = undefined;
}

function note(key: string, kind: bigint, a: bigint, b: bigint): void {
  const l = attached;
  if (l === undefined || l.slots.has(key)) return;
  const i = l.free.pop();
  if (i === undefined) { l.words[0] = (l.words[0] as bigint) + 1n; return; }
  const at = HEAD + i * STRIDE;
  l.words[at + 1] = a;
  l.words[at + 2] = b;
  l.words[at] = kind;
  l.slots.set(key, i);
}

function drop(key: string): void {
  const l = attached;
  if (l === undefined) return;
  const i = l.slots.get(key);
  if (i === undefined) return;
  l.words[HEAD + i * STRIDE] = FREE;
  l.slots.delete(key);
  l.free.push(i);
}

/** @internal Records an fd this thread now holds. */
export function heldFd(fd: number): void {
  if (attached && fd >= 0) note(`f${fd}`, FD, BigInt(fd), 0n);
}

/** @internal Forgets an fd about to be closed. */
export function releasingFd(fd: number): void {
  if (attached) drop(`f${fd}`);
}

/** @internal Records a mapping this thread now holds. */
export function heldMapping(ptr: NativePointer, length: number): void {
  if (attached) { const a = addressOf(ptr); note(`m${a}`, MAPPING, a, BigInt(length)); }
}

/** @internal Forgets a mapping about to be unmapped. */
export function releasingMapping(ptr: NativePointer): void {
  if (attached) drop(`m${addressOf(ptr)}`);
}

/** @internal Records a POSIX timer this thread holds (its slice timer, a vCPU runner's). */
export function heldTimer(id: bigint): void {
  if (attached) note(`t${id}`, TIMER, id, 0n);
}

/** @internal Forgets a timer about to be deleted (a runner told to quit deletes its own). */
export function releasingTimer(id: bigint): void {
  if (attached) drop(`t${id}`);
}

/**
 * Closes every fd, unmaps every range and deletes every timer the ledger still names. Call it
 * only once the thread that wrote it has ended (its `exit` event): nothing of it runs then, so
 * nothing uses them.
 * Entries are cleared as they go, so a second call gives back nothing. Loads libc only when
 * there is something to give back.
 */
export function releaseLedger(ledger: SharedArrayBuffer): LedgerRelease {
  const words = new BigInt64Array(ledger);
  let fds = 0, mappings = 0, timers = 0;
  const unrecorded = Number(words[0]);
  const close: number[] = [];
  for (let at = HEAD; at + STRIDE <= words.length; at += STRIDE) {
    const kind = words[at];
    if (kind === FREE) continue;
    const a = words[at + 1] as bigint, b = words[at + 2] as bigint;
    words[at] = FREE;
    if (kind === FD) { close.push(Number(a)); continue; }
    if (kind === MAPPING) { libc().munmapAt(a, Number(b)); mappings++; }
    if (kind === TIMER) { libc().timerDeleteId(a); timers++; }
  }
  // Mappings first: a memfd's pages and a VM's memory go with its last fd and last mapping.
  for (const fd of close) { libc().close(fd); fds++; }
  words[0] = 0n;
  return { fds, mappings, timers, unrecorded };
}
