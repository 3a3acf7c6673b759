/**
 * `explain(decision)`: the rule path of a flow decision as text a person reads — every rule looked
 * at and why it did not match, the one that did, the lattice check, the `ask` answer, the guard.
 * @module
 */
import { formatLabel } from './labels.js';
import type { ConnectDecision, MessageDecision } from './monitor.js';

/** Renders the rule path of a connection or message decision, one step per line. */
export function explain(decision: ConnectDecision | MessageDecision): string {
  if (!('request' in decision)) {
    const lines = [`message: ${decision.verdict.toUpperCase()}`];
    if (decision.guard !== null) lines.push(`  guard '${decision.guard}' inspected it`);
    if (decision.verdict === 'allow') {
      lines.push(`  delivered with label ${formatLabel(decision.label)}${decision.rewritten ? ' (rewritten)' : ''}`);
      if (decision.declassified.length) lines.push(`  declassified {${decision.declassified.join(',')}}`);
    }
    lines.push(`  because ${decision.reason}`);
    return lines.join('\n');
  }
  const r = decision.request;
  const lines = [`connect ${r.source} → ${r.destination}:${r.port}${r.service ? ` (${r.service})` : ''}: ${decision.verdict.toUpperCase()}`];
  for (const s of decision.trace) lines.push(s.matched ? `  rule '${s.rule}': matched` : `  rule '${s.rule}': skipped, ${s.why}`);
  if (decision.trace.length > 0 && decision.rule === null) lines.push('  no rule matched: deny by default');
  if (decision.lattice !== null) {
    const c = decision.connection;
    const gap = decision.lattice;
    const labels = c ? ` ${formatLabel(c.sourceLabel)} → ${formatLabel(c.destinationLabel)}` : '';
    lines.push(gap.secrecy.length === 0 && gap.integrity.length === 0
      ? `  lattice:${labels} flows`
      : `  lattice:${labels} gap secrecy {${gap.secrecy.join(',')}} integrity {${gap.integrity.join(',')}}`);
  }
  if (decision.guard !== null) lines.push(`  every message passes guard '${decision.guard}'`);
  if (decision.asked) lines.push('  decided by the ask callback');
  if (decision.wouldBe !== undefined) lines.push(`  learning mode: enforcement would ${decision.wouldBe}`);
  lines.push(`  because ${decision.reason}`);
  return lines.join('\n');
}
