// /: balance, the last 30 days in charts, and the first steps for a new account.
import { h, fill } from '../lib/dom.js';
import { api } from '../lib/api.js';
import { usd, int } from '../lib/format.js';
import { loading, failed } from '../lib/ui.js';
import { usageCharts } from '../lib/usage.js';

export const title = 'Overview';
export const access = 'user';

export async function render(main, { refreshUser }) {
  const welcome = new URLSearchParams(location.search).has('welcome');
  const cards = h('div', { class: 'cards' }, loading());
  const steps = h('div');
  main.append(h('h1', {}, welcome ? 'Welcome to tollgate' : 'Overview'), steps, cards,
    h('h2', {}, 'Last 30 days'), usageCharts('/api/me/usage'));
  try {
    const [me, balance, usage, pkeys, gkeys] = await Promise.all([
      refreshUser(), api.get('/api/me/balance'), api.get('/api/me/usage', { from: new Date(Date.now() - 30 * 864e5).toISOString() }),
      api.get('/api/provider-keys', { per_page: 1 }), api.get('/api/keys', { per_page: 1 })]);
    const t = usage.totals;
    fill(cards,
      card('Balance', usd(balance.balance_usd)),
      card('Spent, 30 days', usd(balance.spent_usd_30d)),
      card('Requests, 30 days', int(t.requests)),
      card('Tokens, 30 days', int(t.prompt_tokens + t.completion_tokens)),
      card('Plan', me.plan || 'none'));
    const count = (r) => r.total ?? r.data?.length ?? 0;
    const done = [count(pkeys) > 0, count(gkeys) > 0, t.requests > 0];
    if (!done.every(Boolean)) {
      fill(steps, h('section', { class: 'panel', 'aria-labelledby': 'start' },
        h('h2', { id: 'start' }, 'Get started'),
        h('ol', { class: 'steps' },
          h('li', { class: done[0] ? 'done' : null }, h('a', { href: '/provider-keys' }, 'Add your provider key'), ' — your own key for OpenAI, DeepSeek, … (stored encrypted).'),
          h('li', { class: done[1] ? 'done' : null }, h('a', { href: '/keys' }, 'Create a gateway key'), ' — what your programs send instead of the provider key.'),
          h('li', { class: done[2] ? 'done' : null }, 'Call ', h('code', {}, `${location.origin}/v1`), ' with any OpenAI SDK, or ', h('a', { href: '/chat' }, 'chat here'), '.')),
        h('pre', {}, h('code', {}, `curl ${location.origin}/v1/chat/completions \\\n  -H "authorization: Bearer $GATEWAY_KEY" -H 'content-type: application/json' \\\n  -d '{"model": "MODEL", "messages": [{"role": "user", "content": "Hello"}]}'`)),
        h('p', {}, 'Models you can use: ', h('a', { href: '/chat' }, 'see the model picker in Chat'), ' or ', h('code', {}, 'GET /v1/models'), '.')));
    }
  } catch (e) {
    fill(cards, failed(e));
  }
}

const card = (k, v) => h('div', { class: 'card' }, h('div', { class: 'k' }, k), h('div', { class: 'v' }, v));
