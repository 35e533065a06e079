// /chat: talk to the catalog's chat models with your own provider keys (§12). Answers stream in
// as they arrive (POST /api/chat/stream, read with fetch as server-sent events) and are rendered
// as sanitized Markdown; a stream that fails keeps what arrived and says why. Conversations can be
// searched, renamed, deleted, shared (read-only link) and exported. `/chat?c=<id>` opens one.
import { h, fill } from '../lib/dom.js';
import { api, request, ApiError } from '../lib/api.js';
import { when } from '../lib/format.js';
import { field, form, loading, failed, empty, action, copyButton, download } from '../lib/ui.js';
import { renderMarkdown } from '../lib/markdown.js';

export const title = 'Chat';
export const access = 'user';

/** Most bytes of one event kept while waiting for its end (the server's answers are far smaller). */
const MAX_EVENT_CHARS = 4 * 1024 * 1024;

/** Reads an SSE response, calling `on(event)` for every `data:` JSON event, as each arrives. */
async function readEvents(resp, on) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (data && data !== '[DONE]') on(JSON.parse(data));
    }
    if (buf.length > MAX_EVENT_CHARS) {
      reader.cancel();
      throw new Error('an event of the stream was too large');
    }
  }
}

export async function render(main) {
  const params = new URLSearchParams(location.search);
  let current = params.get('c');
  let search = '';
  let page = 1;
  let streaming = null;

  const listBox = h('div', {}, loading());
  const head = h('div', { class: 'chat-head' });
  const messages = h('div', { class: 'messages', 'aria-live': 'polite', id: 'messages' });
  const modelSelect = h('select', { id: 'chat-model', name: 'model', 'aria-label': 'Model' });
  const input = h('textarea', { id: 'chat-input', name: 'message', required: true, placeholder: 'Message (Enter to send, Shift+Enter for a new line)', 'aria-label': 'Message' });
  const send = h('button', { type: 'submit', class: 'primary', id: 'chat-send' }, 'Send');
  const stop = h('button', { type: 'button', hidden: true, onclick: () => streaming?.abort() }, 'Stop');
  const regen = h('button', { type: 'button', id: 'chat-regenerate', disabled: true, onclick: () => ask(null, true) }, 'Regenerate');
  const composer = h('form', { class: 'composer panel' }, h('div', { class: 'row' }, h('div', {}, h('label', { for: 'chat-model' }, 'Model'), modelSelect)), input,
    h('div', { class: 'actions' }, send, stop, regen));
  const searchForm = h('form', { role: 'search' }, field('Search conversations', 'q', { type: 'search', placeholder: 'title or text' }));
  searchForm.addEventListener('submit', (ev) => { ev.preventDefault(); search = searchForm.elements.q.value.trim(); page = 1; loadList(); });

  main.append(h('h1', {}, 'Chat'), h('div', { class: 'chat' },
    h('aside', { 'aria-label': 'Conversations' }, h('button', { type: 'button', onclick: () => open(null) }, 'New conversation'), searchForm, listBox),
    h('section', {}, head, messages, composer)));

  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); composer.requestSubmit(); }
  });
  composer.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) { input.focus(); return; }
    ask(text, false);
  });

  async function loadList() {
    try {
      const r = await api.get('/api/conversations', { page, per_page: 20, search });
      const pages = Math.max(1, Math.ceil(r.total / (r.per_page || 20)));
      fill(listBox, r.data.length ? h('ul', {}, r.data.map((c) => h('li', {},
        h('a', { href: `/chat?c=${encodeURIComponent(c.id)}`, 'aria-current': c.id === current ? 'true' : null, onclick: (ev) => { ev.preventDefault(); open(c.id); } },
          c.title || 'Untitled'), h('div', { class: 'k' }, `${c.model || ''} · ${when(c.updated_at)}${c.shared ? ' · shared' : ''}`))))
        : empty(search ? 'No conversation matches.' : 'No conversations yet.'),
      pages > 1 ? h('nav', { class: 'pager', 'aria-label': 'Conversation pages' },
        h('button', { type: 'button', disabled: page <= 1, onclick: () => { page--; loadList(); } }, '←'), `${page}/${pages}`,
        h('button', { type: 'button', disabled: page >= pages, onclick: () => { page++; loadList(); } }, '→')) : null);
    } catch (e) {
      fill(listBox, failed(e));
    }
  }

  function bubble(role, content, model, status) {
    const body = h('div', { class: 'content' });
    if (role === 'user') body.textContent = content;
    else body.append(renderMarkdown(content));
    return h('article', { class: `msg ${role}` }, h('div', { class: 'who' }, role === 'user' ? 'You' : (model || 'Assistant'),
      status === 'incomplete' ? h('span', { class: 'hint' }, ' · incomplete (the answer was cut off)') : null), body);
  }

  /** Regenerate needs an answer to replace. */
  const canRegenerate = () => { regen.disabled = !!streaming || !messages.querySelector('.msg.assistant'); };

  async function open(id) {
    streaming?.abort();
    current = id;
    history.replaceState(null, '', id ? `/chat?c=${encodeURIComponent(id)}` : '/chat');
    fill(head);
    if (!id) { fill(messages, empty('Ask anything. Answers are billed to your provider key like any other request.')); canRegenerate(); loadList(); input.focus(); return; }
    fill(messages, loading());
    try {
      const c = await api.get(`/api/conversations/${encodeURIComponent(id)}`);
      if (c.model && [...modelSelect.options].some((o) => o.value === c.model)) modelSelect.value = c.model;
      renderHead(c);
      const msgs = c.messages || [];
      fill(messages, msgs.length ? msgs.map((m) => bubble(m.role, m.content, m.model, m.status)) : empty('No messages yet.'));
    } catch (e) {
      fill(messages, failed(e));
    }
    canRegenerate();
    loadList();
  }

  function renderHead(c) {
    const shareBox = h('div', { class: 'share' });
    const showShare = (url) => fill(shareBox, url ? h('p', { class: 'secret' }, 'Read-only link: ', h('a', { href: url, id: 'share-url', target: '_blank', rel: 'noopener' }, url), copyButton(url),
      action('Stop sharing', async () => { await api.del(`/api/conversations/${c.id}/share`); showShare(null); })) : null);
    const exportAs = (format) => action(`Export ${format === 'json' ? 'JSON' : 'Markdown'}`, async () => {
      const resp = await request('GET', `/api/conversations/${c.id}/export`, { query: { format }, raw: true });
      download(`${(c.title || 'conversation').replace(/[^\w.-]+/g, '_')}.${format === 'json' ? 'json' : 'md'}`, await resp.text(), resp.headers.get('content-type') || 'text/plain');
    });
    const renameBox = h('div', { class: 'rename' });
    const showRename = () => {
      const f = form({
        submit: 'Save title',
        className: 'panel',
        cancel: () => fill(renameBox),
        onsubmit: async (v) => {
          const u = await api.patch(`/api/conversations/${c.id}`, { title: v.title });
          c.title = u.title ?? v.title;
          renderHead(c);
          loadList();
        },
      }, field('Title', 'title', { required: true, maxlength: 255, value: c.title || '' }));
      fill(renameBox, f);
      f.elements.title.focus();
    };
    fill(head, h('div', { class: 'row' },
      h('h2', { id: 'chat-title' }, c.title || 'Untitled'),
      h('div', { class: 'actions' },
        h('button', { type: 'button', onclick: showRename }, 'Rename'),
        action('Share', async () => { const s = await api.post(`/api/conversations/${c.id}/share`); showShare(new URL(s.url, location.origin).href); }),
        exportAs('markdown'), exportAs('json'),
        action('Delete', async () => { await api.del(`/api/conversations/${c.id}`); open(null); }, { danger: true, confirmText: 'Delete this conversation and its messages?' }))),
    renameBox, shareBox);
  }

  /**
   * Sends `text` (or regenerates the last answer) and streams the answer into a new bubble as it
   * arrives. A stream that fails keeps what arrived and says why; a request refused before its
   * answer began (nothing stored) gives the message back to the input.
   */
  async function ask(text, regenerate) {
    if (streaming) return;
    if (regenerate && !current) return;
    if (!modelSelect.value) { window.alert('Choose a model first.'); return; }
    if (messages.querySelector('.state')) fill(messages);
    let replaced = null;
    let question = null;
    if (regenerate) {
      replaced = [...messages.querySelectorAll('.msg.assistant')].pop() || null;
      replaced?.remove();
    } else {
      question = bubble('user', text);
      messages.append(question);
    }
    const answer = bubble('assistant', '', modelSelect.value);
    answer.setAttribute('aria-busy', 'true');
    messages.append(answer);
    const body = answer.querySelector('.content');
    let content = '';
    let queued = false;
    let started = false;
    let ended = false;
    const paint = () => {
      queued = false;
      fill(body, renderMarkdown(content));
      const box = document.scrollingElement;
      if (box && box.scrollHeight - box.scrollTop - box.clientHeight < 160) answer.scrollIntoView({ block: 'end' });
    };
    const showError = (msg) => {
      answer.classList.add('failed');
      answer.append(h('p', { class: 'msg error', role: 'alert' }, content ? `${msg} What arrived is kept above.` : msg));
    };
    streaming = new AbortController();
    send.disabled = true; regen.disabled = true; stop.hidden = false;
    const draft = input.value;
    if (!regenerate) input.value = '';
    try {
      const resp = regenerate
        ? await request('POST', '/api/chat/regenerate', { query: { stream: 'true' }, body: { conversation_id: current, model: modelSelect.value }, raw: true, signal: streaming.signal })
        : await request('POST', '/api/chat/stream', { body: { model: modelSelect.value, message: text, ...(current ? { conversation_id: current } : {}) }, raw: true, signal: streaming.signal });
      await readEvents(resp, (ev) => {
        if (ev.type === 'start') {
          started = true;
          if (ev.conversation_id && ev.conversation_id !== current) {
            // A new conversation: stored now, so it is in the list while its answer streams.
            current = ev.conversation_id;
            history.replaceState(null, '', `/chat?c=${encodeURIComponent(current)}`);
            loadList();
          }
        } else if (ev.type === 'delta') {
          content += ev.content || '';
          if (!queued) { queued = true; requestAnimationFrame(paint); }
        } else if (ev.type === 'done') {
          ended = true;
          if (typeof ev.message?.content === 'string') content = ev.message.content;
        } else if (ev.type === 'error') {
          ended = true;
          showError(ev.error?.message || 'The answer failed.');
        }
      });
      if (!ended) showError('The connection closed before the answer was complete.');
    } catch (e) {
      if (e.name === 'AbortError') showError('Stopped.');
      else if (e instanceof ApiError) showError(e.message);
      else showError(`The stream broke: ${e.message}.`);
    } finally {
      paint();
      answer.removeAttribute('aria-busy');
      if (!started) {
        // Refused before the answer began: nothing was stored. The question goes back to the
        // input; a regenerated answer that never began leaves the old one in place.
        question?.remove();
        if (!regenerate && !input.value) input.value = draft;
        if (replaced) answer.before(replaced);
      }
      streaming = null;
      send.disabled = false; stop.hidden = true;
      canRegenerate();
      if (current) {
        api.get(`/api/conversations/${encodeURIComponent(current)}`).then(renderHead).catch(() => {});
        loadList();
      }
    }
  }

  try {
    const r = await api.get('/api/models', { type: 'chat', active_only: true });
    const models = r.data || r;
    fill(modelSelect, models.map((m) => h('option', { value: m.name }, m.display_name && m.display_name !== m.name ? `${m.display_name} (${m.name})` : m.name)));
    if (!models.length) fill(messages, empty('No chat model is available yet; an administrator adds them.'));
  } catch (e) {
    fill(messages, failed(e));
  }
  open(current);
}
