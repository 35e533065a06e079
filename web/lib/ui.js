// The pieces every page is made of: labelled fields, forms that validate before sending and show
// the API's error next to the field it names, lists with loading/empty/error states and pages.

import { h, fill, uid } from './dom.js';
import { ApiError } from './api.js';

/**
 * A labelled input. `opts`: type, required, placeholder, min, max, step, minlength, maxlength,
 * pattern, value, hint, options (for select: [[value, label]]), rows (textarea), autocomplete.
 */
export function field(label, name, opts = {}) {
  const id = uid(name);
  const errId = `${id}-err`;
  const { hint, options, rows, type = 'text', ...attrs } = opts;
  let input;
  const common = { id, name, 'aria-describedby': errId, ...attrs };
  if (type === 'select') {
    input = h('select', common, (options || []).map(([v, l]) =>
      h('option', { value: v, selected: String(v) === String(opts.value ?? '') }, l)));
  } else if (type === 'textarea') {
    input = h('textarea', { ...common, rows: rows || 3 });
  } else if (type === 'checkbox') {
    input = h('input', { ...common, type, checked: opts.value, value: undefined });
    return h('div', { class: 'fieldset' },
      h('label', { class: 'check', for: id }, input, label),
      h('p', { class: 'field-error', id: errId, 'aria-live': 'polite' }));
  } else {
    input = h('input', { ...common, type });
  }
  return h('div', { class: 'fieldset' },
    h('label', { for: id }, label, hint ? h('span', { class: 'hint' }, ` ${hint}`) : null),
    input,
    h('p', { class: 'field-error', id: errId, 'aria-live': 'polite' }));
}

/** The values of a form's named fields: numbers for number inputs, booleans for checkboxes. */
export function values(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    if (el.type === 'checkbox') out[el.name] = el.checked;
    else if (el.type === 'number') out[el.name] = el.value === '' ? null : Number(el.value);
    else out[el.name] = el.value.trim();
  }
  return out;
}

function clearErrors(form) {
  for (const p of form.querySelectorAll('.field-error, .form-error')) p.textContent = '';
  for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
}

/** Shows `message` next to the field named `param` (or at the form's foot). */
export function showError(form, message, param) {
  const el = param && form.querySelector(`[name="${CSS.escape(param)}"]`);
  const slot = el && form.querySelector(`#${CSS.escape(el.getAttribute('aria-describedby') || '')}`);
  if (el && slot) {
    el.setAttribute('aria-invalid', 'true');
    slot.textContent = message;
    el.focus();
  } else {
    form.querySelector('.form-error').textContent = message;
  }
}

/**
 * A form: `children` are fields; `onsubmit(values, form)` may throw an ApiError, shown in words
 * next to the field it names. The browser's own validation (required, minlength, pattern, …) runs
 * first, and its message is shown the same way; nothing is sent while a field is invalid.
 */
export function form({ submit = 'Save', className = 'panel', onsubmit, cancel }, ...children) {
  const button = h('button', { type: 'submit', class: 'primary' }, submit);
  const el = h('form', { class: className, novalidate: true },
    children,
    h('p', { class: 'form-error', role: 'alert' }),
    h('div', { class: 'actions' }, button,
      cancel ? h('button', { type: 'button', onclick: cancel }, 'Cancel') : null));
  el.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearErrors(el);
    const bad = [...el.elements].find((f) => f.willValidate && !f.checkValidity());
    if (bad) {
      showError(el, bad.validationMessage, bad.name);
      return;
    }
    button.disabled = true;
    try {
      await onsubmit(values(el), el);
    } catch (e) {
      if (!(e instanceof ApiError)) console.error(e);
      showError(el, e.message || String(e), e.param);
    } finally {
      button.disabled = false;
    }
  });
  return el;
}

export const loading = (what = 'Loading…') => h('p', { class: 'state loading', role: 'status' }, what);
export const empty = (what) => h('p', { class: 'state empty' }, what);
export const failed = (e) => h('p', { class: 'state error', role: 'alert' }, e.message || String(e));

/** Runs `load()` into `box`, with a loading state first and the error in words on failure. */
export async function into(box, load) {
  fill(box, loading());
  try {
    fill(box, await load());
  } catch (e) {
    fill(box, failed(e));
  }
}

/**
 * A paginated table. `load(page)` → the API's `{data, page, per_page, total}`; `columns` are
 * `[header, row => cell, {num: true}?]`. Returns `{el, reload(page?)}`.
 */
export function pagedTable({ columns, load, emptyText = 'Nothing here yet.', label }) {
  const el = h('div', { class: 'paged' });
  let page = 1;
  async function reload(p = page) {
    page = p;
    fill(el, loading());
    let r;
    try {
      r = await load(page);
    } catch (e) {
      fill(el, failed(e));
      return;
    }
    const pages = Math.max(1, Math.ceil((r.total ?? r.data.length) / (r.per_page || 20)));
    if (!r.data.length && page > 1) return reload(pages === page ? 1 : pages);
    if (!r.data.length) { fill(el, empty(emptyText)); return; }
    fill(el,
      table(columns, r.data, label),
      pages > 1 || page > 1
        ? h('nav', { class: 'pager', 'aria-label': `${label || 'List'} pages` },
          h('button', { type: 'button', disabled: page <= 1, onclick: () => reload(page - 1) }, '← Newer'),
          h('span', {}, `Page ${page} of ${pages} · ${r.total} in all`),
          h('button', { type: 'button', disabled: page >= pages, onclick: () => reload(page + 1) }, 'Older →'))
        : null);
  }
  reload(1);
  return { el, reload };
}

/** A plain table of rows. */
export function table(columns, rows, label) {
  return h('div', { class: 'table-wrap' },
    h('table', { 'aria-label': label || null },
      h('thead', {}, h('tr', {}, columns.map(([head, , o]) =>
        h('th', { scope: 'col', class: [o?.num ? 'num' : '', o?.narrow ? 'hide-narrow' : ''].join(' ').trim() || null }, head)))),
      h('tbody', {}, rows.map((row) => h('tr', {}, columns.map(([, cell, o]) =>
        h('td', { class: [o?.num ? 'num' : '', o?.narrow ? 'hide-narrow' : ''].join(' ').trim() || null }, cell(row))))))));
}

export const badge = (on, yes = 'active', no = 'disabled') =>
  h('span', { class: `badge ${on ? 'on' : 'off'}` }, on ? yes : no);

/** A button that copies `text` and says so. */
export function copyButton(text, label = 'Copy') {
  const b = h('button', { type: 'button', class: 'copy' }, label);
  b.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(text);
      b.textContent = 'Copied';
    } catch {
      b.textContent = 'Select and copy by hand';
    }
    setTimeout(() => { b.textContent = label; }, 2500);
  });
  return b;
}

/** A button that runs an action, disabled while it runs; errors go to `onerror` or an alert. */
export function action(label, run, { danger = false, confirmText, onerror } = {}) {
  const b = h('button', { type: 'button', class: danger ? 'danger' : null }, label);
  b.addEventListener('click', async () => {
    if (confirmText && !window.confirm(confirmText)) return;
    b.disabled = true;
    try { await run(); } catch (e) { (onerror || ((x) => window.alert(x.message || String(x))))(e); }
    finally { b.disabled = false; }
  });
  return b;
}

/** Saves `text` as a file the browser downloads. */
export function download(name, text, type = 'text/csv') {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h('a', { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** CSV of rows; cells that a spreadsheet would run as a formula are prefixed with `'`. */
export function csv(columns, rows) {
  const cell = (v) => {
    let s = v === null || v === undefined ? '' : String(v);
    if (/^[=+\-@\t\r]/.test(s) && !/^-?\d/.test(s)) s = `'${s}`;
    return /[",\n\r]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
  };
  return [columns.map(([name]) => cell(name)).join(','),
    ...rows.map((r) => columns.map(([, get]) => cell(get(r))).join(','))].join('\r\n') + '\r\n';
}

/** The TOTP enrolment: the QR code from `qr_png_base64`, and the secret to type in by hand. */
export function enrolment(totp) {
  return h('div', { class: 'enrolment' },
    h('p', {}, 'Scan this QR code with an authenticator app (any TOTP app: Google Authenticator, 1Password, Aegis, …), or type in the secret below.'),
    h('img', { class: 'qr', alt: 'QR code of your TOTP secret', src: `data:image/png;base64,${totp.qr_png_base64}` }),
    h('p', { class: 'secret' }, 'Secret: ', h('code', { id: 'totp-secret' }, totp.secret), copyButton(totp.secret)));
}

/** Six-digit code field. */
export const codeField = (label = 'Code from your authenticator app', name = 'code') =>
  field(label, name, { required: true, inputmode: 'numeric', pattern: '[0-9]{6}', maxlength: 6, autocomplete: 'one-time-code', title: 'six digits' });
