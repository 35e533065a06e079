// /reset-password: a new password, proved by a current TOTP code.
import { h, fill } from '../lib/dom.js';
import { api } from '../lib/api.js';
import { form, field, codeField } from '../lib/ui.js';

export const title = 'Reset password';
export const access = 'public';

export function render(main) {
  const box = h('div', { class: 'narrow' });
  main.append(box);
  fill(box,
    h('h1', {}, 'Reset your password'),
    h('p', {}, 'Your authenticator app proves it is you. Every session of the account is signed out.'),
    form({
      submit: 'Set new password',
      onsubmit: async (v) => {
        await api.post('/api/auth/password/reset', v, { auth: false });
        fill(box, h('h1', {}, 'Password changed'), h('p', { role: 'status' }, 'Sign in with the new password. ', h('a', { href: '/signin' }, 'Sign in')));
      },
    },
    field('Username', 'username', { required: true, autocomplete: 'username' }),
    codeField('Code from your authenticator app', 'totp_code'),
    field('New password', 'new_password', { type: 'password', required: true, minlength: 8, maxlength: 128, autocomplete: 'new-password' })),
    h('p', {}, h('a', { href: '/signin' }, 'Back to sign in')));
}
