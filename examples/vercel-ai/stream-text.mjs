// The Vercel AI SDK's streamText through resumable-proxy. resumingFetch hides dropped
// connections; the session id in the response headers lets any client resume or replay.
//
//   cd examples && npm install && node vercel-ai/stream-text.mjs "why do logs have segments"
//
// PROXY_URL (default http://localhost:8080) and OPENAI_API_KEY (any string for the mock).
import { createOpenAI } from "@ai-sdk/openai";
import { streamText } from "ai";
import { resumingFetch } from "../../proxy/client/resume.js";

const proxy = process.env.PROXY_URL ?? "http://localhost:8080";
const openai = createOpenAI({
  baseURL: `${proxy}/v1`,
  apiKey: process.env.OPENAI_API_KEY ?? "sk-local",
  fetch: resumingFetch(),
});

const result = streamText({
  model: openai.chat(process.env.MODEL ?? "mock-gpt"),
  prompt: process.argv[2] ?? "Say hello",
  // Sent as they are, so a repeat with this session id replays instead of asking again.
  headers: process.env.SESSION_ID ? { "X-Resume-Session-Id": process.env.SESSION_ID } : {},
});
for await (const text of result.textStream) process.stdout.write(text);
process.stdout.write("\n");
const { headers } = await result.response;
console.error(`session ${headers?.["x-resume-session-id"]}`);
