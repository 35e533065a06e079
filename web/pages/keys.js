// /keys: gateway keys — create (the secret shown once), limits, toggle, rotate, delete.
import { h, fill } from '../lib/dom.js';
import { api } from '../lib/api.js';
import { usd, when } from '../lib/format.js';
import { form, field, pagedTable, badge, copyButton, action } from '../lib/ui.js';

export const title = 'Gateway keys';
export const access = 'user';

const list = (s) => (s ? s.split(/[\s,]+/).filter(Boolean) : null);

/** The key's limits as the API takes them; blank fields are `null` (no limit). */
function limits(v) {
  return {
    allowed_models: list(v.allowed_models),
    allowed_ips: list(v.allowed_ips),
    rpm_limit: v.rpm_limit,
    tpm_limit: v.tpm_limit,
    budget_usd: v.budget_usd,
    expires_at: v.expires_at ? new Date(v.expires_at).toISOString() : null,
  };
}

function limitFields(k = {}) {
  return [
    field('Allowed models', 'allowed_models', { hint: 'comma-separated; empty = every model', value: (k.allowed_models || []).join(', ') }),
    field('Allowed client addresses', 'allowed_ips', { hint: 'CIDRs, comma-separated; empty = any', value: (k.allowed_ips || []).join(', ') }),
    h('div', { class: 'row' },
      field('Requests per minute', 'rpm_limit', { type: 'number', min: 1, step: 1, value: k.rpm_limit ?? '' }),
      field('Tokens per minute', 'tpm_limit', { type: 'number', min: 1, step: 1, value: k.tpm_limit ?? '' }),
      field('Budget (USD)', 'budget_usd', { type: 'number', min: 0, step: 'any', value: k.budget_usd ?? '' })),
    field('Expires', 'expires_at', { type: 'datetime-local', hint: 'your local time; empty = never', value: k.expires_at ? k.expires_at.slice(0, 16) : '' }),
  ];
}

/** The secret of a new or rotated key, once, with a copy button. */
function secretPanel(box, key, what) {
  fill(box, h('section', { class: 'panel notice warn', 'aria-live': 'polite', id: 'new-key' },
    h('h2', {}, `${what}: copy the secret now`),
    h('p', {}, 'This is the only time it is shown. Use it as the API key of any OpenAI SDK, with the base URL ', h('code', {}, `${location.origin}/v1`), '.'),
    h('p', { class: 'secret' }, h('code', { id: 'new-key-secret' }, key.key), copyButton(key.key)),
    h('button', { type: 'button', onclick: () => fill(box) }, 'I have copied it')));
  box.scrollIntoView({ block: 'nearest' });
}

export function render(main) {
  const secretBox = h('div');
  const editBox = h('div');
  const table = pagedTable({
    label: 'Gateway keys',
    emptyText: 'No gateway keys yet. Create one above; your programs send it instead of your provider key.',
    load: (page) => api.get('/api/keys', { page, per_page: 20 }),
    columns: [
      ['Name', (k) => h('span', { class: 'key-name' }, k.name)],
      ['Key', (k) => h('code', {}, k.masked)],
      ['Status', (k) => badge(k.is_active)],
      ['Limits', (k) => [k.rpm_limit ? `${k.rpm_limit} rpm ` : '', k.tpm_limit ? `${k.tpm_limit} tpm ` : '',
        k.allowed_models ? `models: ${k.allowed_models.join(', ')} ` : '', k.allowed_ips ? `ips: ${k.allowed_ips.join(', ')} ` : '',
        k.expires_at ? `expires ${when(k.expires_at)}` : ''].join('') || 'none', { narrow: true }],
      ['Spent', (k) => `${usd(k.spent_usd)}${k.budget_usd != null ? ` of ${usd(k.budget_usd)}` : ''}`, { num: true }],
      ['Last used', (k) => when(k.last_used_at), { narrow: true }],
      ['', (k) => h('div', { class: 'actions' },
        action(k.is_active ? 'Disable' : 'Enable', async () => { await api.post(`/api/keys/${k.id}/toggle`); table.reload(); }),
        action('Edit', async () => edit(k)),
        action('Rotate', async () => { secretPanel(secretBox, await api.post(`/api/keys/${k.id}/rotate`), `“${k.name}” rotated`); table.reload(); },
          { confirmText: `Rotate “${k.name}”? The old secret stops working at once.` }),
        action('Delete', async () => { await api.del(`/api/keys/${k.id}`); table.reload(); },
          { danger: true, confirmText: `Delete “${k.name}”? Programs using it stop working at once.` }))],
    ],
  });
  function edit(k) {
    fill(editBox, form({
      submit: 'Save limits',
      onsubmit: async (v) => { await api.patch(`/api/keys/${k.id}`, { name: v.name, ...limits(v) }); fill(editBox); table.reload(); },
      cancel: () => fill(editBox),
    }, h('h2', {}, `Edit “${k.name}”`), field('Name', 'name', { required: true, maxlength: 100, value: k.name }), limitFields(k)));
    editBox.scrollIntoView({ block: 'nearest' });
  }
  main.append(h('h1', {}, 'Gateway keys'), secretBox, editBox,
    h('details', { class: 'panel', open: true }, h('summary', {}, 'Create a gateway key'),
      form({
        submit: 'Create key',
        className: '',
        onsubmit: async (v, f) => {
          const created = await api.post('/api/keys', { name: v.name, ...limits(v) });
          f.reset();
          secretPanel(secretBox, created, `Key “${created.name}” created`);
          table.reload(1);
        },
      }, field('Name', 'name', { required: true, maxlength: 100, hint: 'what it is for, e.g. “laptop”' }), limitFields())),
    h('h2', {}, 'Your keys'), table.el);
}
