// @anthropic-ai/sdk against the proxy: a streamed message (raw events) and a plain one.
// Prints {"sessionId", "events": [...], "text", "final"}. Env: PROXY_URL, API_KEY, PROMPT.
import Anthropic from "@anthropic-ai/sdk";
import { resumingFetch } from "../../../proxy/client/resume.js";

const { PROXY_URL, API_KEY, PROMPT } = process.env;
const client = new Anthropic({
  baseURL: PROXY_URL,
  apiKey: API_KEY,
  maxRetries: 0,
  fetch: resumingFetch({ backoffMs: 20 }),
});
const request = {
  model: "claude-mock",
  max_tokens: 1024,
  messages: [{ role: "user", content: PROMPT }],
  mock_tokens: 40,
  mock_interval_ms: 5,
};
const { data: stream, response } = await client.messages.create({ ...request, stream: true }).withResponse();
const events = [];
for await (const event of stream) events.push(event);
const text = events
  .filter((event) => event.type === "content_block_delta")
  .map((event) => event.delta.text)
  .join("");
const final = await client.messages.create(request);
console.log(JSON.stringify({ sessionId: response.headers.get("x-resume-session-id"), events, text, final }));
