// How numbers, money and times are shown.

export function usd(x) {
  if (x === null || x === undefined) return '—';
  const n = Number(x);
  const abs = Math.abs(n);
  const digits = abs !== 0 && abs < 0.01 ? 6 : 2;
  return (n < 0 ? '−$' : '$') + abs.toFixed(digits);
}

export const int = (x) => (x === null || x === undefined ? '—' : Number(x).toLocaleString('en-US'));

export function when(s) {
  if (!s) return '—';
  const d = new Date(s);
  if (Number.isNaN(d.getTime())) return String(s);
  return d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

/** YYYY-MM-DD of a Date (UTC), for date inputs and day buckets. */
export const day = (d) => d.toISOString().slice(0, 10);

/** RFC 3339 from a date input's value (start of that UTC day), or undefined. */
export const dayStart = (v) => (v ? `${v}T00:00:00Z` : undefined);
/** RFC 3339 of the end of a date input's day (exclusive next midnight). */
export function dayEnd(v) {
  if (!v) return undefined;
  const d = new Date(`${v}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + 1);
  return d.toISOString().replace('.000Z', 'Z');
}
