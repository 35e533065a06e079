// /admin/audit: every user's audit entries, filtered by action or actor.
import { h } from '../../lib/dom.js';
import { api } from '../../lib/api.js';
import { when } from '../../lib/format.js';
import { field, pagedTable } from '../../lib/ui.js';

export const title = 'Audit log';
export const access = 'admin';

export function render(main) {
  let filters = {};
  const list = pagedTable({
    label: 'Audit log', emptyText: 'No entries match.',
    load: (page) => api.get('/api/admin/audit-log', { ...filters, page, per_page: 20 }),
    columns: [['When', (e) => when(e.at)], ['Actor', (e) => e.actor_id || '—', { narrow: true }], ['Action', (e) => e.action],
      ['Target', (e) => e.target || '—'], ['Address', (e) => e.ip || '—', { narrow: true }],
      ['Detail', (e) => (e.detail ? h('code', {}, JSON.stringify(e.detail)) : '—'), { narrow: true }]],
  });
  const f = h('form', { class: 'panel row', role: 'search' }, field('Action', 'action', { placeholder: 'e.g. user.disable' }),
    field('Actor id', 'actor_id', { placeholder: 'any' }), h('button', { type: 'submit', class: 'primary' }, 'Filter'));
  f.addEventListener('submit', (ev) => { ev.preventDefault(); filters = Object.fromEntries(new FormData(f)); list.reload(1); });
  main.append(h('h1', {}, 'Audit log'), f, list.el);
}
