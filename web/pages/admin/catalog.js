// /admin/catalog: providers and models — create, edit prices, toggle, order.
import { h, fill } from '../../lib/dom.js';
import { api } from '../../lib/api.js';
import { usd } from '../../lib/format.js';
import { form, field, table, badge, action, loading, failed, empty } from '../../lib/ui.js';

export const title = 'Catalog';
export const access = 'admin';

const TYPES = ['chat', 'completion', 'embedding', 'image', 'audio', 'moderation', 'realtime'];
const KINDS = ['openai', 'anthropic', 'gemini', 'azure', 'bedrock'];
const PRICES = [
  ['input_price_per_1m', 'Input, per 1M tokens'], ['output_price_per_1m', 'Output, per 1M tokens'],
  ['cached_input_price_per_1m', 'Cached input, per 1M tokens'],
];

export function render(main) {
  const providersBox = h('div', {}, loading());
  const modelsBox = h('div', {}, loading());
  const panel = h('div', { id: 'catalog-panel' });
  const close = () => fill(panel);
  let providers = [];

  async function loadProviders() {
    const r = await api.get('/api/providers', { include_inactive: true });
    providers = r.data || r;
    fill(providersBox, providers.length ? table([
      ['Key', (p) => h('code', {}, p.key)], ['Name', (p) => p.display_name], ['Kind', (p) => p.kind],
      ['Base URL', (p) => p.base_url, { narrow: true }], ['Status', (p) => badge(p.is_active)],
      ['', (p) => h('div', { class: 'actions' },
        action(p.is_active ? 'Disable' : 'Enable', async () => { await api.patch(`/api/admin/providers/${p.key}`, { is_active: !p.is_active }); await loadProviders(); }),
        action('Edit', async () => providerForm(p)))],
    ], providers, 'Providers') : empty('No providers yet.'));
  }
  function providerForm(p) {
    fill(panel, form({
      submit: p ? 'Save provider' : 'Create provider', cancel: close,
      onsubmit: async (v) => {
        const body = { display_name: v.display_name || undefined, base_url: v.base_url || undefined, kind: v.kind, sort_order: v.sort_order ?? undefined };
        if (p) await api.patch(`/api/admin/providers/${p.key}`, body);
        else await api.post('/api/admin/providers', { key: v.key, ...body });
        close();
        await loadProviders();
      },
    }, h('h2', {}, p ? `Provider ${p.key}` : 'New provider'),
    h('div', { class: 'row' },
      p ? null : field('Key', 'key', { required: true, pattern: '[a-z0-9_\\-]+', maxlength: 64, hint: 'a-z 0-9 _ -' }),
      field('Display name', 'display_name', { value: p?.display_name || '' }),
      field('Kind', 'kind', { type: 'select', options: KINDS.map((k) => [k, k]), value: p?.kind || 'openai' })),
    field('Base URL', 'base_url', { type: 'url', value: p?.base_url || '', hint: 'ends at the API version path, e.g. https://api.openai.com/v1' }),
    field('Order', 'sort_order', { type: 'number', step: 1, value: p?.sort_order ?? '' })));
    panel.querySelector('input').focus();
  }

  async function loadModels() {
    const r = await api.get('/api/models', { active_only: false });
    const models = (r.data || r).sort((a, b) => a.sort_order - b.sort_order);
    const move = async (i, d) => {
      const j = i + d;
      if (j < 0 || j >= models.length) return;
      [models[i], models[j]] = [models[j], models[i]];
      await api.post('/api/admin/models/reorder', models.map((m, k) => ({ id: m.id, sort_order: k })));
      await loadModels();
    };
    fill(modelsBox, models.length ? table([
      ['Name', (m) => h('span', {}, h('strong', {}, m.name), m.upstream_model !== m.name ? h('div', { class: 'k' }, `→ ${m.upstream_model}`) : null)],
      ['Type', (m) => m.type], ['Provider', (m) => m.provider],
      ['Input / output per 1M', (m) => `${usd(m.input_price_per_1m)} / ${usd(m.output_price_per_1m)}`, { num: true }],
      ['Status', (m) => badge(m.is_active)],
      ['', (m) => {
        const i = models.indexOf(m);
        return h('div', { class: 'actions' },
          action('↑', () => move(i, -1)), action('↓', () => move(i, 1)),
          action(m.is_active ? 'Disable' : 'Enable', async () => { await api.post(`/api/admin/models/${m.id}/toggle`); await loadModels(); }),
          action('Edit', async () => modelForm(m)),
          action('Delete', async () => { await api.del(`/api/admin/models/${m.id}`); await loadModels(); }, { danger: true, confirmText: `Delete ${m.name}?` }));
      }],
    ], models, 'Models') : empty('No models yet. Create one so users can call it.'));
  }
  function modelForm(m) {
    const num = (x) => (x === null || x === undefined ? '' : x);
    fill(panel, form({
      submit: m ? 'Save model' : 'Create model', cancel: close,
      onsubmit: async (v) => {
        const body = {
          name: v.name, display_name: v.display_name || undefined, provider: v.provider, upstream_model: v.upstream_model || undefined,
          type: v.type, input_price_per_1m: v.input_price_per_1m ?? 0, output_price_per_1m: v.output_price_per_1m ?? 0,
          cached_input_price_per_1m: v.cached_input_price_per_1m, context_window: v.context_window, max_output_tokens: v.max_output_tokens,
          description: v.description || null,
        };
        if (m) await api.patch(`/api/admin/models/${m.id}`, body);
        else await api.post('/api/admin/models', body);
        close();
        await loadModels();
      },
    }, h('h2', {}, m ? `Model ${m.name}` : 'New model'),
    h('div', { class: 'row' },
      field('Name', 'name', { required: true, maxlength: 128, value: m?.name || '', hint: 'what clients send as model' }),
      field('Display name', 'display_name', { value: m?.display_name || '' }),
      field('Type', 'type', { type: 'select', options: TYPES.map((t) => [t, t]), value: m?.type || 'chat' })),
    h('div', { class: 'row' },
      field('Provider', 'provider', { type: 'select', required: true, options: providers.map((p) => [p.key, p.display_name]), value: m?.provider || '' }),
      field('Upstream model', 'upstream_model', { value: m?.upstream_model || '', hint: 'default: the name' })),
    h('div', { class: 'row' }, PRICES.map(([k, label]) => field(label, k, { type: 'number', min: 0, max: 1000000, step: 'any', value: num(m?.[k]), required: k !== 'cached_input_price_per_1m' }))),
    h('div', { class: 'row' },
      field('Context window', 'context_window', { type: 'number', min: 1, step: 1, value: num(m?.context_window) }),
      field('Max output tokens', 'max_output_tokens', { type: 'number', min: 1, step: 1, value: num(m?.max_output_tokens) })),
    field('Description', 'description', { value: m?.description || '' })));
    panel.querySelector('input').focus();
  }

  main.append(h('h1', {}, 'Catalog'), panel,
    h('h2', {}, 'Providers'), h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => providerForm(null) }, 'New provider')), providersBox,
    h('h2', {}, 'Models'), h('div', { class: 'actions' }, h('button', { type: 'button', id: 'new-model', onclick: () => modelForm(null) }, 'New model')), modelsBox);
  loadProviders().catch((e) => fill(providersBox, failed(e)));
  loadModels().catch((e) => fill(modelsBox, failed(e)));
}
