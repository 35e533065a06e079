// /provider-keys: the user's own upstream keys — add, verify, toggle, delete, status.
import { h, fill } from '../lib/dom.js';
import { api } from '../lib/api.js';
import { when } from '../lib/format.js';
import { form, field, pagedTable, badge, action, loading, failed } from '../lib/ui.js';

export const title = 'Provider keys';
export const access = 'user';

function status(k) {
  if (k.status && k.status !== 'healthy' && k.status !== 'active') return h('span', { class: 'badge bad' }, k.status);
  return badge(k.is_active);
}

export async function render(main, { refreshUser }) {
  const verdict = h('p', { role: 'status', class: 'state' });
  const table = pagedTable({
    label: 'Provider keys',
    emptyText: 'No provider keys yet. Add the API key you got from a provider; tollgate stores it encrypted and uses it for your requests.',
    load: (page) => api.get('/api/provider-keys', { page, per_page: 20 }),
    columns: [
      ['Provider', (k) => k.provider],
      ['Label', (k) => k.label || '—'],
      ['Key', (k) => h('code', {}, k.masked)],
      ['Status', status],
      ['Shared', (k) => (k.shared ? 'yes' : 'no'), { narrow: true }],
      ['Last used', (k) => when(k.last_used_at), { narrow: true }],
      ['', (k) => h('div', { class: 'actions' },
        action('Verify', async () => {
          fill(verdict, 'Checking the key with its provider…');
          try {
            const r = await api.post(`/api/provider-keys/${k.id}/verify`);
            fill(verdict, `${k.provider}: ${r.ok ? 'the provider accepted the key' : 'the provider refused the key'}${r.message ? ` (${r.message})` : ''}.`);
          } catch (e) {
            fill(verdict, e.status === 404 || e.status === 405 ? 'This server cannot verify keys yet.' : e.message);
          }
        }),
        action(k.is_active ? 'Disable' : 'Enable', async () => { await api.post(`/api/provider-keys/${k.id}/toggle`); table.reload(); }),
        action('Delete', async () => { await api.del(`/api/provider-keys/${k.id}`); table.reload(); },
          { danger: true, confirmText: `Delete this ${k.provider} key?` }))],
    ],
  });
  const addBox = h('div', {}, loading());
  main.append(h('h1', {}, 'Provider keys'),
    h('p', {}, 'Your own keys for the upstream providers. Requests you make through tollgate use them; they are stored encrypted and shown only masked.'),
    addBox, h('h2', {}, 'Your provider keys'), verdict, table.el);
  try {
    const [providers, me] = await Promise.all([api.get('/api/providers'), refreshUser()]);
    const opts = (providers.data || providers).map((p) => [p.key, `${p.display_name} (${p.key})`]);
    if (!opts.length) { fill(addBox, h('p', { class: 'state empty' }, 'No provider is active yet; an administrator adds them.')); return; }
    fill(addBox, h('details', { class: 'panel', open: true }, h('summary', {}, 'Add a provider key'),
      form({
        submit: 'Add key',
        className: '',
        onsubmit: async (v, f) => {
          const body = { provider: v.provider, api_key: v.api_key };
          if (v.label) body.label = v.label;
          if (v.base_url) body.base_url = v.base_url;
          if (me.role === 'admin' && v.shared) body.shared = true;
          await api.post('/api/provider-keys', body);
          f.reset();
          table.reload(1);
        },
      },
      field('Provider', 'provider', { type: 'select', options: opts, required: true }),
      field('API key', 'api_key', { type: 'password', required: true, autocomplete: 'off', hint: 'as the provider gave it' }),
      field('Label', 'label', { maxlength: 100, hint: 'optional' }),
      field('Base URL', 'base_url', { type: 'url', hint: 'optional; only to override the provider’s' }),
      me.role === 'admin' ? field('Shared: serves every user without a key of their own (charged to their balance)', 'shared', { type: 'checkbox' }) : null)));
  } catch (e) {
    fill(addBox, failed(e));
  }
}
