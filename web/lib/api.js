// The console's only way to the server: the public /api, with the access token as a bearer.
//
// The token is kept in sessionStorage (this tab only, gone when the tab closes, survives a
// reload), never in local storage, a cookie or a URL. Why not an HttpOnly cookie: the API takes
// bearer tokens only, so a cookie would need cookie auth plus CSRF tokens on every /api route;
// with a bearer header no other site can make the browser send the token. Script injection is
// what could read sessionStorage, and that is what the strict content-security-policy, Trusted
// Types and sanitized Markdown are there to stop (an in-memory token would fall the same way).

const KEY = 'tollgate.session';

export const session = {
  get() {
    try { return JSON.parse(sessionStorage.getItem(KEY) || 'null'); } catch { return null; }
  },
  get token() { return this.get()?.token || null; },
  get user() { return this.get()?.user || null; },
  set(token, user) { sessionStorage.setItem(KEY, JSON.stringify({ token, user })); },
  setUser(user) { const s = this.get(); if (s) this.set(s.token, user); },
  clear() { sessionStorage.removeItem(KEY); },
};

/** An error answer of the API: `message`, `param`, `code`, `type`, `status`. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `The server answered ${status}.`);
    this.status = status;
    this.type = e.type || null;
    this.code = e.code || null;
    this.param = e.param || null;
  }
}

let onExpired = null;
/** `fn(message) → Promise<boolean>`: signs the user in again (true) or gives up (false). */
export function setExpiredHandler(fn) { onExpired = fn; }

/** A fetch with the token; on a 401 of a signed-in call, re-authenticates once and retries. */
export async function request(method, path, { body, query, auth = true, raw = false, retry = true, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== '') url.searchParams.set(k, v);
  }
  const send = () => {
    const headers = {};
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (auth && session.token) headers.authorization = `Bearer ${session.token}`;
    return fetch(url, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  };
  let resp;
  try {
    resp = await send();
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { error: { message: 'The server cannot be reached. Check the connection and try again.' } });
  }
  if (resp.status === 401 && auth && retry && session.token && onExpired) {
    const b = await resp.json().catch(() => null);
    const why = b?.error?.code === 'token_expired' ? 'Your session expired.' : 'Your session ended.';
    if (await onExpired(`${why} Sign in again to continue; nothing on the page is lost.`)) {
      resp = await send();
    } else {
      throw new ApiError(401, b);
    }
  }
  if (raw) {
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
    return resp;
  }
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export const api = {
  get: (path, query, opts) => request('GET', path, { query, ...opts }),
  post: (path, body, opts) => request('POST', path, { body, ...opts }),
  patch: (path, body, opts) => request('PATCH', path, { body, ...opts }),
  put: (path, body, opts) => request('PUT', path, { body, ...opts }),
  del: (path, opts) => request('DELETE', path, opts),
};

/** Fetches every page of a list (at most `limit` rows). */
export async function all(path, query = {}, limit = 10000) {
  const rows = [];
  for (let page = 1; rows.length < limit; page++) {
    const r = await api.get(path, { ...query, page, per_page: 100 });
    rows.push(...r.data);
    if (r.data.length < 100 || rows.length >= r.total) break;
  }
  return rows.slice(0, limit);
}
