// Stacked bar charts in SVG, no library: one bar per day, one colour per series (by model).
// Colours are CSS classes (.s0–.s6), so the chart follows the colour scheme and needs no inline style.

import { h } from './dom.js';

const NS = 'http://www.w3.org/2000/svg';
const s = (tag, attrs, ...kids) => {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const k of kids) el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return el;
};

/**
 * `days`: ['2026-12-01', …]; `series`: [{name, values: [number per day]}]; `format(v)` for labels.
 * Returns a figure with the chart, a legend and a text summary for screen readers.
 */
export function stackedBars({ title, days, series, format }) {
  const W = 640, H = 220, L = 76, B = 24, T = 10;
  const totals = days.map((_, i) => series.reduce((a, x) => a + (x.values[i] || 0), 0));
  const max = Math.max(...totals, 0) || 1;
  const bw = (W - L - 8) / Math.max(days.length, 1);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title });
  svg.append(s('line', { class: 'axis', x1: L, x2: W, y1: H - B, y2: H - B }));
  const ticks = new Set();
  for (const f of [0, 0.5, 1]) {
    const label = format(max * f);
    if (ticks.has(label)) continue;
    ticks.add(label);
    svg.append(s('text', { x: L - 6, y: y(max * f) + 4, 'text-anchor': 'end' }, label));
  }
  days.forEach((d, i) => {
    let base = 0;
    series.forEach((ser, k) => {
      const v = ser.values[i] || 0;
      if (v > 0) {
        svg.append(s('rect', { class: `s${k % 7}`, x: L + i * bw + bw * 0.15, width: bw * 0.7, y: y(base + v), height: y(base) - y(base + v) },
          s('title', {}, `${d} · ${ser.name}: ${format(v)}`)));
      }
      base += v;
    });
    const every = Math.ceil(days.length / 8);
    if (i % every === 0) svg.append(s('text', { x: L + i * bw + bw / 2, y: H - 6, 'text-anchor': 'middle' }, d.slice(5)));
  });
  const sum = totals.reduce((a, b) => a + b, 0);
  return h('figure', { class: 'panel chart-box' },
    h('figcaption', {}, h('strong', {}, title), ` · ${format(sum)} in ${days.length} days`),
    svg,
    h('div', { class: 'legend' }, series.map((ser, k) => h('span', {}, h('i', { class: `s${k % 7}`, 'aria-hidden': 'true' }), ser.name))));
}

/** The last `n` UTC days, oldest first, as YYYY-MM-DD. */
export function lastDays(n) {
  const out = [];
  const d = new Date();
  d.setUTCHours(0, 0, 0, 0);
  d.setUTCDate(d.getUTCDate() - (n - 1));
  for (let i = 0; i < n; i++) {
    out.push(d.toISOString().slice(0, 10));
    d.setUTCDate(d.getUTCDate() + 1);
  }
  return out;
}
