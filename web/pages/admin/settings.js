// /admin/settings: runtime settings stored in the database.
import { h, fill } from '../../lib/dom.js';
import { api } from '../../lib/api.js';
import { form, field, loading, failed, empty } from '../../lib/ui.js';

export const title = 'Settings';
export const access = 'admin';

export async function render(main) {
  const box = h('div', {}, loading());
  main.append(h('h1', {}, 'Settings'), h('p', {}, 'Changes take effect at once on every replica. Values are JSON.'), box);
  try {
    const r = await api.get('/api/admin/settings');
    const list = r.data || r;
    if (!list.length) { fill(box, empty('No settings.')); return; }
    fill(box, list.map((s) => form({
      submit: 'Save',
      onsubmit: async (v, f) => {
        let value;
        try { value = JSON.parse(v.value); } catch { throw Object.assign(new Error('Not valid JSON (a string needs quotes: "open").'), { param: 'value' }); }
        const saved = await api.put(`/api/admin/settings/${encodeURIComponent(s.key)}`, { value });
        f.elements.value.value = JSON.stringify(saved.value ?? value);
        f.querySelector('.form-error').textContent = 'Saved.';
      },
    }, h('h2', {}, h('code', {}, s.key)), s.description ? h('p', {}, s.description) : null,
    field('Value', 'value', { required: true, value: JSON.stringify(s.value), class: 'mono' }))));
  } catch (e) {
    fill(box, failed(e));
  }
}
