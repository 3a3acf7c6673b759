/**
 * What flow mediation costs, measured on every decision (always on, like the exit counters): a
 * connection decision, an unguarded per-message check and a guarded per-message inspection are
 * different events with different prices, reported per rule and per guard, with the cheaper
 * alternative where one exists. These are measured host-side figures; `predict.ts` prices them
 * in advance from a calibrated {@link FlowCostModel}, and a monitor given one puts the prediction
 * beside each measured row.
 * @module
 */
import { formatNs } from '../cost/render.js';
import type { FlowCostModel } from './predict.js';

/** Costs of one rule or guard. */
export interface FlowCostRow {
  /** `rule` (connection decisions and unguarded messages) or `guard` (inspections). */
  readonly kind: 'rule' | 'guard';
  /** Rule id (`default` for requests no rule matched) or guard name. */
  readonly name: string;
  /** Connection decisions made by this rule. */
  readonly connections: number;
  /** Messages decided. */
  readonly messages: number;
  /** Message bytes decided. */
  readonly bytes: number;
  /** Time spent on connection decisions, ns. */
  readonly connectionNs: number;
  /** Time spent on messages, ns (for a guard: until its verdict settled). */
  readonly messageNs: number;
  /** Mean per message, ns (0 without messages). */
  readonly perMessageNs: number;
  /** Mean per byte, ns (0 without bytes). */
  readonly perByteNs: number;
  /** Frames decided (a switch's L2 frames: their own cost class, apart from stream messages). */
  readonly frames: number;
  /** Frame bytes decided. */
  readonly frameBytes: number;
  /** Time spent on frames, ns (a link's first decision is counted under `connectionNs`). */
  readonly frameNs: number;
  /** Mean per frame, ns (0 without frames). */
  readonly perFrameNs: number;
  /** Mean per frame byte, ns (0 without frames). */
  readonly perFrameByteNs: number;
  /**
   * What the monitor's `costModel` predicts for this row's own counts, ns (compare with
   * `connectionNs + messageNs + frameNs`); absent without a model or a price for the guard.
   */
  readonly predictedNs?: number;
}

/** The flow cost report. */
export interface FlowCostReport {
  /** Rows, rules first, then guards, each by descending total time. */
  readonly rows: readonly FlowCostRow[];
  /** Mean connection decision, ns. */
  readonly perConnectionNs: number;
  /** Mean unguarded message check, ns. */
  readonly perUnguardedMessageNs: number;
  /** Mean guarded message, ns. */
  readonly perGuardedMessageNs: number;
  /** Mean unguarded frame check, ns. */
  readonly perUnguardedFrameNs: number;
  /** Mean guarded frame, ns. */
  readonly perGuardedFrameNs: number;
  /** Cheaper alternatives, one line each. */
  readonly hints: readonly string[];
}

interface Acc { connections: number; messages: number; bytes: number; connectionNs: number; messageNs: number; frames: number; frameBytes: number; frameNs: number }

/** Accumulates flow decision costs. */
export class FlowCostMeter {
  readonly #rules = new Map<string, Acc>();
  readonly #guards = new Map<string, Acc>();

  #acc(m: Map<string, Acc>, k: string): Acc {
    let a = m.get(k);
    if (a === undefined) {
      a = { connections: 0, messages: 0, bytes: 0, connectionNs: 0, messageNs: 0, frames: 0, frameBytes: 0, frameNs: 0 };
      m.set(k, a);
    }
    return a;
  }

  /** Records one connection decision by `rule` (null: no rule matched). */
  connection(rule: string | null, ns: number): void {
    const a = this.#acc(this.#rules, rule ?? 'default');
    a.connections++;
    a.connectionNs += ns;
  }

  /** Records one message decided on a connection of `rule`, inspected by `guard` if not null. */
  message(rule: string | null, guard: string | null, bytes: number, ns: number): void {
    const a = guard === null ? this.#acc(this.#rules, rule ?? 'default') : this.#acc(this.#guards, guard);
    a.messages++;
    a.bytes += bytes;
    a.messageNs += ns;
  }

  /** Records one frame decided on a link of `rule`, inspected by `guard` if not null. */
  frame(rule: string | null, guard: string | null, bytes: number, ns: number): void {
    const a = guard === null ? this.#acc(this.#rules, rule ?? 'default') : this.#acc(this.#guards, guard);
    a.frames++;
    a.frameBytes += bytes;
    a.frameNs += ns;
  }

  /** The report so far. */
  report(): FlowCostReport {
    const row = (kind: 'rule' | 'guard', name: string, a: Acc): FlowCostRow => ({
      kind, name, ...a, perMessageNs: a.messages ? a.messageNs / a.messages : 0, perByteNs: a.bytes ? a.messageNs / a.bytes : 0,
      perFrameNs: a.frames ? a.frameNs / a.frames : 0, perFrameByteNs: a.frameBytes ? a.frameNs / a.frameBytes : 0,
    });
    const total = (r: FlowCostRow): number => r.connectionNs + r.messageNs + r.frameNs;
    const rules = [...this.#rules].map(([n, a]) => row('rule', n, a)).sort((x, y) => total(y) - total(x));
    const guards = [...this.#guards].map(([n, a]) => row('guard', n, a)).sort((x, y) => total(y) - total(x));
    const sum = (rs: FlowCostRow[], f: (r: FlowCostRow) => number): number => rs.reduce((s, r) => s + f(r), 0);
    const conns = sum(rules, (r) => r.connections);
    const unguarded = sum(rules, (r) => r.messages);
    const guarded = sum(guards, (r) => r.messages);
    const perConnectionNs = conns ? sum(rules, (r) => r.connectionNs) / conns : 0;
    const perUnguardedMessageNs = unguarded ? sum(rules, (r) => r.messageNs) / unguarded : 0;
    const perGuardedMessageNs = guarded ? sum(guards, (r) => r.messageNs) / guarded : 0;
    const unguardedFrames = sum(rules, (r) => r.frames);
    const guardedFrames = sum(guards, (r) => r.frames);
    const perUnguardedFrameNs = unguardedFrames ? sum(rules, (r) => r.frameNs) / unguardedFrames : 0;
    const perGuardedFrameNs = guardedFrames ? sum(guards, (r) => r.frameNs) / guardedFrames : 0;
    const hints: string[] = [];
    for (const g of guards) {
      if (g.frames > 0) {
        hints.push(`guard '${g.name}': ${formatNs(g.perFrameNs)}/frame (${formatNs(g.perFrameByteNs)}/byte); `
          + `frames between principals whose labels already flow need no content filter: an unguarded link costs ~${formatNs(perUnguardedFrameNs || perConnectionNs)} per frame`);
      }
      if (g.messages === 0) continue;
      const extra = g.perMessageNs - perUnguardedMessageNs;
      hints.push(`guard '${g.name}': ${formatNs(g.perMessageNs)}/message (${formatNs(g.perByteNs)}/byte); `
        + `if its content check is not needed, an unguarded rule between principals whose labels already flow costs ~${formatNs(perUnguardedMessageNs || perConnectionNs)} per message (saves ~${formatNs(Math.max(0, extra) * g.messages)} over this run)`);
    }
    return { rows: [...rules, ...guards], perConnectionNs, perUnguardedMessageNs, perGuardedMessageNs, perUnguardedFrameNs, perGuardedFrameNs, hints };
  }
}
