/**
 * A self-contained SVG chart of predicted vs measured overhead: one row per case (a hook, or a
 * workload × hook set), two horizontal bars per row (predicted, measured), the measured bar with
 * an error bar over the repeats, each bar labelled with its value, a zero line (a negative bar is a
 * saving), and an axis in the unit that suits the figures (ns, µs or ms). Labels sit in a column
 * sized to the longest one, so nothing is clipped. Pure SVG 1.1 with inline attributes: no fonts,
 * scripts or links, so it renders the same in a browser, a paper or a PR.
 * @module
 */

/** The spread of a measured figure over repeats. */
export interface ChartSpread {
  /** Low end of the error bar (ns), e.g. the minimum or first quartile. */
  readonly lowNs: number;
  /** High end of the error bar (ns). */
  readonly highNs: number;
  /** Number of repeats behind it. */
  readonly n: number;
}

/** One row of the chart. */
export interface ChartRow {
  /** Main label (hook name, or workload + hooks). */
  readonly label: string;
  /** Second line under the label (mechanism, CPL, events). */
  readonly detail?: string;
  /** Predicted overhead (ns); undefined draws no predicted bar. */
  readonly predictedNs?: number | undefined;
  /** Measured overhead (ns). */
  readonly measuredNs: number;
  /** Spread of the measured overhead over repeats (draws an error bar). */
  readonly spread?: ChartSpread | undefined;
  /** Text after the measured value label, e.g. `|err| 7 %`. */
  readonly note?: string;
}

/** What {@link renderChart} draws. */
export interface CostChart {
  /** Title on top. */
  readonly title: string;
  /** Rows, top to bottom. */
  readonly rows: readonly ChartRow[];
  /** Legend text of the predicted bars (default `predicted overhead`). */
  readonly predictedLabel?: string;
  /** Legend text of the measured bars (default `measured overhead`). */
  readonly measuredLabel?: string;
  /** Legend text of the error bars (default `spread over repeats`). */
  readonly spreadLabel?: string;
  /** Small print under the axis (prices' source, how it was measured). */
  readonly footnote?: string;
}

/** Layout constants, exported for tests that check that nothing leaves the canvas. */
export const CHART = { width: 820, charWidth: 6.6, fontSize: 12, rowHeight: 46, barHeight: 14 } as const;

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** The display unit for values up to `maxAbsNs`. */
export function chartUnit(maxAbsNs: number): { readonly name: 'ns' | 'µs' | 'ms' | 's'; readonly ns: number } {
  if (maxAbsNs >= 1e9) return { name: 's', ns: 1e9 };
  if (maxAbsNs >= 1e6) return { name: 'ms', ns: 1e6 };
  if (maxAbsNs >= 1e3) return { name: 'µs', ns: 1e3 };
  return { name: 'ns', ns: 1 };
}

/** A tick step of 1, 2 or 5 × 10^k giving about `target` ticks over `range`. */
function tickStep(range: number, target = 6): number {
  if (!(range > 0)) return 1;
  const raw = range / target;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/** `value` in `unit` with three significant digits (at most two decimals). */
function fmtIn(v: number, unitNs: number): string {
  const x = v / unitNs;
  const a = Math.abs(x);
  const s = a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(2);
  return s.replace('-', '−');
}

function truncate(s: string, max: number): string {
  return s.length <= max ? s : `${s.slice(0, Math.max(1, max - 1))}…`;
}

const LABEL_MAX = 44;
const round = (v: number): number => Math.round(v * 10) / 10;

/** Renders `chart` as an SVG document (string). */
export function renderChart(chart: CostChart): string {
  const { width: W, charWidth: cw, rowHeight: rh, barHeight: bh } = CHART;
  const rows = chart.rows;
  const finite = (v: number | undefined): v is number => v !== undefined && Number.isFinite(v);
  const values = rows.flatMap((r) => [r.measuredNs, r.predictedNs, r.spread?.lowNs, r.spread?.highNs]).filter(finite);
  const maxAbs = Math.max(0, ...values.map(Math.abs));
  const unit = chartUnit(maxAbs);
  const labels = rows.map((r) => ({ main: truncate(r.label, LABEL_MAX), detail: r.detail === undefined ? undefined : truncate(r.detail, LABEL_MAX + 8) }));
  const labelChars = Math.max(8, ...labels.map((l) => Math.max(l.main.length, (l.detail?.length ?? 0) * 0.85)));
  const left = Math.ceil(labelChars * cw) + 24;
  const right = 24;
  const top = 78, bottom = 64;
  const plotW = W - left - right;
  const H = top + Math.max(1, rows.length) * rh + bottom;

  // The domain: the data, zero, and room on each occupied side for the value labels.
  let lo = Math.min(0, ...values), hi = Math.max(0, ...values);
  if (lo === hi) hi = lo + 1;
  const labelRoom = (): number => {
    const longest = Math.max(...rows.map((r) => `${fmtIn(r.measuredNs, unit.ns)} ${unit.name}${r.note ? `  ${r.note}` : ''}`.length), 6);
    return (longest * cw + 10) / plotW;
  };
  const room = Math.min(0.4, labelRoom());
  // With k occupied sides each needing `room` of the final width D: D = span / (1 − k·room).
  const sides = (hi > 0 ? 1 : 0) + (lo < 0 ? 1 : 0);
  const width = (hi - lo) / (1 - sides * room);
  if (hi > 0) hi += room * width;
  if (lo < 0) lo -= room * width;
  const step = tickStep(hi - lo);
  const t0 = Math.ceil(lo / step) * step;
  const x = (ns: number): number => left + ((ns - lo) / (hi - lo)) * plotW;
  const x0 = x(0);

  const out: string[] = [];
  const title = esc(chart.title);
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="${CHART.fontSize}">`);
  out.push(`<title>${title}</title>`);
  out.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text class="title" x="${W / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">${title}</text>`);
  // Legend, one line under the title.
  const legend = [
    { fill: '#9ecae1', text: chart.predictedLabel ?? 'predicted overhead' },
    { fill: '#3182bd', text: chart.measuredLabel ?? 'measured overhead' },
  ];
  let lx = left;
  out.push('<g class="legend">');
  for (const l of legend) {
    out.push(`<rect x="${round(lx)}" y="38" width="12" height="12" fill="${l.fill}"/><text x="${round(lx + 17)}" y="48">${esc(l.text)}</text>`);
    lx += 17 + l.text.length * cw + 22;
  }
  if (rows.some((r) => r.spread)) {
    out.push(`<line x1="${round(lx)}" y1="44" x2="${round(lx + 14)}" y2="44" stroke="#000"/><line x1="${round(lx)}" y1="39" x2="${round(lx)}" y2="49" stroke="#000"/><line x1="${round(lx + 14)}" y1="39" x2="${round(lx + 14)}" y2="49" stroke="#000"/><text x="${round(lx + 19)}" y="48">${esc(chart.spreadLabel ?? 'spread over repeats')}</text>`);
  }
  out.push('</g>');
  // Grid and ticks.
  const plotBottom = top + rows.length * rh;
  for (let v = t0; v <= hi + step * 1e-9; v += step) {
    const xx = round(x(v));
    out.push(`<line class="grid" x1="${xx}" y1="${top}" x2="${xx}" y2="${plotBottom}" stroke="#e6e6e6"/>`);
    out.push(`<text class="tick" x="${xx}" y="${plotBottom + 16}" text-anchor="middle">${fmtIn(Math.abs(v) < step * 1e-9 ? 0 : v, unit.ns)}</text>`);
  }
  out.push(`<line class="axis" x1="${left}" y1="${plotBottom}" x2="${W - right}" y2="${plotBottom}" stroke="#000"/>`);
  out.push(`<line class="zero" x1="${round(x0)}" y1="${top - 4}" x2="${round(x0)}" y2="${plotBottom}" stroke="#000"/>`);
  const axisText = lo < 0 ? `overhead per run (${unit.name}); left of 0: the hook saves time` : `overhead per run (${unit.name})`;
  out.push(`<text class="axis-label" x="${round(left + plotW / 2)}" y="${plotBottom + 36}" text-anchor="middle">${esc(axisText)}</text>`);
  if (chart.footnote) out.push(`<text class="footnote" x="${W - right}" y="${H - 10}" text-anchor="end" fill="#666" font-size="10">${esc(truncate(chart.footnote, Math.floor((W - 2 * right) / (cw * 0.85))))}</text>`);

  const bar = (cls: string, ns: number, y: number, fill: string, tip: string): void => {
    const a = x(Math.min(0, ns)), b = x(Math.max(0, ns));
    out.push(`<rect class="bar ${cls}" x="${round(a)}" y="${round(y)}" width="${round(Math.max(0.5, b - a))}" height="${bh}" fill="${fill}" data-ns="${Math.round(ns)}"><title>${esc(tip)}</title></rect>`);
  };
  const value = (cls: string, ns: number, reach: readonly number[], y: number, text: string): void => {
    // Beyond the bar's end and its error bar, on the side the bar points to.
    const neg = ns < 0;
    const end = neg ? Math.min(x(ns), ...reach.map(x)) : Math.max(x(ns), ...reach.map(x));
    const tx = neg ? end - 5 : end + 5;
    out.push(`<text class="value ${cls}" x="${round(tx)}" y="${round(y + bh - 3)}" text-anchor="${neg ? 'end' : 'start'}" data-chars="${text.length}">${esc(text)}</text>`);
  };
  rows.forEach((r, i) => {
    const y = top + i * rh + 6;
    const l = labels[i] as (typeof labels)[number];
    out.push(`<text class="label" x="${left - 10}" y="${round(y + bh - 2)}" text-anchor="end" data-chars="${l.main.length}">${esc(l.main)}<title>${esc(r.label)}</title></text>`);
    if (l.detail) out.push(`<text class="detail" x="${left - 10}" y="${round(y + bh + 13)}" text-anchor="end" fill="#555" font-size="10" data-chars="${l.detail.length}">${esc(l.detail)}</text>`);
    if (finite(r.predictedNs)) {
      bar('predicted', r.predictedNs, y, '#9ecae1', `${r.label}: predicted ${fmtIn(r.predictedNs, unit.ns)} ${unit.name}`);
      value('predicted', r.predictedNs, [], y, `${fmtIn(r.predictedNs, unit.ns)} ${unit.name}`);
    }
    const my = y + bh + 2;
    if (finite(r.measuredNs)) {
      const s = r.spread;
      bar('measured', r.measuredNs, my, '#3182bd', `${r.label}: measured ${fmtIn(r.measuredNs, unit.ns)} ${unit.name}${s ? ` [${fmtIn(s.lowNs, unit.ns)}–${fmtIn(s.highNs, unit.ns)}] over ${s.n} repeats` : ''}`);
      if (s && finite(s.lowNs) && finite(s.highNs)) {
        const cy = round(my + bh / 2), a = round(x(s.lowNs)), b = round(x(s.highNs));
        out.push(`<g class="errorbar" data-low-ns="${Math.round(s.lowNs)}" data-high-ns="${Math.round(s.highNs)}"><line x1="${a}" y1="${cy}" x2="${b}" y2="${cy}" stroke="#000"/><line x1="${a}" y1="${cy - 5}" x2="${a}" y2="${cy + 5}" stroke="#000"/><line x1="${b}" y1="${cy - 5}" x2="${b}" y2="${cy + 5}" stroke="#000"/></g>`);
      }
      value('measured', r.measuredNs, s ? [s.lowNs, s.highNs] : [], my, `${fmtIn(r.measuredNs, unit.ns)} ${unit.name}${r.note ? `  ${r.note}` : ''}`);
    }
  });
  out.push('</svg>');
  return out.join('\n');
}
