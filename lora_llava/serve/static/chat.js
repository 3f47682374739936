// The lora-llava chat page: one image per chat (sent with the first question), answers streamed from
// /v1/chat/completions (server-sent events). No external assets.
"use strict";
const $ = (id) => document.getElementById(id);
const model = $("model").dataset.model;
let history = [];   // [{role, content}] as sent to the API
let imageUrl = null; // data: URI of the chat's image
let busy = false;

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").appendChild(li);
  li.scrollIntoView({block: "end"});
  return li;
}

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl;
    $("preview").hidden = false;
    newChat(false);
  };
  reader.readAsDataURL(file);
}

function newChat(clearImage) {
  history = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
  if (clearImage) { imageUrl = null; $("preview").hidden = true; $("preview").removeAttribute("src"); }
}

async function ask(question) {
  busy = true;
  $("send").disabled = true;
  addMessage("user", question);
  const first = history.length === 0;
  const content = first && imageUrl
    ? [{type: "image_url", image_url: {url: imageUrl}}, {type: "text", text: question}]
    : question;
  const messages = [...history, {role: "user", content}];
  const out = addMessage("assistant", "");
  let answer = "";
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model, messages, stream: true}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (event === "[DONE]") continue;
        const data = JSON.parse(event);
        if (data.error) throw new Error(data.error.message);
        const delta = data.choices[0].delta.content;
        if (delta) { answer += delta; out.textContent = answer; out.scrollIntoView({block: "end"}); }
      }
    }
    history = [...messages, {role: "assistant", content: answer}];
    $("status").textContent = `answered in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    out.dataset.done = "true";
  } catch (err) {
    out.className = "error";
    out.textContent = `Error: ${err.message}`;
    out.dataset.done = "true";
  } finally {
    busy = false;
    $("send").disabled = false;
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || busy) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("image-input").addEventListener("change", (e) => setImage(e.target.files[0]));
$("new-chat").addEventListener("click", () => newChat(true));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) setImage(item.getAsFile());
});
