// openai-node resumes a background response through the proxy: `responses.retrieve(id,
// {stream: true, starting_after})`; prints one JSON line per event: {"type", "seq", "delta"}.
// Args: BASE_URL API_KEY RESPONSE_ID STARTING_AFTER.
import OpenAI from "openai";

const [baseURL, apiKey, id, after] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const stream = await client.responses.retrieve(id, { stream: true, starting_after: Number(after) });
for await (const event of stream) {
  console.log(JSON.stringify({ type: event.type, seq: event.sequence_number, delta: event.delta }));
}
