// Spend and requests per day, by model (overview, usage and admin reports).
import { h, fill } from './dom.js';
import { api } from './api.js';
import { stackedBars, lastDays } from './chart.js';
import { usd, int } from './format.js';
import { loading, failed, empty } from './ui.js';

const TOP = 5;

/** Charts of `days` days from `path` (/api/me/usage or /api/admin/usage), `query` narrows. */
export function usageCharts(path, query = {}, days = 30) {
  const box = h('div', { class: 'charts' }, loading('Loading charts…'));
  (async () => {
    const dayList = lastDays(days);
    const from = `${dayList[0]}T00:00:00Z`;
    const base = { ...query, from };
    const byModel = await api.get(path, { ...base, group_by: 'model' });
    if (!byModel.data.length) { fill(box, empty(`No requests in the last ${days} days.`)); return; }
    const models = [...byModel.data].sort((a, b) => b.cost_usd - a.cost_usd || b.requests - a.requests);
    const top = models.slice(0, TOP);
    const perDay = async (extra) => {
      const r = await api.get(path, { ...base, ...extra, group_by: 'day' });
      const map = new Map(r.data.map((g) => [String(g.group).slice(0, 10), g]));
      return dayList.map((d) => map.get(d) || { cost_usd: 0, requests: 0 });
    };
    const [all, ...each] = await Promise.all([perDay({}), ...top.map((m) => perDay({ model: m.group }))]);
    const series = (key) => {
      const out = top.map((m, i) => ({ name: m.group, values: each[i].map((g) => g[key]) }));
      if (models.length > TOP) {
        out.push({ name: 'other models', values: all.map((g, d) => Math.max(0, g[key] - each.reduce((a, e) => a + e[d][key], 0))) });
      }
      return out;
    };
    fill(box,
      stackedBars({ title: 'Spend per day', days: dayList, series: series('cost_usd'), format: usd }),
      stackedBars({ title: 'Requests per day', days: dayList, series: series('requests'), format: (v) => int(Math.round(v)) }));
  })().catch((e) => fill(box, failed(e)));
  return box;
}
