// /signin: username, password and the current TOTP code.
import { h } from '../lib/dom.js';
import { api, session } from '../lib/api.js';
import { form, field, codeField } from '../lib/ui.js';

export const title = 'Sign in';
export const access = 'public';

export function render(main, { go }) {
  const next = new URLSearchParams(location.search).get('next');
  const target = next && next.startsWith('/') && !next.startsWith('//') ? next : '/';
  const ended = new URLSearchParams(location.search).has('ended');
  main.append(h('div', { class: 'narrow' },
    h('h1', {}, 'Sign in'),
    ended ? h('p', { class: 'notice', role: 'alert' }, 'Your session ended (it expired or you signed out elsewhere). Sign in again to continue.') : null,
    form({
      submit: 'Sign in',
      onsubmit: async (v) => {
        const r = await api.post('/api/auth/login', v, { auth: false });
        session.set(r.access_token, r.user);
        go(target, { replace: true });
      },
    },
    field('Username', 'username', { required: true, autocomplete: 'username', autofocus: true }),
    field('Password', 'password', { type: 'password', required: true, autocomplete: 'current-password' }),
    codeField('Code from your authenticator app', 'totp_code')),
    h('p', {}, 'New here? ', h('a', { href: '/signup' }, 'Create an account'), '. Lost your password? ',
      h('a', { href: '/reset-password' }, 'Reset it with your authenticator'), '. Given an account by an administrator? ',
      h('a', { href: '/signup?confirm=1' }, 'Confirm it first'), '.')));
}
