// /admin/routing: health of every deployment and provider key (§11).
import { h, fill } from '../../lib/dom.js';
import { api } from '../../lib/api.js';
import { int } from '../../lib/format.js';
import { table, loading, empty, failed } from '../../lib/ui.js';

export const title = 'Routing';
export const access = 'admin';

export async function render(main) {
  const box = h('div', {}, loading());
  const refresh = h('button', { type: 'button', onclick: () => load() }, 'Refresh');
  main.append(h('h1', {}, 'Routing health'), h('div', { class: 'actions' }, refresh), box);
  async function load() {
    fill(box, loading());
    try {
      const r = await api.get('/api/admin/routing/health');
      const rows = r.data || r.deployments || (Array.isArray(r) ? r : []);
      const state = (x) => h('span', { class: `badge ${x.state === 'healthy' ? 'on' : 'bad'}` }, x.state || '—');
      fill(box, rows.length ? table([
        ['Model / deployment', (x) => [x.model, x.provider, x.upstream_model].filter(Boolean).join(' · ') || '—'],
        ['Key', (x) => (x.key || x.masked ? h('code', {}, x.key || x.masked) : '—')], ['State', state],
        ['Requests', (x) => int(x.requests), { num: true }], ['Failures', (x) => int(x.failures), { num: true }],
        ['p50 latency', (x) => (x.p50_latency_ms != null ? `${int(x.p50_latency_ms)} ms` : '—'), { num: true }],
      ], rows, 'Routing health') : empty('No traffic in the last 5 minutes.'));
    } catch (e) {
      fill(box, e.status === 404 ? empty('This server does not report routing health yet.') : failed(e));
    }
  }
  load();
}
