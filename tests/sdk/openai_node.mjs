// Drives tollgate with the real OpenAI Node SDK (`openai` 6.x), calls unchanged: chat
// completions (streamed and not, stored ones listed, read, updated and deleted), the Responses API
// (streamed and not, previous_response_id, retrieve, input items), the Conversations API, images,
// audio speech and transcriptions, moderations, and an unknown model's error. Prints one JSON
// object with what it saw.
//
// Run by tests/sdk.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test gateway, and
// TOLLGATE_TEST_NODE_MODULES the folder where `npm install openai@6` was run (or its
// node_modules). Every step runs on its own: a step that throws is reported under "errors" (with
// its stack) and the script exits 1 after printing what the other steps saw.
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import { join } from "node:path";

const modules = process.env.TOLLGATE_TEST_NODE_MODULES;
if (!modules) {
  console.error("TOLLGATE_TEST_NODE_MODULES is not set");
  process.exit(2);
}
// Resolved from that folder, as a script living there would.
const require = createRequire(join(modules, "resolve-from-here.js"));
const { OpenAI, NotFoundError, APIError, toFile } = require("openai");
const { VERSION } = require("openai/version");

const client = new OpenAI({ maxRetries: 0, timeout: 30_000 });
const MODEL = "gpt-test";
const out = { sdk_version: VERSION, errors: {}, requests: 0, upstream: 0 };
const ids = {};

// Counts a request the gateway admits (each writes one usage record, §8 of the API contract);
// `upstream` also counts it among those that reach the upstream. Returns the SDK's promise as is.
const sent = (p) => {
  out.requests++;
  return p;
};
const upstream = (p) => {
  out.upstream++;
  return sent(p);
};

async function step(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out.errors[name] = String(e?.stack ?? e);
  }
}

// Awaits `p`, expecting the SDK to throw its NotFoundError; returns the status it carried.
async function notFound(p) {
  try {
    await p;
    return null;
  } catch (e) {
    if (!(e instanceof NotFoundError)) throw e;
    return e.status;
  }
}

const responseUsage = (u) =>
  u && {
    input_tokens: u.input_tokens,
    output_tokens: u.output_tokens,
    total_tokens: u.total_tokens,
  };

function itemText(i) {
  if (typeof i.content === "string") return i.content;
  if (Array.isArray(i.content)) return i.content.map((p) => p.text ?? "").join("");
  return null;
}

await step("chat", async () => {
  const c = await upstream(client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "Hello" }],
  }));
  return {
    id: c.id,
    model: c.model,
    content: c.choices[0].message.content,
    finish_reason: c.choices[0].finish_reason,
    usage: c.usage,
  };
});

await step("chat_stream", async () => {
  const stream = await upstream(client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "Hello" }],
    stream: true,
    stream_options: { include_usage: true },
  }));
  let content = "";
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    content += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  return { content, usage, chunks };
});

await step("stored", async () => {
  const made = [];
  for (const n of [0, 1]) {
    const c = await upstream(client.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: `Node ${n}` }],
      store: true,
      metadata: { sdk: "node", n: String(n) },
    }));
    made.push(c.id);
  }
  const listed = [];
  for await (const c of sent(client.chat.completions.list({ metadata: { sdk: "node" } }))) {
    listed.push(c.id);
  }
  const got = await sent(client.chat.completions.retrieve(made[0]));
  const messages = await sent(client.chat.completions.messages.list(made[0]));
  const updated = await sent(client.chat.completions.update(made[0], {
    metadata: { sdk: "node", n: "0", updated: "yes" },
  }));
  const deleted = await sent(client.chat.completions.delete(made[1]));
  return {
    ids: made,
    listed: listed.sort(),
    retrieved: {
      id: got.id,
      model: got.model,
      text: got.choices[0].message.content,
      metadata: got.metadata,
      prompt_tokens: got.usage?.prompt_tokens ?? null,
    },
    messages: messages.data.map((m) => ({ role: m.role, content: m.content })),
    updated_metadata: updated.metadata,
    deleted,
    retrieve_after: await notFound(sent(client.chat.completions.retrieve(made[1]))),
  };
});

await step("responses", async () => {
  const r = await upstream(client.responses.create({
    model: MODEL,
    input: "Hi there",
    instructions: "Be brief.",
    metadata: { sdk: "node" },
  }));
  ids.first = r.id;
  return {
    id: r.id,
    object: r.object,
    status: r.status,
    model: r.model,
    text: r.output_text,
    usage: responseUsage(r.usage),
    metadata: r.metadata,
  };
});

await step("responses_stream", async () => {
  const stream = await upstream(client.responses.create({
    model: MODEL,
    input: "And again",
    previous_response_id: ids.first,
    stream: true,
  }));
  const types = [];
  const seqs = [];
  let deltas = "";
  let final = null;
  for await (const e of stream) {
    types.push(e.type);
    seqs.push(e.sequence_number);
    if (e.type === "response.output_text.delta") deltas += e.delta;
    if (e.type === "response.completed") final = e.response;
  }
  ids.streamed = final?.id;
  return {
    first: types[0],
    last: types.at(-1),
    sequence_ok: seqs.every((s, i) => s === i),
    deltas,
    final_id: final?.id ?? null,
    previous_response_id: final?.previous_response_id ?? null,
    usage: responseUsage(final?.usage),
  };
});

await step("responses_follow_up", async () => {
  const r = await upstream(client.responses.create({
    model: MODEL,
    input: "Once more",
    previous_response_id: ids.streamed,
  }));
  ids.follow_up = r.id;
  return { id: r.id, text: r.output_text, previous_response_id: r.previous_response_id };
});

await step("responses_retrieve", async () => {
  const r = await sent(client.responses.retrieve(ids.first));
  return {
    id: r.id,
    status: r.status,
    text: r.output_text,
    usage: responseUsage(r.usage),
    metadata: r.metadata,
  };
});

await step("input_items", async () => {
  const items = [];
  for await (const i of sent(client.responses.inputItems.list(ids.follow_up, { order: "asc" }))) {
    items.push({ type: i.type, role: i.role ?? null, text: itemText(i), id: i.id });
  }
  return items;
});

await step("conversation", async () => {
  const conv = await sent(client.conversations.create({
    metadata: { sdk: "node" },
    items: [{ type: "message", role: "user", content: "My colour is green." }],
  }));
  const added = await sent(client.conversations.items.create(conv.id, {
    items: [{ type: "message", role: "user", content: "Remember it." }],
  }));
  const r = await upstream(client.responses.create({
    model: MODEL,
    input: "What colour?",
    conversation: conv.id,
  }));
  const items = [];
  for await (const i of sent(client.conversations.items.list(conv.id, { order: "asc" }))) {
    items.push({ type: i.type, role: i.role ?? null, text: itemText(i) });
  }
  const deleted = await sent(client.conversations.delete(conv.id));
  return {
    id: conv.id,
    object: conv.object,
    metadata: conv.metadata,
    added: added.data.length,
    text: r.output_text,
    items,
    deleted,
    retrieve_after: await notFound(sent(client.conversations.retrieve(conv.id))),
  };
});

await step("image", async () => {
  const r = await upstream(
    client.images.generate({ model: "dall-e", prompt: "a lighthouse", n: 2 }),
  );
  return { n: r.data.length, b64: r.data.map((d) => d.b64_json) };
});

await step("speech", async () => {
  const res = await upstream(client.audio.speech.create({
    model: "tts",
    voice: "alloy",
    input: "Hello there",
  }));
  const bytes = Buffer.from(await res.arrayBuffer());
  return {
    len: bytes.length,
    sha256: createHash("sha256").update(bytes).digest("hex"),
    content_type: res.headers.get("content-type"),
  };
});

// The upload the Rust side looks for, byte for byte, in what the upstream received.
const UPLOAD = Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 131 + 7) % 256));

await step("transcription", async () => {
  const r = await upstream(client.audio.transcriptions.create({
    model: "whisper",
    file: await toFile(UPLOAD, "speech.mp3", { type: "audio/mpeg" }),
  }));
  return { text: r.text };
});

await step("moderation", async () => {
  const r = await upstream(
    client.moderations.create({ model: "omni-mod", input: "I want to hug a cat" }),
  );
  return { model: r.model, flagged: r.results[0].flagged };
});

await step("unknown_model", async () => {
  try {
    await client.chat.completions.create({
      model: "no-such-model",
      messages: [{ role: "user", content: "Hello" }],
    });
    return { thrown: false };
  } catch (e) {
    return {
      thrown: true,
      class: e.constructor.name,
      not_found: e instanceof NotFoundError,
      api_error: e instanceof APIError,
      status: e.status,
      code: e.code,
      type: e.type,
      message: e.error?.message ?? null,
    };
  }
});

console.log(JSON.stringify(out));
process.exit(Object.keys(out.errors).length ? 1 : 0);
