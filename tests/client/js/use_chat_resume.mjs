// The useChat({ resume: true }) recipe of examples/vercel-ai, driven as useChat drives it:
// POST /api/chat starts an answer; after READ_FIRST UI chunks the page "reloads" (that reader
// is cancelled) and GET /api/chat/[id]/stream reconnects; then, once finished, GET gives 204.
// Prints {"first", "resumed", "afterEnd", "saved"}: the text of each, the last status, and the
// assistant text the chat store kept.
import { POST } from "../../../examples/vercel-ai/app/api/chat/route.js";
import { GET } from "../../../examples/vercel-ai/app/api/chat/[id]/stream/route.js";
import { loadChat } from "../../../examples/vercel-ai/lib/chats.js";

const chatId = process.env.CHAT_ID;
const messages = [{ id: "m1", role: "user", parts: [{ type: "text", text: process.env.PROMPT }] }];

/** The text deltas of a UI message stream; stops after `limit` SSE events when given. */
async function uiText(response, limit = Infinity) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let text = "";
  let seen = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop();
    for (const block of blocks) {
      const data = block.startsWith("data: ") ? block.slice(6) : "";
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.type === "text-delta") text += chunk.delta;
      if (++seen >= limit) {
        await reader.cancel();
        return text;
      }
    }
  }
  return text;
}

const post = await POST(
  new Request("http://app.local/api/chat", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id: chatId, messages, trigger: "submit-message" }),
  }),
);
const first = await uiText(post, Number(process.env.READ_FIRST ?? 5));
const params = Promise.resolve({ id: chatId });
const resumed = await uiText(await GET(new Request(`http://app.local/api/chat/${chatId}/stream`), { params }));
const again = await GET(new Request(`http://app.local/api/chat/${chatId}/stream`), { params });
const saved = loadChat(chatId).messages.at(-1);
console.log(
  JSON.stringify({
    first,
    resumed,
    afterEnd: again.status,
    saved: saved?.role === "assistant" ? saved.parts.filter((p) => p.type === "text").map((p) => p.text).join("") : null,
  }),
);
