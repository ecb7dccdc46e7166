// Lumi: the chat page of `ipu-sparse serve`. Plain JavaScript, no build step, no external assets.
// It talks to the server's OpenAI-compatible API only: GET /v1/models, GET /health and
// POST /v1/chat/completions with stream: true (server-sent events).
"use strict";

const columnsEl = document.getElementById("columns");
const promptEl = document.getElementById("prompt");
const sendEl = document.getElementById("send");
const statusEl = document.getElementById("status");
let columns = [];  // {model, el, messagesEl, history}

function mb(bytes) { return (bytes / 1e6).toFixed(1) + " MB"; }
function mflop(flops) { return (flops / 1e6).toFixed(1) + " MFLOP/token"; }

function addColumn(model) {
  const node = document.getElementById("column-template").content.firstElementChild.cloneNode(true);
  const info = model.ipu_sparse || {};
  const role = info.role || "model";
  node.classList.add(role);
  const name = node.querySelector(".model-name");
  name.textContent = model.id;
  const badge = document.createElement("span");
  badge.className = "role";
  badge.textContent = role === "sparse" ? "sparse " + Math.round(100 * (info.sparsity || 0)) + "%" : role;
  name.appendChild(badge);
  if (info.weight_bytes) {
    const share = info.dense_fp16_bytes ? " (" + Math.round(100 * info.weight_bytes / info.dense_fp16_bytes) + "% of dense fp16)" : "";
    node.querySelector(".weights").textContent = mb(info.weight_bytes) + share;
    node.querySelector(".flops").textContent = mflop(info.flops_per_token);
  }
  columnsEl.appendChild(node);
  return {model: model.id, el: node, messagesEl: node.querySelector(".messages"), history: []};
}

function bubble(column, cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  column.messagesEl.appendChild(div);
  column.messagesEl.scrollTop = column.messagesEl.scrollHeight;
  return div;
}

async function refreshStatus() {
  try {
    const res = await fetch("/health");
    const body = await res.json();
    statusEl.textContent = body.models.map(m => m.id + ": " + (m.generating ? "generating" : "idle") +
      (m.queued ? ", " + m.queued + " queued" : "")).join(" · ");
  } catch (err) {
    statusEl.textContent = "server unreachable";
  }
}

async function loadModels() {
  const res = await fetch("/v1/models");
  const body = await res.json();
  columnsEl.textContent = "";
  columns = body.data.map(addColumn);
  await refreshStatus();
}

// One streamed answer: reads the server-sent events and appends the text as it comes.
async function ask(column, maxTokens, temperature) {
  const out = bubble(column, "assistant waiting", "…");
  const started = performance.now();
  let text = "", usage = null, timings = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: column.model, messages: column.history, stream: true, max_tokens: maxTokens,
                            temperature: temperature, stream_options: {include_usage: true}}),
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({error: {message: res.statusText}}));
      throw new Error(err.error ? err.error.message : res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) { usage = msg.usage; timings = msg.timings; }
        for (const choice of msg.choices || []) {
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            out.classList.remove("waiting");
            out.textContent = text;
            column.messagesEl.scrollTop = column.messagesEl.scrollHeight;
          }
        }
      }
    }
    out.classList.remove("waiting");
    out.textContent = text.trim() || "(empty answer)";
    column.history.push({role: "assistant", content: text.trim()});
    const seconds = (performance.now() - started) / 1000;
    const speed = timings && timings.predicted_per_second ? timings.predicted_per_second.toFixed(1) + " tok/s" : "–";
    column.el.querySelector(".speed").textContent = speed;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + speed + ", " + seconds.toFixed(1) + " s";
    out.appendChild(meta);
  } catch (err) {
    out.className = "msg error";
    out.textContent = "error: " + err.message;
    column.history.pop();  // the question goes unanswered; ask again
  }
}

async function send(event) {
  event.preventDefault();
  const text = promptEl.value.trim();
  if (!text || sendEl.disabled) return;
  promptEl.value = "";
  sendEl.disabled = true;
  const maxTokens = parseInt(document.getElementById("max-tokens").value, 10) || 128;
  const temperature = parseFloat(document.getElementById("temperature").value) || 0;
  for (const column of columns) {
    column.history.push({role: "user", content: text});
    bubble(column, "user", text);
  }
  // One model after the other, so each one's tokens/s is measured on an otherwise idle machine.
  for (const column of columns) {
    await ask(column, maxTokens, temperature);
    await refreshStatus();
  }
  sendEl.disabled = false;
  promptEl.focus();
}

document.getElementById("composer").addEventListener("submit", send);
promptEl.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(e); }
});
document.getElementById("reset").addEventListener("click", () => {
  for (const column of columns) { column.history = []; column.messagesEl.textContent = ""; }
});
loadModels().catch((err) => { statusEl.textContent = "could not load the models: " + err.message; });
