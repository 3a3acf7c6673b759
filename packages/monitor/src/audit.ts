/**
 * The audit log: one JSON line per mediate decision, hash-chained so that a reader holding the
 * lines can tell whether one was removed, reordered or edited. Each line carries `prev` (the
 * previous line's hash; 64 zeros for the first) and `hash` = sha256(prev + the line without its
 * `hash` field). Truncating the *tail* is only detectable against a head hash kept elsewhere:
 * pass it to {@link verifyAuditLog} as `head`.
 *
 * Decisions are also published on `diagnostics_channel` `tsvm:monitor:decision`; the message is
 * built only when someone subscribes, so tracing costs nothing otherwise.
 * @module
 */
import * as crypto from 'node:crypto';

const { createHash } = crypto;
/** `crypto.hash` where this Node has it (20.12+; absent from older 20.x). */
const oneShot = (crypto as { hash?: (algorithm: string, data: string, encoding: 'hex') => string }).hash;
import { channel } from 'node:diagnostics_channel';
import { InvalidArgumentError } from '@tsvm/core';

/** The diagnostics channel name. */
export const DECISION_CHANNEL = 'tsvm:monitor:decision';
/** The channel (publish only when `hasSubscribers`). */
export const decisionChannel = channel(DECISION_CHANNEL);

/** `prev` of the first line. */
export const GENESIS = '0'.repeat(64);

/** One decision, before chaining. Addresses and values are hex strings (JSON has no bigint). */
export interface AuditEntry {
  /** Machine name. */
  readonly machine: string;
  /** vCPU index. */
  readonly vcpu: number;
  /** Guest RIP, hex. */
  readonly rip: string;
  /** Event name (`pio`, `mmio`, ...). */
  readonly event: string;
  /** Port, address or MSR index, hex; null when the event has none. */
  readonly address: string | null;
  /** Hook name. */
  readonly hook: string;
  /** The verdict. */
  readonly decision: 'allow' | 'deny' | 'emulate';
  /** Deny effect, when denied. */
  readonly effect?: string;
  /** Deny reason, when given. */
  readonly reason?: string;
  /** Emulated value, hex. */
  readonly value?: string;
  /**
   * Elements the decision covered, when more than one: a string I/O exit (`rep ins`/`outs`)
   * carries up to 1024 and one decision applies to all of them. Absent means 1.
   */
  readonly count?: number;
  /** Exit sequence number in the machine's life. */
  readonly exit: number;
  /** `dma` for a write a device made into guest RAM (absent for the guest's own accesses). */
  readonly source?: 'dma';
  /** The device that made a DMA write. */
  readonly device?: string;
  /** Length in bytes of a DMA write (with `address`, its exact range). */
  readonly length?: number;
}

/** One chained line as parsed back. */
export interface AuditLine extends AuditEntry {
  /** ISO timestamp. */
  readonly time: string;
  /** Line number in this log, from 0. */
  readonly seq: number;
  /** Hash of the previous line. */
  readonly prev: string;
  /** sha256(prev + this line without `hash`). */
  readonly hash: string;
}

/** Where lines go: an array, a writable stream, or a function. */
export type AuditSink = string[] | {
  /** Receives one JSON line (with a trailing newline), e.g. a Node `Writable`. */
  write(line: string): unknown;
} | ((line: string) => void);

function sha256(s: string): string {
  // crypto.hash (Node ≥ 20.12) is the one-shot form: ~0.8 µs for a line, createHash ~1.9 µs.
  return typeof oneShot === 'function' ? oneShot('sha256', s, 'hex') : createHash('sha256').update(s).digest('hex');
}

/** Keys the chain adds to an entry (an entry carrying one of them takes the slow, spread path). */
const RESERVED = ['time', 'seq', 'prev', 'hash'] as const;

/** An append-only, hash-chained log of decisions. */
export class AuditLog {
  readonly #sink: AuditSink;
  #prev = GENESIS;
  #seq = 0;

  /**
   * @param sink - where lines go. Streams receive each line with a trailing newline; arrays and
   * functions receive it without.
   */
  constructor(sink: AuditSink = []) {
    this.#sink = sink;
  }

  /** Hash of the last line (keep it elsewhere to detect tail truncation). */
  get head(): string {
    return this.#prev;
  }

  /** Lines written so far. */
  get length(): number {
    return this.#seq;
  }

  /** Chains and writes one entry. @returns the line written. */
  append(entry: AuditEntry, time: Date = new Date()): string {
    if (RESERVED.some((k) => Object.hasOwn(entry, k))) {
      const body = { ...entry, time: time.toISOString(), seq: this.#seq, prev: this.#prev };
      const hash = sha256(this.#prev + JSON.stringify(body));
      return this.#write(JSON.stringify({ ...body, hash }), hash);
    }
    // The bytes of JSON.stringify({ ...entry, time, seq, prev }), built from the entry's own JSON:
    // stringifying a spread copy cost ~4.7 µs a line, most of a mediated message's price.
    return this.#chain(JSON.stringify(entry), time);
  }

  /**
   * Chains and writes one entry given as its JSON text — exactly what `JSON.stringify(entry)`
   * gives for an {@link AuditEntry} without the chain's keys (`time`, `seq`, `prev`, `hash`).
   * For callers that write many entries of one shape from a template they built with
   * `JSON.stringify` (the flow monitor's per-message lines): the text is chained as given, so
   * text that is not canonical JSON of an object makes the line fail {@link verifyAuditLog}.
   * @returns the line written.
   * @throws InvalidArgumentError when `json` is not a string holding a JSON object's text.
   */
  appendJson(json: string, time: Date = new Date()): string {
    if (typeof json !== 'string' || json[0] !== '{' || json[json.length - 1] !== '}') throw new InvalidArgumentError('json', 'must be the JSON text of an object (JSON.stringify of an AuditEntry)');
    return this.#chain(json, time);
  }

  #isoMs = Number.NaN;
  #iso = '';

  /** Adds time, seq and prev to an entry's own JSON, hashes it and writes the line. */
  #chain(own: string, time: Date): string {
    const ms = time.getTime();
    // Lines come many per millisecond: the timestamp's JSON once per millisecond.
    if (ms !== this.#isoMs) { this.#isoMs = ms; this.#iso = JSON.stringify(time.toISOString()); }
    const chained = `"time":${this.#iso},"seq":${this.#seq},"prev":"${this.#prev}"`;
    const unsigned = own === '{}' ? `{${chained}}` : `${own.slice(0, -1)},${chained}}`;
    const hash = sha256(this.#prev + unsigned);
    return this.#write(`${unsigned.slice(0, -1)},"hash":"${hash}"}`, hash); // hash last, as JSON.stringify({ ...body, hash }) puts it
  }

  #write(line: string, hash: string): string {
    this.#prev = hash;
    this.#seq++;
    const s = this.#sink;
    if (Array.isArray(s)) s.push(line);
    else if (typeof s === 'function') s(line);
    else s.write(`${line}\n`);
    return line;
  }
}

/** Result of {@link verifyAuditLog}. */
export type AuditVerification =
  | { readonly ok: true; readonly count: number; readonly head: string }
  | { readonly ok: false; readonly line: number; readonly problem: string };

/**
 * Checks a log: every line parses, `seq` counts up from 0, `prev` is the previous line's hash and
 * `hash` matches the content. Detects removed, reordered and edited lines; pass `head` (the hash
 * of the last line, kept elsewhere) to detect a truncated tail too.
 */
export function verifyAuditLog(lines: Iterable<string>, options: { head?: string } = {}): AuditVerification {
  let prev = GENESIS;
  let n = 0;
  for (const raw of lines) {
    const text = raw.trim();
    if (text === '') continue;
    let obj: Record<string, unknown>;
    try {
      obj = JSON.parse(text) as Record<string, unknown>;
    } catch {
      return { ok: false, line: n, problem: 'not JSON' };
    }
    const { hash, ...rest } = obj;
    if (rest['seq'] !== n) return { ok: false, line: n, problem: `seq is ${String(rest['seq'])}, expected ${n} (a line was removed or reordered)` };
    if (rest['prev'] !== prev) return { ok: false, line: n, problem: 'prev does not match the previous line (a line was removed, reordered or edited)' };
    if (typeof hash !== 'string' || sha256(prev + JSON.stringify(rest)) !== hash) return { ok: false, line: n, problem: 'hash does not match the content (the line was edited)' };
    prev = hash;
    n++;
  }
  if (options.head !== undefined && options.head !== prev) return { ok: false, line: n, problem: 'the last line is not the expected head (lines were removed from the end)' };
  return { ok: true, count: n, head: prev };
}
