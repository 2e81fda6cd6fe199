// openai-node through resumable-proxy, with resumingFetch: a dropped connection is resumed
// from the proxy's log, so the loop below sees every chunk once and the model is asked once.
//
//   resumable-proxy serve --upstream mock          # or your upstream
//   cd examples && npm install && node openai-node.mjs "why do logs have segments"
//
// PROXY_URL (default http://localhost:8080) and OPENAI_API_KEY (any string for the mock).
import OpenAI from "openai";
import { resumingFetch } from "../proxy/client/resume.js"; // or save GET /resume.js beside it

const proxy = process.env.PROXY_URL ?? "http://localhost:8080";
const client = new OpenAI({
  baseURL: `${proxy}/v1`,
  apiKey: process.env.OPENAI_API_KEY ?? "sk-local",
  fetch: resumingFetch(),
});

const { data: stream, response } = await client.chat.completions
  .create({
    model: process.env.MODEL ?? "mock-gpt",
    messages: [{ role: "user", content: process.argv[2] ?? "Say hello" }],
    stream: true,
  })
  .withResponse();
console.error(`session ${response.headers.get("x-resume-session-id")}`);
for await (const chunk of stream) process.stdout.write(chunk.choices[0]?.delta?.content ?? "");
process.stdout.write("\n");
