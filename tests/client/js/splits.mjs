// resumingFetch on generated proxy streams (LF, CRLF and CR line ends, multi-line data,
// comments), split into chunks at every position and at random, and cut at random points:
// the SDK side must receive only whole events, and after the resume exactly the stream.
// The wrapped fetch is a function that serves byte ranges of the stream, the way the proxy
// answers POST and GET /sessions/{id}/events with Last-Event-ID. Prints {"cases", "failures"}.
import { resumingFetch } from "../../../proxy/client/resume.js";

let seed = 20261201;
const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
const pick = (items) => items[Math.floor(random() * items.length)];
const encoder = new TextEncoder();

function stream(count) {
  const events = [];
  for (let n = 1; n <= count; n++) {
    const end = pick(["\n", "\r\n", "\r"]);
    const lines = [`id: ${n}`, ...(random() < 0.3 ? [": keep"] : []), `data: {"n":${n},"t":"é${"x".repeat(n % 7)}"}`];
    if (random() < 0.3) lines.push("data: second line");
    events.push(encoder.encode(lines.join(end) + end + end));
  }
  return events;
}

const join = (parts) => {
  const out = new Uint8Array(parts.reduce((size, part) => size + part.length, 0));
  let at = 0;
  for (const part of parts) out.set(part, (at += part.length) - part.length);
  return out;
};
const same = (a, b) => a.length === b.length && a.every((byte, i) => byte === b[i]);

/** A Response whose body gives `bytes` in `chunks`, then errors if `cut`. */
function response(bytes, sizes, cut) {
  let at = 0;
  let index = 0;
  const body = new ReadableStream({
    pull(controller) {
      if (at >= bytes.length) return cut ? controller.error(new TypeError("terminated")) : controller.close();
      const size = sizes[index++ % sizes.length];
      controller.enqueue(bytes.slice(at, at + size));
      at += size;
    },
  });
  return new Response(body, { headers: { "content-type": "text/event-stream", "x-resume-session-id": "s-123456789" } });
}

async function run(events, sizes, cutAt) {
  const whole = join(events);
  const calls = [];
  const fetchFn = async (url, init) => {
    const lastId = new Headers(init?.headers).get("last-event-id");
    calls.push(lastId);
    if (lastId === null) return response(whole.slice(0, cutAt ?? whole.length), sizes, cutAt !== undefined);
    return response(join(events.slice(Number(lastId))), sizes, false);
  };
  const fetched = await resumingFetch({ fetch: fetchFn, backoffMs: 0 })("http://proxy.test/v1/x", { method: "POST" });
  const reader = fetched.body.getReader();
  const received = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    received.push(value);
  }
  // Every chunk but a trailing remainder ends exactly where some event ends.
  const ends = new Set();
  let total = 0;
  for (const event of events) ends.add((total += event.length));
  let seen = 0;
  for (const chunk of received) {
    seen += chunk.length;
    if (!ends.has(seen)) return `a chunk ended inside an event (byte ${seen})`;
  }
  if (!same(join(received), whole)) return `received ${join(received).length} bytes of ${whole.length}`;
  if (cutAt !== undefined && calls.length !== 2) return `expected one resume, made ${calls.length - 1}`;
  return null;
}

const failures = [];
let cases = 0;
for (let round = 0; round < 40; round++) {
  const events = stream(1 + Math.floor(random() * 12));
  const length = join(events).length;
  const plans = [];
  for (let size = 1; size <= 9; size++) plans.push([[size], undefined]);
  for (let i = 0; i < 20; i++) {
    const sizes = Array.from({ length: 5 }, () => 1 + Math.floor(random() * 40));
    plans.push([sizes, undefined], [sizes, 1 + Math.floor(random() * (length - 1))]);
  }
  for (const [sizes, cutAt] of plans) {
    cases++;
    const failure = await run(events, sizes, cutAt);
    if (failure) failures.push({ round, sizes, cutAt, failure });
  }
}
console.log(JSON.stringify({ cases, failures: failures.slice(0, 5) }));
