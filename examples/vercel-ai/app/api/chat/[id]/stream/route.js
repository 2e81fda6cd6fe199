// GET /api/chat/[id]/stream: where useChat({ id, resume: true }) reconnects after a reload.
// It repeats the chat's active request with the same session id, so resumable-proxy replays
// the answer from its log (and then follows it live) instead of calling the model again.
// 204 when nothing is streaming: useChat then has nothing to resume.
import { loadChat, saveChat } from "../../../../../lib/chats.js";
import { answer } from "../../../../../lib/model.js";

export async function GET(request, { params }) {
  const { id } = await params;
  const chat = loadChat(id);
  if (!chat.active) return new Response(null, { status: 204 });
  const result = await answer(chat.active.messages, chat.active.sessionId);
  return result.toUIMessageStreamResponse({
    originalMessages: chat.active.messages,
    onFinish: ({ messages: finished }) => saveChat(id, { messages: finished, active: null }),
  });
}
