// /security: email, password, TOTP rotation, login history, IP records, audit log.
import { h, fill } from '../lib/dom.js';
import { api, session } from '../lib/api.js';
import { when } from '../lib/format.js';
import { form, field, codeField, pagedTable, enrolment } from '../lib/ui.js';

export const title = 'Security';
export const access = 'user';

export function render(main) {
  const me = session.user || {};
  const totpBox = h('div');
  const saved = (f, what) => { f.querySelector('.form-error').textContent = ''; f.reset(); f.append(h('p', { role: 'status', class: 'state' }, what)); };

  const history = pagedTable({
    label: 'Sign-in history', emptyText: 'No sign-ins recorded.',
    load: (page) => api.get('/api/me/login-history', { page, per_page: 10 }),
    columns: [['When', (e) => when(e.at)], ['Result', (e) => h('span', { class: `badge ${e.success ? 'on' : 'bad'}` }, e.success ? 'signed in' : (e.reason || 'failed'))],
      ['Address', (e) => e.ip || '—'], ['Browser', (e) => e.user_agent || '—', { narrow: true }]],
  });
  const ips = pagedTable({
    label: 'Addresses', emptyText: 'No addresses recorded.',
    load: (page) => api.get('/api/me/ip-records', { page, per_page: 10 }),
    columns: [['Address', (r) => r.ip], ['First seen', (r) => when(r.first_seen)], ['Last seen', (r) => when(r.last_seen)], ['Sign-ins', (r) => String(r.count), { num: true }]],
  });
  let action = '';
  const audit = pagedTable({
    label: 'Audit log', emptyText: 'No entries.',
    load: (page) => api.get('/api/me/audit-log', { page, per_page: 10, action }),
    columns: [['When', (e) => when(e.at)], ['Action', (e) => e.action], ['Target', (e) => e.target || '—', { narrow: true }], ['Address', (e) => e.ip || '—']],
  });
  const auditFilter = h('form', { class: 'row', role: 'search' }, field('Action', 'action', { placeholder: 'e.g. login, key.create' }),
    h('button', { type: 'submit' }, 'Filter'));
  auditFilter.addEventListener('submit', (ev) => { ev.preventDefault(); action = auditFilter.elements.action.value.trim(); audit.reload(1); });

  main.append(h('h1', {}, 'Security'),
    h('div', { class: 'charts' },
      form({ submit: 'Save email', onsubmit: async (v, f) => { const u = await api.patch('/api/me', { email: v.email || null }); session.setUser(u); saved(f, 'Email saved.'); f.elements.email.value = u.email || ''; } },
        h('h2', {}, 'Email'), field('Email', 'email', { type: 'email', value: me.email || '', autocomplete: 'email' })),
      form({
        submit: 'Change password',
        onsubmit: async (v, f) => { await api.post('/api/me/password', v); saved(f, 'Password changed. Your other sessions were signed out.'); },
      }, h('h2', {}, 'Password'),
      field('Current password', 'current_password', { type: 'password', required: true, autocomplete: 'current-password' }),
      field('New password', 'new_password', { type: 'password', required: true, minlength: 8, maxlength: 128, autocomplete: 'new-password' })),
      h('div', {}, totpBox)),
    h('h2', {}, 'Sign-in history'), history.el,
    h('h2', {}, 'Addresses you signed in from'), ips.el,
    h('h2', {}, 'Audit log'), auditFilter, audit.el);

  const rotateForm = () => fill(totpBox, form({
    submit: 'Start TOTP rotation',
    onsubmit: async (v) => {
      const t = await api.post('/api/me/totp/rotate', v);
      fill(totpBox, h('section', { class: 'panel' }, h('h2', {}, 'New authenticator secret'), enrolment(t),
        form({ submit: 'Confirm new secret', className: '', onsubmit: async (c) => {
          await api.post('/api/me/totp/confirm', c);
          fill(totpBox, h('p', { class: 'panel', role: 'status' }, 'Your new TOTP secret is active; the old one no longer works. ', h('button', { type: 'button', class: 'link', onclick: rotateForm }, 'Rotate again')));
        }, cancel: rotateForm }, codeField('Code from the new secret'))));
    },
  }, h('h2', {}, 'Authenticator (TOTP)'), h('p', {}, 'Move your second factor to a new secret; the old one works until you confirm the new one.'),
  field('Password', 'password', { type: 'password', required: true, autocomplete: 'current-password' }),
  codeField('Code from your current app', 'totp_code')));
  rotateForm();
}
