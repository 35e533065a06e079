// /admin/users: search, page, create, disable/enable, reset password or TOTP, grant credit.
import { h, fill } from '../../lib/dom.js';
import { api } from '../../lib/api.js';
import { usd, when } from '../../lib/format.js';
import { form, field, pagedTable, action, enrolment } from '../../lib/ui.js';

export const title = 'Users';
export const access = 'admin';

export function render(main) {
  let filters = {};
  const panel = h('div', { id: 'user-panel' });
  const close = () => fill(panel);
  const users = pagedTable({
    label: 'Users',
    emptyText: 'No user matches.',
    load: (page) => api.get('/api/admin/users', { ...filters, page, per_page: 20 }),
    columns: [
      ['User', (u) => h('span', {}, h('strong', { class: 'username' }, u.username), u.email ? h('div', { class: 'k' }, u.email) : null)],
      ['Role', (u) => u.role],
      ['Status', (u) => h('span', { class: `badge ${u.status === 'active' ? 'on' : u.status === 'disabled' ? 'bad' : 'off'}` }, u.status)],
      ['Balance', (u) => usd(u.balance_usd), { num: true }],
      ['Last sign-in', (u) => when(u.last_login_at), { narrow: true }],
      ['', (u) => h('div', { class: 'actions' },
        action('Grant credit', async () => credit(u)),
        u.status === 'disabled'
          ? action('Enable', async () => { await api.patch(`/api/admin/users/${u.id}`, { status: 'active' }); users.reload(); })
          : action('Disable', async () => { await api.del(`/api/admin/users/${u.id}`); users.reload(); },
            { danger: true, confirmText: `Disable ${u.username}? Their sessions and gateway keys stop working at once.` }),
        action('Reset password', async () => resetPassword(u)),
        action('Reset TOTP', async () => {
          const t = await api.post(`/api/admin/users/${u.id}/reset-totp`);
          fill(panel, h('section', { class: 'panel' }, h('h2', {}, `New TOTP secret for ${u.username}`),
            h('p', {}, 'Give this to the user; their account is pending until they confirm a code from it at sign-in.'), enrolment(t),
            h('button', { type: 'button', onclick: close }, 'Done')));
          users.reload();
        }, { confirmText: `Reset ${u.username}’s authenticator? They cannot sign in until they enrol the new secret.` }))],
    ],
  });
  function credit(u) {
    fill(panel, form({
      submit: 'Grant',
      cancel: close,
      onsubmit: async (v) => {
        await api.post(`/api/admin/users/${u.id}/balance`, { amount_usd: v.amount_usd, note: v.note });
        fill(panel, h('p', { class: 'notice', role: 'status' }, `Balance of ${u.username} changed by ${usd(v.amount_usd)}.`));
        users.reload();
      },
    }, h('h2', {}, `Credit for ${u.username}`),
    field('Amount (USD)', 'amount_usd', { type: 'number', step: 'any', required: true, hint: 'negative to debit' }),
    field('Note', 'note', { required: true, maxlength: 500, value: 'credit' })));
    panel.querySelector('input').focus();
  }
  function resetPassword(u) {
    fill(panel, form({
      submit: 'Set password', cancel: close,
      onsubmit: async (v) => { await api.post(`/api/admin/users/${u.id}/reset-password`, v); fill(panel, h('p', { class: 'notice', role: 'status' }, `Password of ${u.username} replaced.`)); },
    }, h('h2', {}, `New password for ${u.username}`),
    field('New password', 'new_password', { type: 'password', required: true, minlength: 8, maxlength: 128, autocomplete: 'new-password' })));
    panel.querySelector('input').focus();
  }
  const search = h('form', { class: 'panel row', role: 'search' },
    field('Search', 'search', { placeholder: 'username or email' }),
    field('Role', 'role', { type: 'select', options: [['', 'any'], ['user', 'user'], ['admin', 'admin']] }),
    field('Status', 'status', { type: 'select', options: [['', 'any'], ['active', 'active'], ['pending_totp', 'pending TOTP'], ['disabled', 'disabled']] }),
    h('button', { type: 'submit', class: 'primary' }, 'Search'));
  search.addEventListener('submit', (ev) => {
    ev.preventDefault();
    filters = Object.fromEntries(new FormData(search));
    users.reload(1);
  });
  const create = h('details', { class: 'panel' }, h('summary', {}, 'Create a user'),
    form({
      submit: 'Create user', className: '',
      onsubmit: async (v, f) => {
        const body = { username: v.username, password: v.password, role: v.role };
        if (v.email) body.email = v.email;
        const r = await api.post('/api/admin/users', body);
        f.reset();
        fill(panel, h('section', { class: 'panel' }, h('h2', {}, `${r.user.username} created`),
          h('p', {}, 'They confirm a code from this secret at their first sign-in.'), enrolment(r.totp), h('button', { type: 'button', onclick: close }, 'Done')));
        users.reload(1);
      },
    },
    h('div', { class: 'row' },
      field('Username', 'username', { required: true, minlength: 3, maxlength: 32, pattern: '[A-Za-z0-9_.\\-]+' }),
      field('Password', 'password', { type: 'password', required: true, minlength: 8, maxlength: 128, autocomplete: 'new-password' }),
      field('Email', 'email', { type: 'email' }),
      field('Role', 'role', { type: 'select', options: [['user', 'user'], ['admin', 'admin']] }))));
  main.append(h('h1', {}, 'Users'), search, panel, users.el, create);
}
