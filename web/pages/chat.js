// /chat: talk to the catalog's chat models with your own provider keys (§12). Answers stream in
// as they arrive and are rendered as sanitized Markdown; conversations can be searched, renamed,
// deleted, shared (read-only link) and exported. `/chat?c=<id>` opens one conversation.
import { h, fill } from '../lib/dom.js';
import { api, request, ApiError } from '../lib/api.js';
import { when } from '../lib/format.js';
import { field, loading, failed, empty, action, copyButton, download } from '../lib/ui.js';
import { renderMarkdown } from '../lib/markdown.js';

export const title = 'Chat';
export const access = 'user';

/** Reads an SSE response, calling `on(event)` for every `data:` JSON event. */
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
  const regen = h('button', { type: 'button', id: 'chat-regenerate', onclick: () => ask(null, true) }, 'Regenerate');
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
      fill(listBox, e.status === 404 ? empty('Chat is not available on this server yet.') : failed(e));
    }
  }

  function bubble(role, content, model) {
    const body = h('div', { class: 'content' });
    if (role === 'user') body.textContent = content;
    else body.append(renderMarkdown(content));
    return h('article', { class: `msg ${role}` }, h('div', { class: 'who' }, role === 'user' ? 'You' : (model || 'Assistant')), body);
  }

  async function open(id) {
    current = id;
    history.replaceState(null, '', id ? `/chat?c=${encodeURIComponent(id)}` : '/chat');
    fill(head);
    if (!id) { fill(messages, empty('Ask anything. Answers are billed to your provider key like any other request.')); loadList(); input.focus(); return; }
    fill(messages, loading());
    try {
      const c = await api.get(`/api/conversations/${encodeURIComponent(id)}`);
      if (c.model && [...modelSelect.options].some((o) => o.value === c.model)) modelSelect.value = c.model;
      renderHead(c);
      const msgs = c.messages || c.data || [];
      fill(messages, msgs.length ? msgs.map((m) => bubble(m.role, m.content, m.model)) : empty('No messages yet.'));
    } catch (e) {
      fill(messages, failed(e));
    }
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
    fill(head, h('div', { class: 'row' },
      h('h2', { id: 'chat-title' }, c.title || 'Untitled'),
      h('div', { class: 'actions' },
        action('Rename', async () => {
          const t = window.prompt('New title', c.title || '');
          if (t === null || !t.trim()) return;
          const u = await api.patch(`/api/conversations/${c.id}`, { title: t.trim() });
          c.title = u.title ?? t.trim();
          renderHead(c);
          loadList();
        }),
        action('Share', async () => { const s = await api.post(`/api/conversations/${c.id}/share`); showShare(new URL(s.url, location.origin).href); }),
        exportAs('markdown'), exportAs('json'),
        action('Delete', async () => { await api.del(`/api/conversations/${c.id}`); open(null); }, { danger: true, confirmText: 'Delete this conversation and its messages?' }))),
    shareBox);
  }

  /** Sends `text` (or regenerates the last answer) and streams the answer into a new bubble. */
  async function ask(text, regenerate) {
    if (streaming) return;
    if (regenerate && !current) return;
    if (!modelSelect.value) { window.alert('Choose a model first.'); return; }
    if (messages.querySelector('.state')) fill(messages);
    if (regenerate) {
      const last = [...messages.querySelectorAll('.msg.assistant')].pop();
      last?.remove();
    } else {
      messages.append(bubble('user', text));
    }
    const answer = bubble('assistant', '', modelSelect.value);
    answer.setAttribute('aria-busy', 'true');
    messages.append(answer);
    const body = answer.querySelector('.content');
    let content = '';
    let queued = false;
    const paint = () => { queued = false; fill(body, renderMarkdown(content)); };
    const showError = (msg) => answer.append(h('p', { class: 'msg error', role: 'alert' }, msg));
    streaming = new AbortController();
    send.disabled = true; regen.disabled = true; stop.hidden = false;
    const draft = input.value;
    if (!regenerate) input.value = '';
    try {
      const resp = regenerate
        ? await request('POST', '/api/chat/regenerate', { query: { stream: 'true' }, body: { conversation_id: current }, raw: true, signal: streaming.signal })
        : await request('POST', '/api/chat/stream', { body: { model: modelSelect.value, message: text, ...(current ? { conversation_id: current } : {}) }, raw: true, signal: streaming.signal });
      await readEvents(resp, (ev) => {
        if (ev.type === 'start' && ev.conversation_id && ev.conversation_id !== current) {
          current = ev.conversation_id;
          history.replaceState(null, '', `/chat?c=${encodeURIComponent(current)}`);
        } else if (ev.type === 'delta') {
          content += ev.content || '';
          if (!queued) { queued = true; requestAnimationFrame(paint); }
        } else if (ev.type === 'done') {
          if (ev.message?.content !== undefined) content = ev.message.content;
        } else if (ev.type === 'error') {
          showError(ev.error?.message || 'The answer failed.');
        }
      });
    } catch (e) {
      if (e.name === 'AbortError') showError('Stopped. What arrived is kept.');
      else showError(e instanceof ApiError ? e.message : `The stream broke: ${e.message}. What arrived is kept.`);
      if (!regenerate && !content && !current) input.value = draft;
    } finally {
      paint();
      answer.removeAttribute('aria-busy');
      streaming = null;
      send.disabled = false; regen.disabled = false; stop.hidden = true;
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
