// /signup: create the account, enrol TOTP (QR code), confirm the first code — which signs in.
import { h, fill } from '../lib/dom.js';
import { api, session } from '../lib/api.js';
import { form, field, codeField, enrolment } from '../lib/ui.js';

export const title = 'Sign up';
export const access = 'public';

export function render(main, { go }) {
  const box = h('div', { class: 'narrow' });
  main.append(box);
  if (new URLSearchParams(location.search).has('confirm')) {
    pendingStep(box, go);
    return;
  }
  fill(box,
    h('h1', {}, 'Create an account'),
    form({
      submit: 'Create account',
      onsubmit: async (v) => {
        const body = { username: v.username, password: v.password };
        if (v.email) body.email = v.email;
        const r = await api.post('/api/auth/register', body, { auth: false });
        confirmStep(box, v.username, v.password, r.totp, go);
      },
    },
    field('Username', 'username', { required: true, minlength: 3, maxlength: 32, pattern: '[A-Za-z0-9_.\\-]+', autocomplete: 'username', hint: '3–32 letters, digits, _ . -', autofocus: true }),
    field('Password', 'password', { type: 'password', required: true, minlength: 8, maxlength: 128, autocomplete: 'new-password', hint: 'at least 8 characters' }),
    field('Email', 'email', { type: 'email', autocomplete: 'email', hint: 'optional' })),
    h('p', {}, 'Have an account? ', h('a', { href: '/signin' }, 'Sign in'), '.'));
}

function confirmStep(box, username, password, totp, go) {
  fill(box,
    h('h1', {}, 'Set up your authenticator'),
    h('p', { class: 'notice' }, 'Every tollgate account signs in with a password and a six-digit code. This secret is shown only now.'),
    enrolment(totp),
    form({
      submit: 'Confirm and sign in',
      onsubmit: async (v) => {
        const r = await api.post('/api/auth/totp/confirm', { username, password, code: v.code }, { auth: false });
        session.set(r.access_token, r.user);
        go('/?welcome=1', { replace: true });
      },
    }, codeField('Enter the code your app shows now')));
}

/** An account an administrator created (or whose TOTP was reset): confirm the first code. */
function pendingStep(box, go) {
  fill(box,
    h('h1', {}, 'Finish setting up your account'),
    h('p', {}, 'Add the secret your administrator gave you to an authenticator app, then confirm its current code.'),
    form({
      submit: 'Confirm and sign in',
      onsubmit: async (v) => {
        const r = await api.post('/api/auth/totp/confirm', v, { auth: false });
        session.set(r.access_token, r.user);
        go('/?welcome=1', { replace: true });
      },
    },
    field('Username', 'username', { required: true, autocomplete: 'username' }),
    field('Password', 'password', { type: 'password', required: true, autocomplete: 'current-password' }),
    codeField('Code from your authenticator app')));
}
