// Building the page without HTML strings: every text goes in as a text node, so nothing a user,
// an administrator or a model wrote can become markup (the only HTML comes from lib/markdown.js,
// sanitized). Trusted Types in the content-security-policy make any assignment of an HTML string throw.

/** h('button', {class: 'primary', onclick: fn}, 'Save') → an element. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

/** Appends children: nodes, strings (as text), arrays, skipping null/false. */
export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's content. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let seq = 0;
/** A fresh id for label/field and aria pairs. */
export const uid = (p = 'f') => `${p}-${++seq}`;
