// The chat: streams POST /v1/chat/completions into the page. The conversation lives in this module's memory
// only (nothing is stored). Stop aborts the fetch: the server sees the stream close, cancels the request at its
// next step and frees the sequence. Answers are drawn by markdown.js, which never parses model text as HTML.

import { api, errorMessage } from "./api.js";
import { el } from "./format.js";
import { renderMarkdown } from "./markdown.js";

const conversation = []; // {role, content} of the finished turns
let controller = null; // the AbortController of the answer being streamed

export function initChat() {
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  // Enter sends, Shift+Enter starts a new line (as in most chat pages); IME composition is left alone.
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("stop").addEventListener("click", () => controller?.abort());
  document.getElementById("new-chat").addEventListener("click", () => {
    controller?.abort();
    conversation.length = 0;
    document.getElementById("message-list").replaceChildren();
    setStatus("New conversation.");
    input.focus();
  });
}

/** Fill the model picker from /v1/models' `data` (chat models: an embedding model cannot answer), keeping the
 * current choice. */
export function setModels(models) {
  const select = document.getElementById("model");
  const chosen = select.value;
  const chat = models.filter((model) => !model.embedding);
  select.replaceChildren(
    ...chat.map((model) => {
      const word = { ready: "loaded", unloaded: "loads on first message" }[model.status] || model.status;
      const option = el("option", `${model.id} (${word})`);
      option.value = model.id;
      return option;
    }),
  );
  if (chat.some((model) => model.id === chosen)) select.value = chosen;
}

function setStatus(text) {
  document.getElementById("chat-status").textContent = text;
}

function addMessage(role, text) {
  const item = el("li", null, `message ${role}`);
  item.append(el("span", role === "user" ? "You" : "Model", "who"));
  const body = el("div", null, "body");
  if (role === "user") body.append(el("p", text, "plain")); // the user's text is shown as typed
  item.append(body);
  document.getElementById("message-list").append(item);
  const scroller = document.getElementById("messages");
  scroller.scrollTop = scroller.scrollHeight;
  return item;
}

async function send() {
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  if (!text || controller) return;
  const model = document.getElementById("model").value;
  if (!model) {
    setStatus("No model to chat with yet.");
    return;
  }
  input.value = "";
  const system = document.getElementById("system-prompt").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation,
    { role: "user", content: text }];
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant");
  answer.dataset.state = "streaming";
  answer.setAttribute("aria-busy", "true");
  const body = {
    model,
    messages,
    stream: true,
    temperature: Number(document.getElementById("temperature").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  setStatus(`Asking ${model}…`);
  let content = "";
  let finish = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    setStatus(`${model} is answering…`);
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message || "the server ended the stream with an error");
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        content += choice.delta.content;
        draw(answer, content);
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
    answer.dataset.state = "done";
    setStatus(finish === "length" ? "Done: the answer reached max tokens." : "Done.");
  } catch (error) {
    if (error.name === "AbortError") {
      answer.dataset.state = "stopped";
      answer.append(el("p", "Stopped.", "note"));
      setStatus("Stopped: the server freed the sequence.");
    } else {
      answer.dataset.state = "error";
      const message = el("p", error.message, "error");
      message.setAttribute("role", "alert");
      answer.append(message);
      setStatus("The request failed.");
    }
  } finally {
    drawNow(answer, content);
    answer.removeAttribute("aria-busy");
    // A stopped or failed answer keeps what arrived, so that the next turn follows on from what is shown.
    if (content) conversation.push({ role: "assistant", content });
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  stop.disabled = !busy;
  // A keyboard user who pressed Send would lose focus to the top of the page when Send is disabled under it:
  // focus moves on to Stop, the one control that matters while the answer streams.
  if (busy && document.activeElement === send) stop.focus();
  send.disabled = busy;
  if (!busy) document.getElementById("chat-input").focus();
}

// Redraw at most once a frame: tokens can arrive faster than the page can lay out their Markdown.
const pending = new Map();
function draw(answer, content) {
  if (pending.has(answer)) {
    pending.set(answer, content);
    return;
  }
  pending.set(answer, content);
  requestAnimationFrame(() => pending.has(answer) && drawNow(answer, pending.get(answer)));
}

function drawNow(answer, content) {
  pending.delete(answer);
  const body = answer.querySelector(".body");
  body.replaceChildren(renderMarkdown(content));
  const scroller = document.getElementById("messages");
  scroller.scrollTop = scroller.scrollHeight;
}

// The JSON payloads of a text/event-stream response, up to "[DONE]".
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}
