// openai-node streams a chat completion through the proxy; prints one JSON line:
// {"sessionId", "chunks": [...]} or, when the SDK raised, {"error": {"name", "message"}}.
// Env: PROXY_URL, API_KEY, PROMPT, TOKENS; RESUMING=0 uses the plain fetch.
import OpenAI from "openai";
import { resumingFetch } from "../../../proxy/client/resume.js";

const { PROXY_URL, API_KEY, PROMPT, TOKENS = "40", RESUMING = "1" } = process.env;
const client = new OpenAI({
  baseURL: `${PROXY_URL}/v1`,
  apiKey: API_KEY,
  maxRetries: 0,
  ...(RESUMING === "1" ? { fetch: resumingFetch({ backoffMs: 20 }) } : {}),
});
const chunks = [];
let sessionId = null;
try {
  const { data: stream, response } = await client.chat.completions
    .create({
      model: "mock-gpt",
      messages: [{ role: "user", content: PROMPT }],
      stream: true,
      mock_tokens: Number(TOKENS),
      mock_interval_ms: 5,
    })
    .withResponse();
  sessionId = response.headers.get("x-resume-session-id");
  for await (const chunk of stream) chunks.push(chunk);
  console.log(JSON.stringify({ sessionId, chunks }));
} catch (error) {
  const name = error instanceof OpenAI.APIError ? "APIError" : error.constructor.name;
  console.log(JSON.stringify({ sessionId, chunks, error: { name, message: String(error.message) } }));
}
