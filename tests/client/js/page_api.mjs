// The page API of resume.js (startStream) in Node, where there is no sessionStorage and no
// location: a stream through the proxy, resumed after cuts. Prints {"events", "saved",
// "resumed"}: every event as {id, data}, and what savedStream/resumeStream give in Node.
import { resumeStream, savedStream, startStream } from "../../../proxy/client/resume.js";

const { PROXY_URL, API_KEY, PROMPT } = process.env;
const body = {
  model: "mock-gpt",
  messages: [{ role: "user", content: PROMPT }],
  stream: true,
  mock_tokens: 40,
  mock_interval_ms: 5,
};
const events = [];
const headers = { Authorization: `Bearer ${API_KEY}` };
for await (const event of startStream(`${PROXY_URL}/v1/chat/completions`, body, { headers, backoffMs: 20 })) {
  events.push({ id: event.id, data: event.data });
}
console.log(JSON.stringify({ events, saved: savedStream(), resumed: resumeStream({ headers }) }));
