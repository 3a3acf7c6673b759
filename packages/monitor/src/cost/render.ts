/**
 * Rendering cost reports: a console table, JSON, and a self-contained SVG bar chart of
 * predicted vs measured cost per hook (labelled axes, legend, no external fonts or scripts).
 * @module
 */
import type { CostReport, Prediction } from './model.js';

/** Formats nanoseconds for people: `850 ns`, `12.3 µs`, `4.56 ms`, `1.20 s`. */
export function formatNs(ns: number): string {
  if (!Number.isFinite(ns)) return '—';
  const a = Math.abs(ns);
  if (a < 1e3) return `${ns.toFixed(0)} ns`;
  if (a < 1e6) return `${(ns / 1e3).toFixed(1)} µs`;
  if (a < 1e9) return `${(ns / 1e6).toFixed(2)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}

function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string => cells.map((c, i) => (i === 0 || i === 1 || i === 2 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ').trimEnd();
  return [line(headers), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

/** The report as a console table, one row per hook, with the cheaper alternatives below. */
export function renderTable(r: CostReport): string {
  const rows = r.hooks.map((h) => [
    h.name, h.mechanism, `CPL${h.cpl}`, String(h.events), formatNs(h.unitNs), formatNs(h.handlerNs), formatNs(h.totalNs), formatNs(h.overheadNs), `${(h.share * 100).toFixed(1)}%`,
  ]);
  const alts = r.hooks.filter((h) => h.alternative).map((h) => `  ${h.name}: ${h.alternative?.change} (${h.alternative?.mechanism}) would save ${formatNs(h.alternative?.savesNs ?? NaN)}`);
  return [
    `cost report for '${r.monitor}' — run ${formatNs(r.runNs)}, hooks ${formatNs(r.totalNs)} (${r.source} prices)`,
    table(['hook', 'mechanism', 'cpl', 'events', 'unit', 'handler', 'total', 'overhead', 'share'], rows),
    ...(alts.length ? ['cheaper alternatives:', ...alts] : []),
  ].join('\n');
}

/** The report as JSON (numbers in ns; NaN becomes null). */
export function renderJson(r: CostReport): string {
  return JSON.stringify(r, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2);
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function niceMax(v: number): number {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/**
 * A grouped bar chart, per hook: predicted overhead vs measured total. Pure SVG 1.1 with
 * inline styles, so it renders the same in a browser, a paper or a PR.
 */
export function renderSvg(measured: CostReport, predicted: Prediction | undefined, options: { title?: string } = {}): string {
  const names = measured.hooks.map((h) => h.name);
  const pred = new Map(predicted?.hooks.map((h) => [h.name, h.overheadNs]) ?? []);
  const W = 720, H = 420, left = 90, right = 20, top = 50, bottom = 110;
  const plotW = W - left - right, plotH = H - top - bottom;
  const values = measured.hooks.flatMap((h) => [h.totalNs, pred.get(h.name) ?? 0]).filter(Number.isFinite);
  const max = niceMax(Math.max(0, ...values) / 1e3); // µs
  const y = (us: number): number => top + plotH - (Math.max(0, us) / max) * plotH;
  const group = plotW / Math.max(1, names.length);
  const bar = Math.min(40, group / 3);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`);
  out.push(`<title>${esc(options.title ?? `Hook cost — ${measured.monitor}`)}</title>`);
  out.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${W / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">${esc(options.title ?? `Hook cost — ${measured.monitor}`)}</text>`);
  for (let i = 0; i <= 5; i++) {
    const v = (max * i) / 5, yy = y(v);
    out.push(`<line class="grid" x1="${left}" y1="${yy}" x2="${W - right}" y2="${yy}" stroke="#e0e0e0"/>`);
    out.push(`<text class="tick" x="${left - 6}" y="${yy + 4}" text-anchor="end">${+v.toFixed(2)}</text>`);
  }
  out.push(`<line class="axis" x1="${left}" y1="${top}" x2="${left}" y2="${top + plotH}" stroke="#000"/>`);
  out.push(`<line class="axis" x1="${left}" y1="${top + plotH}" x2="${W - right}" y2="${top + plotH}" stroke="#000"/>`);
  out.push(`<text class="axis-label" transform="translate(22 ${top + plotH / 2}) rotate(-90)" text-anchor="middle">cost per run (µs)</text>`);
  out.push(`<text class="axis-label" x="${left + plotW / 2}" y="${H - 12}" text-anchor="middle">hook (mechanism)</text>`);
  measured.hooks.forEach((h, i) => {
    const cx = left + group * i + group / 2;
    const p = pred.get(h.name);
    if (p !== undefined && Number.isFinite(p)) {
      out.push(`<rect class="bar predicted" x="${cx - bar}" y="${y(p / 1e3)}" width="${bar}" height="${top + plotH - y(p / 1e3)}" fill="#9ecae1"><title>${esc(h.name)} predicted ${(p / 1e3).toFixed(2)} µs</title></rect>`);
    }
    out.push(`<rect class="bar measured" x="${cx}" y="${y(h.totalNs / 1e3)}" width="${bar}" height="${top + plotH - y(h.totalNs / 1e3)}" fill="#3182bd"><title>${esc(h.name)} measured ${(h.totalNs / 1e3).toFixed(2)} µs</title></rect>`);
    out.push(`<text class="label" transform="translate(${cx} ${top + plotH + 14}) rotate(30)" text-anchor="start">${esc(h.name)} (${esc(h.mechanism)})</text>`);
  });
  const lx = W - right - 170;
  out.push(`<g class="legend"><rect x="${lx}" y="${top - 8}" width="12" height="12" fill="#9ecae1"/><text x="${lx + 18}" y="${top + 2}">predicted overhead</text>`);
  out.push(`<rect x="${lx}" y="${top + 10}" width="12" height="12" fill="#3182bd"/><text x="${lx + 18}" y="${top + 20}">measured total</text></g>`);
  out.push(`<text x="${W - right}" y="${H - 12}" text-anchor="end" fill="#666" font-size="10">${esc(measured.source)} prices</text>`);
  out.push('</svg>');
  return out.join('\n');
}
