// The console's entry: which page a URL shows, the navigation, the session, and signing in again
// when a session ends in the middle of something (the page stays as it was; the call is retried).
//
// A page is web/pages/<path>.js (`/keys` → pages/keys.js, `/` → pages/overview.js); it exports
// `title`, `access` ('public' | 'user' | 'admin') and `render(main, ctx)`.

import { h, fill } from './lib/dom.js';
import { api, session, setExpiredHandler } from './lib/api.js';
import { form, field, codeField } from './lib/ui.js';

const PAGES = {
  '/': 'overview',
  '/signin': 'signin',
  '/signup': 'signup',
  '/reset-password': 'reset-password',
  '/chat': 'chat',
  '/keys': 'keys',
  '/provider-keys': 'provider-keys',
  '/usage': 'usage',
  '/balance': 'balance',
  '/security': 'security',
  '/admin/users': 'admin/users',
  '/admin/catalog': 'admin/catalog',
  '/admin/usage': 'admin/usage',
  '/admin/routing': 'admin/routing',
  '/admin/settings': 'admin/settings',
  '/admin/audit': 'admin/audit',
};

const USER_NAV = [['/', 'Overview'], ['/chat', 'Chat'], ['/keys', 'Gateway keys'], ['/provider-keys', 'Provider keys'],
  ['/usage', 'Usage'], ['/balance', 'Balance'], ['/security', 'Security']];
const ADMIN_NAV = [['/admin/users', 'Users'], ['/admin/catalog', 'Catalog'], ['/admin/usage', 'Reports'],
  ['/admin/routing', 'Routing'], ['/admin/settings', 'Settings'], ['/admin/audit', 'Audit log']];

const main = document.getElementById('main');

/** Goes to a console URL without reloading. */
export function go(path, { replace = false } = {}) {
  history[replace ? 'replaceState' : 'pushState'](null, '', path);
  render();
}

/** Signs out: the token is revoked on the server and forgotten here. */
async function signOut() {
  try { await api.post('/api/auth/logout', undefined, { retry: false }); } catch { /* gone already */ }
  session.clear();
  go('/signin');
}

function renderChrome(path) {
  const user = session.user;
  const nav = document.getElementById('nav');
  const link = ([href, label]) => h('a', { href, 'aria-current': href === path ? 'page' : null }, label);
  if (!user) {
    fill(nav, link(['/signin', 'Sign in']), link(['/signup', 'Sign up']));
    fill(document.getElementById('who'));
    return;
  }
  fill(nav, USER_NAV.map(link),
    user.role === 'admin' ? [h('span', { class: 'sep', 'aria-hidden': 'true' }, '|'), ADMIN_NAV.map(link)] : null);
  fill(document.getElementById('who'),
    h('span', { id: 'whoami' }, user.username),
    h('button', { type: 'button', class: 'link', id: 'sign-out', onclick: signOut }, 'Sign out'));
}

/** The stored session was found ended on this load: sign-in says so. */
let ended = false;

let rendering = 0;
async function render() {
  const ticket = ++rendering;
  const path = location.pathname.replace(/\/+$/, '') || '/';
  const name = PAGES[path];
  if (!name) { fill(main, h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '/' }, 'Back to the overview'))); return; }
  const page = await import(`./pages/${name}.js`);
  if (ticket !== rendering) return;
  if (page.access !== 'public' && !session.token) {
    go(`/signin?next=${encodeURIComponent(path)}${ended ? '&ended=1' : ''}`, { replace: true });
    ended = false;
    return;
  }
  if (page.access === 'admin' && session.user?.role !== 'admin') {
    renderChrome(path);
    fill(main, h('h1', {}, page.title), h('p', { class: 'state error' }, 'This page is for administrators.'));
    return;
  }
  renderChrome(path);
  document.title = `${page.title} · tollgate`;
  fill(main);
  await page.render(main, { go, refreshUser });
  main.focus({ preventScroll: true });
}

/** Reloads the signed-in user (balance, role) into the session and the header. */
async function refreshUser() {
  const me = await api.get('/api/me');
  session.setUser(me);
  renderChrome(location.pathname);
  return me;
}

// Same-origin links to console pages navigate in place.
document.addEventListener('click', (ev) => {
  const a = ev.target.closest('a[href]');
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || a.target || a.hasAttribute('download')) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !PAGES[url.pathname]) return;
  ev.preventDefault();
  go(url.pathname + url.search);
});
window.addEventListener('popstate', render);

// An ended session: a sign-in dialog over the page, so a half-filled form is still there after.
setExpiredHandler((message) => new Promise((resolve) => {
  const dlg = document.getElementById('reauth');
  const username = session.user?.username || '';
  const f = form({
    submit: 'Sign in',
    className: '',
    cancel: () => { dlg.close(); session.clear(); resolve(false); go(`/signin?next=${encodeURIComponent(location.pathname)}`); },
    onsubmit: async (v) => {
      const r = await api.post('/api/auth/login', { username: v.username, password: v.password, totp_code: v.totp_code }, { auth: false });
      session.set(r.access_token, r.user);
      dlg.close();
      resolve(true);
    },
  },
  field('Username', 'username', { required: true, value: username, autocomplete: 'username' }),
  field('Password', 'password', { type: 'password', required: true, autocomplete: 'current-password' }),
  codeField('Code from your authenticator app', 'totp_code'));
  fill(dlg, h('h2', { id: 'reauth-title' }, 'Sign in again'), h('p', { role: 'alert' }, message), f);
  dlg.showModal();
}));

// A stored token is checked once per load; the user (role, balance) comes with it. Only the
// server saying the token is no good (401) forgets it: a busy or unreachable server does not sign
// anyone out, and the page's own calls then show what is wrong.
(async () => {
  if (session.token) {
    try {
      const v = await api.get('/api/auth/verify', undefined, { retry: false });
      session.setUser(v.user);
    } catch (e) {
      if (e.status === 401) { session.clear(); ended = true; }
    }
  }
  render();
})();
