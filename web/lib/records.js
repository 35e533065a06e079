// Usage records with filters and a CSV export (the user's /usage and the admin report).
import { h } from './dom.js';
import { all, api } from './api.js';
import { usd, int, when, dayStart, dayEnd } from './format.js';
import { field, pagedTable, csv, download, action } from './ui.js';

export const COLUMNS = [
  ['at', (r) => r.at], ['user_id', (r) => r.user_id ?? ''], ['key_id', (r) => r.key_id ?? ''], ['source', (r) => r.source ?? ''], ['model', (r) => r.model],
  ['provider', (r) => r.provider], ['endpoint', (r) => r.endpoint], ['stream', (r) => r.stream], ['status', (r) => r.status],
  ['prompt_tokens', (r) => r.prompt_tokens], ['completion_tokens', (r) => r.completion_tokens], ['cached_tokens', (r) => r.cached_tokens],
  ['cost_usd', (r) => r.cost_usd], ['latency_ms', (r) => r.latency_ms], ['ttft_ms', (r) => r.ttft_ms ?? ''],
  ['tokens_estimated', (r) => r.tokens_estimated], ['request_id', (r) => r.request_id],
];

/** Filters + table + export of `path`'s records; `extraFields` add filters (admin: user id). */
export function recordsView(path, { extraFields = [], fileName = 'usage' } = {}) {
  let filters = {};
  const table = pagedTable({
    label: 'Usage records',
    emptyText: 'No requests match. Requests made with your gateway keys or in the chat appear here within seconds.',
    load: (page) => api.get(path, { ...filters, page, per_page: 20 }),
    columns: [
      ['When', (r) => when(r.at)],
      ['Model', (r) => r.model],
      ['Endpoint', (r) => (r.source === 'chat' ? `${r.endpoint} (console chat)` : r.endpoint), { narrow: true }],
      ['Status', (r) => h('span', { class: `badge ${r.status < 400 ? 'on' : 'bad'}` }, String(r.status))],
      ['Tokens in / out', (r) => `${int(r.prompt_tokens)} / ${int(r.completion_tokens)}${r.tokens_estimated ? ' (est.)' : ''}`, { num: true }],
      ['Cost', (r) => h('span', { class: 'cost' }, usd(r.cost_usd)), { num: true }],
      ['Latency', (r) => `${int(r.latency_ms)} ms`, { num: true, narrow: true }],
    ],
  });
  const f = h('form', { class: 'panel filters', role: 'search' },
    h('div', { class: 'row' },
      field('From', 'from', { type: 'date' }), field('To', 'to', { type: 'date' }),
      field('Model', 'model', { placeholder: 'any' }), field('Gateway key id', 'key_id', { placeholder: 'any' }),
      extraFields,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Filter'),
        action('Export CSV', async () => {
          const rows = await all(path, filters);
          download(`${fileName}-${new Date().toISOString().slice(0, 10)}.csv`, csv(COLUMNS, rows));
        }))));
  f.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = Object.fromEntries(new FormData(f));
    filters = { model: v.model?.trim(), key_id: v.key_id?.trim(), user_id: v.user_id?.trim(), from: dayStart(v.from), to: dayEnd(v.to) };
    table.reload(1);
  });
  return h('div', {}, f, table.el);
}
