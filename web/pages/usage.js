// /usage: charts, usage records with filters, CSV export.
import { h } from '../lib/dom.js';
import { usageCharts } from '../lib/usage.js';
import { recordsView } from '../lib/records.js';

export const title = 'Usage';
export const access = 'user';

export function render(main) {
  main.append(h('h1', {}, 'Usage'), usageCharts('/api/me/usage'), h('h2', {}, 'Requests'), recordsView('/api/me/usage/records'));
}
