/**
 * resume.js: clients for resumable-proxy streams that survive network drops and page reloads.
 * A dependency-free ES module for browsers and Node 18+, served by the proxy at GET /resume.js.
 *
 * 1. A drop-in `fetch` for SDKs that take one (openai-node, @anthropic-ai/sdk, the Vercel AI
 *    SDK's providers). A stream whose connection breaks is continued from the proxy's log;
 *    the SDK sees every event once, in order, and the model is called once:
 *
 *      import { resumingFetch } from "./resume.js";
 *      const client = new OpenAI({ baseURL: "http://localhost:8080/v1", apiKey, fetch: resumingFetch() });
 *      const openai = createOpenAI({ baseURL: "http://localhost:8080/v1", apiKey, fetch: resumingFetch() });
 *
 * 2. For pages: start a stream, iterate its events, and continue it after a reload.
 *
 *      import { startStream, resumeStream, savedStream, forgetStream } from "/resume.js";
 *      for await (const event of startStream("/v1/chat/completions", body, { headers })) {
 *        if (event.data === "[DONE]") break;
 *        render(JSON.parse(event.data));      // event = { id, event, data }
 *      }
 *      // After a reload: continue the saved stream (null when there is nothing to continue).
 *      const stream = resumeStream({ offset: myLastRenderedId });
 *      if (stream) for await (const event of stream) { ... }
 *
 * How a drop is hidden (both APIs). Only whole events are passed on: the bytes after the last
 * blank line wait until their event is complete, so half an event never reaches the caller.
 * The number of the last whole event is kept (its `id:` line, else one more than the one
 * before). When the body breaks, `GET /sessions/{id}/events` with `Last-Event-ID` continues it,
 * with the original request's headers (the session is bound to its Authorization, x-api-key or
 * api-key), or with the session's capability token (`X-Resume-Token`, sent as `?token=`) when
 * there is no credential header. The first retry goes at once, later ones back off
 * exponentially with jitter; after `retries` failures in a row without a new event, the error
 * that broke the stream is thrown, as it would have been without this module. A 404 (deleted,
 * expired, another credential) ends the retries at once. A clean end of the body, or a 204
 * from the proxy (the session had already completed there), is the end of the stream. A session
 * that ended failed, cancelled or interrupted ends with a data event `{"error": {...}}`, which
 * the OpenAI SDKs raise as `APIError`.
 *
 * Reloads (browsers). `sessionStorage[key]` holds `{ sessionId, token, lastEventId, origin,
 * done }`, updated before each event is yielded (never the credential headers). `lastEventId` is
 * the last event handed to the page, which may not have rendered it before the reload: a page
 * that keeps what it rendered should pass its own `offset`; a page that keeps nothing passes
 * `offset: 0` and redraws from the log. Without a credential header `resumeStream` follows
 * with an `EventSource` and the token (an EventSource cannot send headers): it reconnects by
 * itself with `Last-Event-ID`, and stops when the proxy answers 204 at the end of a complete
 * session, or after the final error event of one that failed, was cancelled or interrupted
 * (which the proxy answers at that end instead of a 204, so that no client mistakes a cut
 * answer for a whole one).
 *
 * Options. resumingFetch: `fetch` (the one to wrap, default globalThis.fetch), `retries`
 * (default 5), `backoffMs` (100), `maxBackoffMs` (2000), `sessionHeader`. startStream and
 * resumeStream: `headers` (sent on every request), `key` (the sessionStorage slot, default
 * "resumable-proxy"), `retries`, `backoffMs` (200), `signal` (an AbortSignal), `origin` (the
 * proxy's origin, default that of `url`); resumeStream also takes `offset`, `eventSource`
 * (true/false to force the choice) and `eventTypes` (the `event:` names an EventSource listens
 * to, default ["message"]).
 */

const DEFAULT_KEY = "resumable-proxy";
const SESSION_HEADER = "X-Resume-Session-Id";
const TOKEN_HEADER = "X-Resume-Token";
const CREDENTIAL_HEADERS = ["authorization", "x-api-key", "api-key"];
// Headers that described the original request's body or routing, not the caller.
const NOT_CARRIED = new Set([
  "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "accept",
  "accept-encoding", "last-event-id", "connection",
]);
const LF = 10;
const CR = 13;
const NO_BYTES = new Uint8Array(0);
const decoder = new TextDecoder();

/** An HTTP error answer: not a network drop, so it is not retried. */
export class StreamError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}: ${body.slice(0, 200)}`);
    this.status = status;
    this.body = body;
  }
}

// --- whole events out of a byte stream ------------------------------------------------------

/**
 * Where the last whole event in `buffer` ends, and the offset after each whole event.
 * A blank line ends an event; LF, CRLF and CR line ends (WHATWG HTML, server-sent events). A
 * trailing CR is left undecided: it may be the first half of a CRLF still in flight.
 */
function scan(buffer, offset) {
  let cut = 0;
  let lineStart = 0;
  let eventStart = 0;
  let id;
  for (let i = 0; i < buffer.length; i++) {
    const byte = buffer[i];
    if (byte !== LF && byte !== CR) continue;
    let next = i + 1;
    if (byte === CR) {
      if (next === buffer.length) break;
      if (buffer[next] === LF) next++;
    }
    if (i === lineStart) {
      if (lineStart > eventStart) {
        offset = id !== undefined && /^\d+$/.test(id) ? Number(id) : offset + 1;
        cut = next;
        eventStart = next;
        id = undefined;
      }
    } else if (buffer[lineStart] === 0x69 && buffer[lineStart + 1] === 0x64) {
      // "id" alone or "id:"; the value after one optional space (the SSE field rules).
      const line = decoder.decode(buffer.subarray(lineStart, i));
      if (line === "id") id = "";
      else if (line.startsWith("id:")) id = line.slice(line.startsWith("id: ") ? 4 : 3);
    }
    lineStart = next;
    i = next - 1;
  }
  return { cut, offset };
}

function concat(a, b) {
  if (!a.length) return b;
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

/** Attempt 0 goes at once; then backoffMs, 2*backoffMs, ... capped, times 0.5-1 jitter. */
function delay(attempt, policy) {
  if (attempt === 0) return 0;
  const ms = Math.min(policy.maxBackoffMs, policy.backoffMs * 2 ** (attempt - 1));
  return ms * (0.5 + Math.random() / 2);
}

/**
 * Whole events as bytes from `response`, then from each continuation `cursor.reconnect()`
 * gives after a drop (null: the session had ended, 204). `cursor.offset` is the number of the
 * last event yielded. Without a `response` the first one is a continuation too.
 */
async function* spliced(response, cursor, policy) {
  let failures = 0;
  if (response === undefined) {
    try {
      response = await cursor.reconnect();
    } catch (error) {
      if (error instanceof StreamError) throw error;
      response = await continuation(error, cursor, policy, () => failures++);
    }
  }
  for (;;) {
    let pending = NO_BYTES;
    let reader;
    try {
      if (response === null) return;
      reader = response.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending = concat(pending, value);
        const { cut, offset } = scan(pending, cursor.offset);
        if (cut) {
          const events = pending.slice(0, cut);
          pending = pending.subarray(cut);
          cursor.offset = offset;
          failures = 0;
          yield events;
        }
      }
      if (pending.length) yield pending; // a keep-alive line after the last event
      return;
    } catch (error) {
      if (policy.signal?.aborted || error instanceof StreamError) throw error;
      response = await continuation(error, cursor, policy, () => failures++);
    } finally {
      reader?.cancel().catch(() => {});
    }
  }
}

/** The next response to read after `error` broke the stream; throws `error` when out of tries. */
async function continuation(error, cursor, policy, countFailure) {
  for (;;) {
    const attempt = countFailure();
    if (attempt >= policy.retries) {
      throw addNote(error, `could not resume session ${cursor.sessionId} after event ${cursor.offset} (${attempt} attempts)`);
    }
    await sleep(delay(attempt, policy));
    if (policy.signal?.aborted) throw error;
    try {
      return await cursor.reconnect();
    } catch (failure) {
      if (failure instanceof StreamError) throw addNote(error, failure.message);
    }
  }
}

function addNote(error, note) {
  if (error && typeof error === "object") {
    try {
      error.message = `${error.message} (resumable-proxy: ${note})`;
    } catch {}
  }
  return error;
}

/** `GET /sessions/{id}/events` from `cursor.offset`; null at the end (204). */
async function reconnect(fetchFn, cursor, headers, policy) {
  const target = new URL(`/sessions/${encodeURIComponent(cursor.sessionId)}/events`, cursor.origin);
  if (cursor.token && !hasCredential(headers)) target.searchParams.set("token", cursor.token);
  target.searchParams.set("offset", String(cursor.offset));
  const sent = new Headers(headers);
  sent.set("Accept", "text/event-stream");
  sent.set("Last-Event-ID", String(cursor.offset));
  const response = await fetchFn(target.href, { headers: sent, signal: policy.signal });
  if (response.status === 204) return null;
  if (response.ok && response.headers.get(policy.sessionHeader) === cursor.sessionId) return response;
  const body = await response.text().catch(() => "");
  // A gateway or an overloaded proxy may answer 5xx/429 for a moment: that is a drop too.
  if (response.status >= 500 || response.status === 429) throw new TypeError(`HTTP ${response.status}`);
  throw new StreamError(response.status, body);
}

function hasCredential(headers) {
  return CREDENTIAL_HEADERS.some((name) => headers.has(name));
}

function carried(headers, sessionHeader) {
  const kept = new Headers();
  for (const [name, value] of new Headers(headers ?? undefined)) {
    if (!NOT_CARRIED.has(name) && name !== sessionHeader.toLowerCase()) kept.append(name, value);
  }
  return kept;
}

function isProxyStream(response, sessionHeader) {
  return (
    response.status === 200 &&
    response.body !== null &&
    response.headers.get(sessionHeader) !== null &&
    (response.headers.get("content-type") ?? "").startsWith("text/event-stream")
  );
}

function baseHref() {
  return globalThis.location?.href;
}

// --- resumingFetch --------------------------------------------------------------------------

/** A `fetch` that hides dropped resumable-proxy streams from the SDK that calls it. */
export function resumingFetch(options = {}) {
  const fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
  const sessionHeader = options.sessionHeader ?? SESSION_HEADER;
  return async function fetchResuming(input, init = {}) {
    const response = await fetchFn(input, init);
    if (!isProxyStream(response, sessionHeader)) return response;
    const request = typeof input === "object" && "url" in input && !(input instanceof URL) ? input : null;
    const url = new URL(request ? request.url : String(input), baseHref());
    const headers = carried(init.headers ?? request?.headers, sessionHeader);
    const policy = {
      retries: options.retries ?? 5,
      backoffMs: options.backoffMs ?? 100,
      maxBackoffMs: options.maxBackoffMs ?? 2000,
      sessionHeader,
      signal: init.signal ?? request?.signal ?? undefined,
    };
    const cursor = {
      sessionId: response.headers.get(sessionHeader),
      token: response.headers.get(TOKEN_HEADER),
      origin: url.origin,
      offset: 0,
    };
    cursor.reconnect = () => reconnect(fetchFn, cursor, headers, policy);
    const events = spliced(response, cursor, policy);
    const body = new ReadableStream({
      async pull(controller) {
        try {
          const { value, done } = await events.next();
          if (done) controller.close();
          else controller.enqueue(value);
        } catch (error) {
          controller.error(error);
        }
      },
      async cancel() {
        await events.return();
      },
    });
    const wrapped = new Response(body, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
    Object.defineProperty(wrapped, "url", { value: response.url });
    return wrapped;
  };
}

// --- pages: startStream / resumeStream ------------------------------------------------------

function storage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // Node, or a browser that refuses storage
  }
}

/** The saved state of the stream in `key`, or null. */
export function savedStream(key = DEFAULT_KEY) {
  try {
    return JSON.parse(storage()?.getItem(key) ?? "null");
  } catch {
    return null;
  }
}

export function forgetStream(key = DEFAULT_KEY) {
  storage()?.removeItem(key);
}

export async function* startStream(url, body, opts = {}) {
  const key = opts.key ?? DEFAULT_KEY;
  forgetStream(key);
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream", ...opts.headers };
  const response = await fetch(url, {
    method: "POST",
    headers,
    body: typeof body === "string" ? body : JSON.stringify(body),
    signal: opts.signal,
  });
  if (!response.ok) throw new StreamError(response.status, await response.text());
  const state = {
    sessionId: response.headers.get(SESSION_HEADER),
    token: response.headers.get(TOKEN_HEADER),
    lastEventId: 0,
    origin: opts.origin ?? new URL(url, baseHref()).origin,
    done: false,
  };
  yield* follow(response, state, key, opts);
}

export function resumeStream(opts = {}) {
  const key = opts.key ?? DEFAULT_KEY;
  const state = savedStream(key);
  if (!state?.sessionId || (state.done && opts.offset === undefined)) return null;
  if (opts.offset !== undefined) state.lastEventId = opts.offset;
  const withoutCredential = !hasCredential(new Headers(opts.headers ?? {}));
  const useEventSource =
    opts.eventSource ?? (withoutCredential && Boolean(state.token) && typeof EventSource === "function");
  return useEventSource ? followEventSource(state, key, opts) : follow(undefined, state, key, opts);
}

function saver(state, key) {
  return () => state.sessionId && storage()?.setItem(key, JSON.stringify(state));
}

/** Yield the parsed events of `response`, then of each continuation after a drop, to the end. */
async function* follow(response, state, key, opts) {
  const save = saver(state, key);
  const headers = carried(opts.headers, SESSION_HEADER);
  const policy = {
    retries: opts.retries ?? 5,
    backoffMs: opts.backoffMs ?? 200,
    maxBackoffMs: 5000,
    sessionHeader: SESSION_HEADER,
    signal: opts.signal,
  };
  const cursor = { ...state, offset: state.lastEventId };
  cursor.reconnect = () => reconnect(fetch, cursor, headers, policy);
  save();
  for await (const bytes of spliced(response, cursor, policy)) {
    for (const event of parse(decoder.decode(bytes))) {
      state.lastEventId = event.id !== undefined && /^\d+$/.test(event.id) ? Number(event.id) : state.lastEventId + 1;
      save();
      yield event;
    }
  }
  state.done = true;
  save();
}

/**
 * Follow with an EventSource and the token: no headers needed. The browser reconnects by
 * itself with Last-Event-ID; a 204 at the end (or a 404) closes the source, and one plain
 * request at the current offset tells which of the two it was.
 */
async function* followEventSource(state, key, opts) {
  const save = saver(state, key);
  const retries = opts.retries ?? 5;
  const url = () => {
    const target = new URL(`/sessions/${encodeURIComponent(state.sessionId)}/events`, state.origin);
    target.searchParams.set("token", state.token);
    target.searchParams.set("offset", String(state.lastEventId));
    return target.href;
  };
  const source = new EventSource(url());
  const queue = [];
  let wake = null;
  const push = (item) => {
    queue.push(item);
    wake?.();
  };
  let failures = 0;
  const onMessage = (message) => {
    failures = 0;
    push({ event: { id: message.lastEventId || undefined, event: message.type, data: message.data } });
  };
  for (const type of opts.eventTypes ?? ["message"]) source.addEventListener(type, onMessage);
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) push({ closed: true });
    else if (++failures > retries) push({ error: new TypeError("resumable-proxy: the event source keeps failing") });
  };
  const abort = () => push({ error: opts.signal.reason });
  opts.signal?.addEventListener("abort", abort);
  try {
    save();
    for (;;) {
      while (!queue.length) await new Promise((done) => (wake = done));
      wake = null;
      const item = queue.shift();
      if (item.error) throw item.error;
      if (item.closed) {
        const check = await fetch(url(), { signal: opts.signal });
        if (check.status !== 204) throw new StreamError(check.status, await check.text());
        state.done = true;
        save();
        return;
      }
      const { event } = item;
      if (isFinalError(event.data)) {
        // A failed, cancelled or interrupted session: the proxy answers this event at every
        // reconnect, so the source is closed here instead of reconnecting for it again.
        state.done = true;
        save();
        yield event;
        return;
      }
      state.lastEventId = event.id !== undefined && /^\d+$/.test(event.id) ? Number(event.id) : state.lastEventId + 1;
      save();
      yield event;
    }
  } finally {
    source.close();
    opts.signal?.removeEventListener("abort", abort);
  }
}

/** Whether `data` is the proxy's final event of a session that did not complete. */
function isFinalError(data) {
  if (!data.startsWith('{"error"')) return false;
  try {
    return JSON.parse(data).error?.type === "resumable_proxy_error";
  } catch {
    return false;
  }
}

/** The events of a text holding whole events only. */
function* parse(text) {
  for (const block of text.split(/(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)/)) {
    const event = fields(block);
    if (event) yield event;
  }
}

function fields(block) {
  const event = { id: undefined, event: "message", data: undefined };
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "data") event.data = event.data === undefined ? value : `${event.data}\n${value}`;
    else if (name === "id") event.id = value;
    else if (name === "event") event.event = value;
  }
  return event.data === undefined ? null : event;
}
