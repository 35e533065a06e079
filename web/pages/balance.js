// /balance: balance, spend by provider, the ledger, and plan renewal.
import { h, fill } from '../lib/dom.js';
import { api } from '../lib/api.js';
import { usd, when, int } from '../lib/format.js';
import { form, field, pagedTable, table, loading, failed, empty } from '../lib/ui.js';

export const title = 'Balance';
export const access = 'user';

export async function render(main, { refreshUser }) {
  const top = h('div', {}, loading());
  const plans = h('div');
  const ledger = pagedTable({
    label: 'Ledger',
    emptyText: 'No transactions yet.',
    load: (page) => api.get('/api/me/balance/transactions', { page, per_page: 20 }),
    columns: [
      ['When', (t) => when(t.at)], ['Kind', (t) => t.kind], ['Note', (t) => t.note || '—', { narrow: true }],
      ['Amount', (t) => usd(t.amount_usd), { num: true }], ['Balance after', (t) => usd(t.balance_after_usd), { num: true }],
    ],
  });
  main.append(h('h1', {}, 'Balance'), top, plans, h('h2', {}, 'Ledger'), ledger.el);
  const load = async () => {
    const [b, me] = await Promise.all([api.get('/api/me/balance'), refreshUser()]);
    fill(top, h('div', { class: 'cards' },
      h('div', { class: 'card' }, h('div', { class: 'k' }, 'Balance'), h('div', { class: 'v', id: 'balance' }, usd(b.balance_usd))),
      h('div', { class: 'card' }, h('div', { class: 'k' }, 'Spent, 30 days'), h('div', { class: 'v' }, usd(b.spent_usd_30d))),
      h('div', { class: 'card' }, h('div', { class: 'k' }, 'Plan'), h('div', { class: 'v' }, me.plan || 'none'),
        me.plan_expires_at ? h('div', { class: 'k' }, `until ${when(me.plan_expires_at)}`) : null)),
    b.by_provider.length ? table([['Provider', (p) => p.provider], ['Spent, 30 days', (p) => usd(p.cost_usd), { num: true }]], b.by_provider, 'Spend by provider') : null);
  };
  try { await load(); } catch (e) { fill(top, failed(e)); }
  try {
    const p = await api.get('/api/plans');
    const list = p.data || [];
    if (!list.length) { fill(plans, h('h2', {}, 'Plans'), empty('No plans are offered on this server.')); return; }
    fill(plans, h('h2', {}, 'Plans'),
      table([['Plan', (x) => x.name], ['Requests/min', (x) => int(x.rpm_limit), { num: true }], ['Tokens/min', (x) => int(x.tpm_limit), { num: true }],
        ['Per month', (x) => usd(x.price_usd_per_month), { num: true }]], list, 'Plans'),
      form({
        submit: 'Renew',
        onsubmit: async (v) => { await api.post('/api/me/plan/renew', { plan: v.plan, months: v.months }); await load(); ledger.reload(1); },
      }, h('div', { class: 'row' },
        field('Plan', 'plan', { type: 'select', options: list.map((x) => [x.name, `${x.name} — ${usd(x.price_usd_per_month)}/month`]) }),
        field('Months', 'months', { type: 'number', min: 1, max: 120, step: 1, value: 1, required: true }))));
  } catch (e) {
    fill(plans, failed(e));
  }
}
