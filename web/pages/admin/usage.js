// /admin/usage: reports across users — totals grouped by user, model, provider, day or key; records.
import { h, fill } from '../../lib/dom.js';
import { api } from '../../lib/api.js';
import { usd, int, dayStart, dayEnd } from '../../lib/format.js';
import { field, table, loading, failed, empty } from '../../lib/ui.js';
import { usageCharts } from '../../lib/usage.js';
import { recordsView } from '../../lib/records.js';

export const title = 'Reports';
export const access = 'admin';

export async function render(main) {
  const stats = h('div', { class: 'cards' }, loading());
  const report = h('div', { id: 'report' });
  const f = h('form', { class: 'panel row', role: 'search' },
    field('Group by', 'group_by', { type: 'select', options: [['user', 'user'], ['model', 'model'], ['provider', 'provider'], ['day', 'day'], ['key', 'gateway key']] }),
    field('From', 'from', { type: 'date' }), field('To', 'to', { type: 'date' }), field('User id', 'user_id', { placeholder: 'any' }),
    h('button', { type: 'submit', class: 'primary' }, 'Show'));
  const run = async () => {
    const v = Object.fromEntries(new FormData(f));
    fill(report, loading());
    try {
      const r = await api.get('/api/admin/usage', { group_by: v.group_by, from: dayStart(v.from), to: dayEnd(v.to), user_id: v.user_id.trim() });
      if (v.group_by === 'user') {
        // Groups are user ids; show who they are (the first 50).
        await Promise.all(r.data.slice(0, 50).map(async (g) => {
          try { g.label = (await api.get(`/api/admin/users/${encodeURIComponent(g.group)}`)).username; } catch { /* deleted */ }
        }));
      }
      fill(report, r.data.length ? table([
        [v.group_by, (g) => (g.label ? `${g.label} (${g.group})` : g.group ?? '—')], ['Requests', (g) => int(g.requests), { num: true }], ['Errors', (g) => int(g.errors), { num: true }],
        ['Tokens in / out', (g) => `${int(g.prompt_tokens)} / ${int(g.completion_tokens)}`, { num: true }],
        ['Cost', (g) => usd(g.cost_usd), { num: true }], ['Avg latency', (g) => `${int(Math.round(g.avg_latency_ms))} ms`, { num: true }],
      ], [...r.data, { ...r.totals, group: 'total' }], 'Usage report') : empty('No usage in this period.'));
    } catch (e) {
      fill(report, failed(e));
    }
  };
  f.addEventListener('submit', (ev) => { ev.preventDefault(); run(); });
  main.append(h('h1', {}, 'Reports'), stats, usageCharts('/api/admin/usage'), h('h2', {}, 'Usage report'), f, report,
    h('h2', {}, 'Records'), recordsView('/api/admin/usage/records', { extraFields: [field('User id', 'user_id', { placeholder: 'any' })], fileName: 'usage-all' }));
  run();
  try {
    const s = await api.get('/api/admin/stats');
    const card = (k, v) => h('div', { class: 'card' }, h('div', { class: 'k' }, k), h('div', { class: 'v' }, v));
    fill(stats, card('Users', int(s.users)), card('Active gateway keys', int(s.active_keys)), card('Requests, 24 h', int(s.requests_24h)),
      card('Tokens, 24 h', int(s.tokens_24h)), card('Cost, 24 h', usd(s.cost_usd_24h)));
  } catch (e) {
    fill(stats, failed(e));
  }
}
