/**
 * The flow graph as a standalone SVG a person can read without Graphviz: principals in columns by
 * distance from the principals nobody connects to, request edges solid (dashed for `ask`), reply
 * edges dotted, a guard as a diamond on its edge. For large graphs, prefer the DOT rendering.
 * @module
 */
import type { FlowEdge } from './analysis.js';
import type { CompiledTopology } from './policy.js';

const W = 170, H = 54, COL = 260, ROW = 110, PAD = 30;

function esc(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Renders principals and edges as SVG text. */
export function renderFlowSvg(top: CompiledTopology, edges: readonly FlowEdge[]): string {
  const names = [...top.principals.keys()];
  const incoming = new Set(edges.filter((e) => e.direction === 'request').map((e) => e.to));
  const rank = new Map<string, number>();
  let frontier = names.filter((n) => !incoming.has(n));
  if (frontier.length === 0) frontier = names.slice(0, 1);
  for (const n of frontier) rank.set(n, 0);
  while (frontier.length) {
    const next: string[] = [];
    for (const n of frontier) {
      for (const e of edges) {
        if (e.direction !== 'request' || e.from !== n || rank.has(e.to)) continue;
        rank.set(e.to, (rank.get(n) ?? 0) + 1);
        next.push(e.to);
      }
    }
    frontier = next;
  }
  for (const n of names) if (!rank.has(n)) rank.set(n, 0);
  const rows = new Map<number, number>();
  const pos = new Map<string, { x: number; y: number }>();
  for (const n of names) {
    const r = rank.get(n) ?? 0;
    const i = rows.get(r) ?? 0;
    rows.set(r, i + 1);
    pos.set(n, { x: PAD + r * COL, y: PAD + i * ROW });
  }
  const width = PAD * 2 + Math.max(...[...rank.values()], 0) * COL + W;
  const height = PAD * 2 + (Math.max(...rows.values(), 1) - 1) * ROW + H + 20;
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#333"/></marker></defs>',
  ];
  edges.forEach((e) => {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) return;
    // Replies run slightly below requests so the two directions do not overlap.
    const off = e.direction === 'reply' ? 12 : -12;
    const x1 = a.x + W / 2, y1 = a.y + H / 2 + off, x2 = b.x + W / 2, y2 = b.y + H / 2 + off;
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    const cos = Math.abs(dx) / len, sin = Math.abs(dy) / len;
    // Distance from a box's centre to its border along the edge.
    const shrink = Math.min(cos > 0 ? W / 2 / cos : Infinity, sin > 0 ? H / 2 / sin : Infinity);
    const sx = x1 + (dx / len) * shrink, sy = y1 + (dy / len) * shrink, ex = x2 - (dx / len) * shrink, ey = y2 - (dy / len) * shrink;
    const dash = e.direction === 'reply' ? ' stroke-dasharray="2,4" stroke="#888"' : e.ask ? ' stroke-dasharray="6,4" stroke="#333"' : ' stroke="#333"';
    out.push(`<line x1="${sx.toFixed(1)}" y1="${sy.toFixed(1)}" x2="${ex.toFixed(1)}" y2="${ey.toFixed(1)}"${dash} stroke-width="1.5" marker-end="url(#arrow)"/>`);
    const mx = (sx + ex) / 2, my = (sy + ey) / 2;
    const label = `${e.rule}${e.direction === 'reply' ? ' (reply)' : ''}: ${e.ports.join(' ')}`;
    out.push(`<text x="${mx.toFixed(1)}" y="${(my - 8).toFixed(1)}" text-anchor="middle" fill="#444">${esc(label)}</text>`);
    if (e.guard !== null) {
      out.push(`<polygon points="${mx},${my - 9} ${mx + 9},${my} ${mx},${my + 9} ${mx - 9},${my}" fill="#fde68a" stroke="#b45309"/>`);
      out.push(`<text x="${mx.toFixed(1)}" y="${(my + 22).toFixed(1)}" text-anchor="middle" fill="#b45309" font-weight="bold">${esc(e.guard)}</text>`);
    }
  });
  for (const [n, p] of pos) {
    const pr = top.principals.get(n);
    if (!pr) continue;
    const rx = pr.kind === 'host' ? 24 : 4;
    const fill = pr.label.secrecy.length ? '#fee2e2' : '#e0f2fe';
    out.push(`<rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="${rx}" fill="${fill}" stroke="#334155"/>`);
    out.push(`<text x="${p.x + W / 2}" y="${p.y + 20}" text-anchor="middle" font-weight="bold">${esc(n)}</text>`);
    out.push(`<text x="${p.x + W / 2}" y="${p.y + 38}" text-anchor="middle" fill="#475569">s: ${esc(pr.label.secrecy.join(',') || '-')}  i: ${esc(pr.label.integrity.join(',') || '-')}</text>`);
  }
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}
