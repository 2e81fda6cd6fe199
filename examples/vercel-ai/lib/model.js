// The model behind the chat routes, reached through resumable-proxy. Every answer is a proxy
// session whose id the app chooses: the chat id plus the number of messages it answers, so
// the app can name that answer again later (after a reload) without storing anything else.
import { createOpenAI } from "@ai-sdk/openai";
import { convertToModelMessages, streamText } from "ai";
import { resumingFetch } from "../../../proxy/client/resume.js";

const openai = createOpenAI({
  baseURL: `${process.env.PROXY_URL ?? "http://localhost:8080"}/v1`,
  apiKey: process.env.OPENAI_API_KEY ?? "sk-local",
  fetch: resumingFetch(),
});

export function sessionFor(chatId, messages) {
  return `${chatId}-${messages.length}`; // ^[A-Za-z0-9_-]{8,128}$ as long as chat ids are
}

/**
 * The answer to `messages` as proxy session `sessionId`. Asked a second time with the same
 * messages and id, the proxy replays the logged answer (from its start, then live) instead of
 * calling the model: the request body is the same JSON value, which is all the proxy compares.
 */
export async function answer(messages, sessionId) {
  return streamText({
    model: openai.chat(process.env.MODEL ?? "mock-gpt"),
    messages: await convertToModelMessages(messages),
    headers: { "X-Resume-Session-Id": sessionId },
  });
}
