/**
 * Guards: named content hooks, the only way a message may lose a secrecy tag. A guard sees each
 * message of a connection whose rule names it (both directions) and returns `allow` (optionally
 * declassifying tags its policy declaration lists), `block`, or `rewrite` (new bytes, optionally
 * declassified). A guard that throws, returns nonsense, declassifies a tag it was not granted, or
 * does not settle within its declared timeout fails closed: the message is denied and the reason
 * says which of these happened.
 * @module
 */
import type { Label } from './labels.js';

/** What a guard says about one message. */
export type GuardVerdict =
  | { readonly action: 'allow'; readonly declassify?: readonly string[] }
  | { readonly action: 'block'; readonly reason?: string }
  | { readonly action: 'rewrite'; readonly data: Uint8Array; readonly declassify?: readonly string[] };

/** What a guard is told about the message it inspects. */
export interface GuardContext {
  /** Guard name. */
  readonly guard: string;
  /** Connection id. */
  readonly connection: number;
  /** Sending principal. */
  readonly from: string;
  /** Receiving principal. */
  readonly to: string;
  /** Label the message carries before the guard (the sender's). */
  readonly label: Label;
  /** Destination port of the connection. */
  readonly port: number;
  /** Aborted when the inspection timed out: a guard doing async work should stop. */
  readonly signal: AbortSignal;
}

/** A guard's code. May be synchronous (cheaper: no promise, no timer) or async. */
export type GuardFn = (data: Uint8Array, context: GuardContext) => GuardVerdict | Promise<GuardVerdict>;

/** The result of running a guard, after fail-closed checks. */
export type GuardOutcome =
  | { readonly ok: true; readonly data: Uint8Array; readonly declassified: readonly string[]; readonly rewritten: boolean }
  | { readonly ok: false; readonly reason: string };

function check(v: unknown, data: Uint8Array, granted: readonly string[], name: string): GuardOutcome {
  if (typeof v !== 'object' || v === null) return { ok: false, reason: `guard '${name}' returned ${String(v)}, not a verdict (fail closed)` };
  const r = v as Record<string, unknown>;
  if (r['action'] === 'block') return { ok: false, reason: `guard '${name}' blocked${typeof r['reason'] === 'string' ? `: ${r['reason']}` : ''}` };
  if (r['action'] !== 'allow' && r['action'] !== 'rewrite') return { ok: false, reason: `guard '${name}' returned action ${JSON.stringify(r['action'])} (fail closed)` };
  const d = r['declassify'] ?? [];
  if (!Array.isArray(d) || !d.every((t) => typeof t === 'string')) return { ok: false, reason: `guard '${name}' returned a malformed declassify list (fail closed)` };
  const extra = (d as string[]).filter((t) => !granted.includes(t));
  if (extra.length) return { ok: false, reason: `guard '${name}' tried to declassify {${extra.join(',')}}, which its declaration does not grant (fail closed)` };
  if (r['action'] === 'rewrite') {
    if (!(r['data'] instanceof Uint8Array)) return { ok: false, reason: `guard '${name}' rewrote to something that is not bytes (fail closed)` };
    return { ok: true, data: r['data'], declassified: d as string[], rewritten: true };
  }
  return { ok: true, data, declassified: d as string[], rewritten: false };
}

/**
 * The context a guard sees: plain fields and a `signal` whose controller is made on first access
 * only (creating one costs microseconds, most of a synchronous guard's fixed price, and a guard
 * that never looks at its signal cannot be told to stop anyway). A class, not a spread with a
 * getter: that object was slow to build and to read, once per guarded message.
 */
class Context implements GuardContext {
  readonly guard: string;
  readonly connection: number;
  readonly from: string;
  readonly to: string;
  readonly label: Label;
  readonly port: number;
  #ac: AbortController | undefined;

  constructor(c: Omit<GuardContext, 'signal'>) {
    this.guard = c.guard;
    this.connection = c.connection;
    this.from = c.from;
    this.to = c.to;
    this.label = c.label;
    this.port = c.port;
  }

  get signal(): AbortSignal {
    return (this.#ac ??= new AbortController()).signal;
  }

  abort(): void {
    this.#ac?.abort();
  }
}

/**
 * Runs `fn` on `data` with fail-closed semantics. Synchronous verdicts are returned synchronously
 * (no promise, no timer); a promise races a `timeoutMs` timer.
 */
export function runGuard(fn: GuardFn, data: Uint8Array, context: Omit<GuardContext, 'signal'>, granted: readonly string[], timeoutMs: number): GuardOutcome | Promise<GuardOutcome> {
  const ctx = new Context(context);
  let v: GuardVerdict | Promise<GuardVerdict>;
  try {
    v = fn(data, ctx);
  } catch (e) {
    return { ok: false, reason: `guard '${context.guard}' threw: ${e instanceof Error ? e.message : String(e)} (fail closed)` };
  }
  if (!(v instanceof Promise)) return check(v, data, granted, context.guard);
  return new Promise<GuardOutcome>((resolve) => {
    const timer = setTimeout(() => {
      ctx.abort();
      resolve({ ok: false, reason: `guard '${context.guard}' did not settle within ${timeoutMs} ms (fail closed)` });
    }, timeoutMs);
    v.then(
      (x) => { clearTimeout(timer); resolve(check(x, data, granted, context.guard)); },
      (e: unknown) => { clearTimeout(timer); resolve({ ok: false, reason: `guard '${context.guard}' threw: ${e instanceof Error ? e.message : String(e)} (fail closed)` }); },
    );
  });
}
