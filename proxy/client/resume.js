/**
 * resume.js: a browser client for resumable-proxy streams that survive network drops and
 * page reloads. Dependency-free ES module, served by the proxy at GET /resume.js.
 *
 *   import { startStream, resumeStream, savedStream, forgetStream } from "/resume.js";
 *
 *   // Start: POST the request; iterate its events as they arrive.
 *   for await (const event of startStream("/v1/chat/completions", body, { headers })) {
 *     if (event.data === "[DONE]") break;
 *     render(JSON.parse(event.data));      // event = { id, event, data }
 *   }
 *
 *   // After a reload: continue the saved stream (null when there is nothing to continue).
 *   const stream = resumeStream({ headers, offset: myLastRenderedId });
 *   if (stream) for await (const event of stream) { ... }
 *
 * Events are yielded by an async iterator; `data` is the raw string of the event's data lines
 * (JSON for the OpenAI APIs, "[DONE]" at the end of chat completions). A session that ended
 * failed, cancelled or interrupted ends with a data event `{"error": {...}}`.
 *
 * Network drops: when the connection breaks mid-stream, the iterator reconnects by itself with
 * `GET /sessions/{id}/events?offset=<last event id>` and goes on; the loop sees every event
 * once, in order. The first retry is immediate, later ones back off exponentially with
 * jitter; after `retries` failures in a row without a new event, the error is thrown. A clean
 * end of the body is the end of the stream (the proxy closes it cleanly only there).
 *
 * Reloads: `sessionStorage[key]` holds `{ sessionId, lastEventId, origin, done }`, updated
 * before each event is yielded. `lastEventId` is the last event handed to the page, which may
 * not have rendered it before the reload: a page that keeps what it rendered (text plus that
 * event's id, written together) should pass its own `offset`; a page that keeps nothing passes
 * `offset: 0` and redraws from the proxy's log, which replays instantly and then follows live.
 *
 * Options (both functions): `headers` (sent on every request, e.g. Authorization, which the
 * session is bound to; never stored), `key` (sessionStorage slot, default "resumable-proxy"),
 * `retries` (default 5), `backoffMs` (default 200), `signal` (an AbortSignal), `origin` (the
 * proxy's origin, default that of `url`). resumeStream also takes `offset`.
 */

const DEFAULT_KEY = "resumable-proxy";
const SESSION_HEADER = "X-Resume-Session-Id";
const MAX_BACKOFF_MS = 5000;
// A blank line ends an event; LF, CRLF or CR line ends (WHATWG HTML, server-sent events).
const BOUNDARY = /(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)/;

/** An HTTP error answer: not a network drop, so it is not retried. */
export class StreamError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}: ${body.slice(0, 200)}`);
    this.status = status;
    this.body = body;
  }
}

/** The saved state of the stream in `key`, or null. */
export function savedStream(key = DEFAULT_KEY) {
  try {
    return JSON.parse(sessionStorage.getItem(key));
  } catch {
    return null;
  }
}

export function forgetStream(key = DEFAULT_KEY) {
  sessionStorage.removeItem(key);
}

export async function* startStream(url, body, opts = {}) {
  const key = opts.key ?? DEFAULT_KEY;
  forgetStream(key);
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...opts.headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
    signal: opts.signal,
  });
  if (!response.ok) throw new StreamError(response.status, await response.text());
  const state = {
    sessionId: response.headers.get(SESSION_HEADER),
    lastEventId: 0,
    origin: opts.origin ?? new URL(url, location.href).origin,
    done: false,
  };
  yield* follow(response, state, key, opts);
}

export function resumeStream(opts = {}) {
  const key = opts.key ?? DEFAULT_KEY;
  const state = savedStream(key);
  if (!state?.sessionId || (state.done && opts.offset === undefined)) return null;
  if (opts.offset !== undefined) state.lastEventId = opts.offset;
  return follow(null, state, key, opts);
}

/** Yield the events of `response`, then of each continuation after a drop, to the end. */
async function* follow(response, state, key, opts) {
  const save = () => state.sessionId && sessionStorage.setItem(key, JSON.stringify(state));
  const retries = opts.retries ?? 5;
  const backoffMs = opts.backoffMs ?? 200;
  let failures = 0;
  save();
  for (;;) {
    try {
      response ??= await reconnect(state, opts);
      for await (const event of parse(response.body)) {
        failures = 0;
        state.lastEventId = event.id !== undefined ? Number(event.id) : state.lastEventId + 1;
        save();
        yield event;
      }
      state.done = true;
      save();
      return;
    } catch (error) {
      // Only a network failure of a proxy stream is worth another try.
      const final = error instanceof StreamError || opts.signal?.aborted || !state.sessionId;
      if (final || ++failures > retries) throw error;
      response = null;
      const wait = Math.min(MAX_BACKOFF_MS, backoffMs * 2 ** (failures - 2));
      if (failures > 1) await new Promise((done) => setTimeout(done, wait * (0.5 + Math.random() / 2)));
    }
  }
}

async function reconnect(state, opts) {
  const url = `${state.origin}/sessions/${encodeURIComponent(state.sessionId)}/events?offset=${state.lastEventId}`;
  const response = await fetch(url, {
    headers: { Accept: "text/event-stream", ...opts.headers },
    signal: opts.signal,
    cache: "no-store",
  });
  if (response.ok) return response;
  const body = await response.text();
  // A gateway or an overloaded proxy may answer 5xx/429 for a moment: that is a drop too.
  if (response.status >= 500 || response.status === 429) throw new TypeError(`HTTP ${response.status}`);
  throw new StreamError(response.status, body);
}

/** Whole events from a byte stream; a partial event at a drop is never yielded. */
async function* parse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const blocks = (buffer + value).split(BOUNDARY);
      buffer = blocks.pop();
      for (const block of blocks) {
        const event = fields(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
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
