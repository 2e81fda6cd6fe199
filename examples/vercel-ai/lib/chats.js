// Where the app keeps its chats: in memory here, your database in a real app. A chat holds its
// messages and, while an answer streams, the request that answer came from (`active`).
const chats = new Map();

export function loadChat(id) {
  return chats.get(id) ?? { messages: [], active: null };
}

export function saveChat(id, chat) {
  chats.set(id, chat);
}
