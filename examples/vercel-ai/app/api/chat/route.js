// POST /api/chat: what useChat sends. The answer streams to the page and is remembered as the
// chat's active request until it is finished.
import { loadChat, saveChat } from "../../../lib/chats.js";
import { answer, sessionFor } from "../../../lib/model.js";

export async function POST(request) {
  const { id, messages } = await request.json();
  const active = { messages, sessionId: sessionFor(id, messages) };
  saveChat(id, { ...loadChat(id), messages, active });
  const result = await answer(active.messages, active.sessionId);
  return result.toUIMessageStreamResponse({
    originalMessages: messages,
    onFinish: ({ messages: finished }) => saveChat(id, { messages: finished, active: null }),
  });
}
