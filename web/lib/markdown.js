// Model output → sanitized DOM. marked turns Markdown into an HTML string; DOMPurify parses it
// (through its own Trusted Types policy, the only one the content-security-policy allows) and
// returns a DocumentFragment with scripts, event handlers, styles, forms and frames removed. The
// string is never assigned to the page as markup.
import { Marked } from '../vendor/marked/marked.esm.js';
import DOMPurify from '../vendor/dompurify/purify.es.mjs';

const parser = new Marked({ gfm: true, breaks: true, async: false });

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

const CONFIG = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select', 'iframe', 'object', 'embed', 'svg', 'math'],
  FORBID_ATTR: ['style', 'class', 'id'],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#|\/(?!\/))/i,
};

/** A DocumentFragment safe to append. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(parser.parse(String(text ?? '')), CONFIG);
}
