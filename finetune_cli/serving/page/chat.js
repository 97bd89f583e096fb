// The chat page of `ftune serve`: talks to the server's own OpenAI API (same origin, relative URLs so a reverse
// proxy may mount it under a path). Every text from a model, a user or the server is set with textContent, never
// as HTML. The API key lives in sessionStorage (this tab only) and travels in the Authorization header only.
"use strict";

(() => {
  const KEY_STORE = "ftune.apiKey";
  const $ = (id) => document.getElementById(id);
  const ui = {
    server: $("server"), keyform: $("keyform"), key: $("key"), newChat: $("new"),
    model: $("model"), compare: $("compare"), modelB: $("model-b"), modelBField: $("model-b-field"),
    system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
    conversation: $("conversation"), empty: $("empty"), status: $("status"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  };
  const state = { needKey: false, feedback: false, models: [], turns: [], active: new Set() };

  // --- small helpers ---------------------------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(text, kind) {
    ui.status.textContent = text || "";
    ui.status.className = "status" + (kind ? " " + kind : "");
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch (e) {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) {
      /* storage disabled: the key lives in the input only */
    }
  }

  function currentKey() {
    return storedKey() || ui.key.value.trim();
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = state.needKey ? currentKey() : "";
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorOf(response) {
    let message = "";
    try {
      const body = await response.json();
      message = (body && body.error && body.error.message) || "";
    } catch (e) {
      /* not JSON */
    }
    return new HttpError(response.status, `${response.status} ${response.statusText || "error"}` +
      (message ? `: ${message}` : ""));
  }

  function askForKey(message) {
    state.needKey = true;
    storeKey("");
    ui.keyform.hidden = false;
    ui.keyform.classList.add("wanted");
    ui.key.value = "";
    ui.key.focus();
    setStatus(message, "error");
  }

  // Every /v1 call: a 401 asks for the key again.
  async function api(path, options) {
    const response = await fetch(path, { cache: "no-store", credentials: "omit", ...options });
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401) {
      askForKey(`The server refused the API key (${error.message}). Enter it again.`);
    }
    throw error;
  }

  // --- start-up: /health, the key, /v1/models ------------------------------------------------------------------

  async function start() {
    let health;
    try {
      const response = await fetch("health", { cache: "no-store", credentials: "omit" });
      if (!response.ok) throw await errorOf(response);
      health = await response.json();
    } catch (e) {
      setStatus(`Cannot reach the server: ${e.message}`, "error");
      return;
    }
    state.needKey = !!health.api_key;
    state.feedback = !!health.feedback;
    ui.keyform.hidden = !state.needKey;
    const names = Array.isArray(health.models) ? health.models : [];
    ui.server.textContent = `${names.length} model${names.length === 1 ? "" : "s"}` +
      (state.feedback ? " · feedback on" : "");
    if (state.needKey && !storedKey()) {
      ui.keyform.classList.add("wanted");
      setStatus("This server needs an API key: enter it above (it stays in this tab only).", "info");
      ui.key.focus();
      return;
    }
    if (state.needKey) ui.key.value = storedKey();
    await loadModels();
  }

  async function loadModels() {
    let body;
    try {
      body = await (await api("v1/models", { headers: headers(false) })).json();
    } catch (e) {
      if (e.status !== 401) setStatus(`Cannot list the models: ${e.message}`, "error");
      return;
    }
    ui.keyform.classList.remove("wanted");
    state.models = (body.data || []).map((m) => String(m.id));
    fill(ui.model, state.models, ui.model.value || state.models[0]);
    fill(ui.modelB, state.models, ui.modelB.value || state.models[1] || state.models[0]);
    setStatus(state.models.length ? "" : "The server serves no models.", state.models.length ? "" : "error");
    updateControls();
    ui.prompt.focus();
  }

  function fill(select, names, chosen) {
    select.replaceChildren(...names.map((name) => {
      const option = el("option", "", name);
      option.value = name;
      return option;
    }));
    if (names.includes(chosen)) select.value = chosen;
  }

  // --- the conversation ------------------------------------------------------------------------------------------

  // The messages a column sends: the system prompt, then each earlier turn whose reply in that column was kept.
  function history(side) {
    const messages = [];
    const system = ui.system.value;
    if (system.trim()) messages.push({ role: "system", content: system });
    for (const turn of state.turns) {
      const reply = turn.replies[side];
      if (reply && (reply.state === "done" || (reply.state === "stopped" && reply.text))) {
        messages.push({ role: "user", content: turn.user }, { role: "assistant", content: reply.text });
      }
    }
    return messages;
  }

  function settings() {
    const out = {};
    const t = ui.temperature.value.trim();
    if (t !== "") out.temperature = Number(t);
    const m = ui.maxTokens.value.trim();
    if (m !== "") out.max_tokens = Number(m);
    return out;
  }

  function checkSettings(s) {
    if ("temperature" in s && !(s.temperature >= 0 && s.temperature <= 2)) return "Temperature must be 0 to 2.";
    if ("max_tokens" in s && !(Number.isInteger(s.max_tokens) && s.max_tokens >= 1)) {
      return "Max tokens must be a whole number, 1 or more.";
    }
    return "";
  }

  async function send() {
    const text = ui.prompt.value;
    if (!text.trim() || state.active.size) return;
    if (state.needKey && !currentKey()) {
      askForKey("Enter the server's API key first.");
      return;
    }
    const models = ui.compare.checked ? [ui.model.value, ui.modelB.value] : [ui.model.value];
    if (models.some((m) => !m)) {
      setStatus("No model to send to: the model list did not load.", "error");
      return;
    }
    const extra = settings();
    const problem = checkSettings(extra);
    if (problem) {
      setStatus(problem, "error");
      return;
    }
    const bodies = models.map((model, side) => ({
      model, messages: [...history(side), { role: "user", content: text }], stream: true,
      stream_options: { include_usage: true }, ...extra,
    }));
    const turn = addTurn(text, models);
    // The server compares two replies only when they answer the same messages (the columns' histories agree).
    turn.comparable = bodies.length > 1 && JSON.stringify(bodies[0].messages) === JSON.stringify(bodies[1].messages);
    ui.prompt.value = "";
    setStatus("");
    await Promise.all(turn.replies.map((reply, side) => stream(reply, bodies[side])));
    const failed = turn.replies.filter((r) => r.state === "error" && !r.text && !r.id);
    if (failed.length === turn.replies.length) {  // nothing came back: take the turn back, keep the text to resend
      removeTurn(turn);
      if (!ui.prompt.value) ui.prompt.value = text;
    }
    updateControls();
  }

  function addTurn(text, models) {
    ui.empty.hidden = true;
    const node = el("section", "turn");
    const user = el("div", "msg user");
    user.append(el("div", "bubble", text));
    user.dataset.testid = "user";
    const pair = el("div", "replies" + (models.length > 1 ? " pair" : ""));
    node.append(user, pair);
    const turn = { user: text, node, replies: [], better: null };
    models.forEach((model, side) => {
      const reply = { turn, side, model, id: null, text: "", state: "streaming", finish: null, rating: 0 };
      reply.node = replyNode(reply, models.length > 1);
      pair.append(reply.node);
      turn.replies.push(reply);
    });
    state.turns.push(turn);
    ui.conversation.append(node);
    scrollDown(true);
    return turn;
  }

  function removeTurn(turn) {
    state.turns = state.turns.filter((t) => t !== turn);
    turn.node.remove();
    ui.empty.hidden = state.turns.length > 0;
  }

  function replyNode(reply, paired) {
    const node = el("article", "reply streaming");
    node.dataset.testid = "reply";
    node.dataset.model = reply.model;
    node.dataset.state = reply.state;
    const head = el("header", "reply-head");
    if (paired) head.append(el("span", "side", reply.side === 0 ? "A" : "B"));
    head.append(el("span", "who", reply.model));
    reply.meta = el("span", "meta", "waiting…");  // a model's requests wait while another model's batch decodes
    head.append(reply.meta);
    reply.body = el("div", "text");
    reply.tools = el("footer", "tools");
    reply.tools.hidden = true;
    node.append(head, reply.body, reply.tools);
    return node;
  }

  function setState(reply, value, meta) {
    reply.state = value;
    reply.node.dataset.state = value;
    reply.node.classList.toggle("streaming", value === "streaming");
    reply.node.classList.toggle("failed", value === "error");
    reply.node.classList.toggle("stopped", value === "stopped");
    if (meta !== undefined) reply.meta.textContent = meta;
  }

  function scrollDown(force) {
    const c = ui.conversation;
    if (force || c.scrollHeight - c.scrollTop - c.clientHeight < 120) c.scrollTop = c.scrollHeight;
  }

  // --- streaming -------------------------------------------------------------------------------------------------

  async function stream(reply, body) {
    const controller = new AbortController();
    state.active.add(controller);
    updateControls();
    const started = performance.now();
    try {
      const response = await api("v1/chat/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let finished = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (onEvent(reply, event)) finished = true;
        }
      }
      if (!finished) throw new Error("the reply ended before the server finished it");
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const tokens = reply.tokens ? `${reply.tokens} tokens · ` : "";
      const cut = reply.finish === "length" ? " · cut at max tokens" : "";
      setState(reply, "done", `${tokens}${seconds} s${cut}`);
      showTools(reply.turn);
    } catch (e) {
      if (e.name === "AbortError") {
        setState(reply, "stopped", "stopped");
      } else {
        setState(reply, "error", "failed");
        if (e.status !== 401) setStatus(`${reply.model}: ${e.message}`, "error");
      }
    } finally {
      state.active.delete(controller);
      updateControls();
    }
  }

  // One server-sent event; true once the reply is complete. An error event throws.
  function onEvent(reply, event) {
    const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return false;
    if (data === "[DONE]") return reply.finish !== null;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`error while generating: ${chunk.error.message || "unknown error"}`);
    if (chunk.id && !reply.id) {
      reply.id = String(chunk.id);
      reply.node.dataset.id = reply.id;
    }
    if (chunk.usage && Number.isInteger(chunk.usage.completion_tokens)) reply.tokens = chunk.usage.completion_tokens;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return false;
    const piece = choice.delta && choice.delta.content;
    if (piece) {
      if (!reply.text) reply.meta.textContent = "";
      reply.text += piece;
      reply.body.textContent = reply.text;
      scrollDown(false);
    }
    if (choice.finish_reason) reply.finish = String(choice.finish_reason);
    return false;
  }

  function stopAll() {
    for (const controller of state.active) controller.abort();
  }

  // --- feedback --------------------------------------------------------------------------------------------------

  function rated(reply) {
    return reply.state === "done" && reply.id;
  }

  function showTools(turn) {
    if (!state.feedback) return;
    const done = turn.replies.length > 1 && turn.replies.every(rated);
    const paired = done && turn.comparable;
    for (const reply of turn.replies) {
      if (!rated(reply)) continue;
      const tools = reply.tools;
      tools.replaceChildren();
      reply.up = toolButton("up", icon(THUMB_UP), "Good reply", () => rate(reply, 1));
      reply.down = toolButton("down", icon(THUMB_DOWN), "Bad reply", () => rate(reply, -1));
      tools.append(reply.up, reply.down);
      if (paired) {
        const other = turn.replies[1 - reply.side];
        reply.better = toolButton("better", "This one is better", "Prefer this reply to the other one",
          () => prefer(reply, other));
        reply.better.classList.add("better");
        tools.append(reply.better);
      } else if (done) {
        const note = el("span", "note", "not comparable");
        note.title = "The two columns' earlier replies differ, so these answer different conversations. " +
          "Start a new chat to compare again.";
        tools.append(note);
      }
      tools.hidden = false;
      paint(reply);
    }
  }

  // Feather's thumbs-up/-down outlines (MIT): drawn as SVG, since a system may lack emoji fonts.
  const THUMB_UP = "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2" +
    "v-7a2 2 0 0 1 2-2h3";
  const THUMB_DOWN = "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 " +
    "2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17";

  function icon(d) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    svg.append(path);
    return svg;
  }

  function toolButton(testid, label, title, onClick) {
    const button = el("button", "tool");
    button.append(label);
    button.type = "button";
    button.title = title;
    button.setAttribute("aria-label", title);
    button.setAttribute("aria-pressed", "false");
    button.dataset.testid = testid;
    button.addEventListener("click", onClick);
    return button;
  }

  function press(button, on) {
    if (!button) return;
    button.classList.toggle("selected", on);
    button.setAttribute("aria-pressed", on ? "true" : "false");
  }

  function paint(reply) {
    press(reply.up, reply.rating === 1);
    press(reply.down, reply.rating === -1);
    press(reply.better, reply.turn.better === reply.side);
  }

  async function postFeedback(body, buttons) {
    buttons.forEach((b) => b && (b.disabled = true));
    try {
      await api("v1/feedback", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
      return true;
    } catch (e) {
      if (e.status !== 401) setStatus(`Feedback not saved: ${e.message}`, "error");
      return false;
    } finally {
      buttons.forEach((b) => b && (b.disabled = false));
    }
  }

  async function rate(reply, rating) {
    if (await postFeedback({ id: reply.id, rating }, [reply.up, reply.down])) {
      reply.rating = rating;
      paint(reply);
      setStatus(rating > 0 ? "Thanks: rated good." : "Thanks: rated bad.", "info");
    }
  }

  async function prefer(reply, other) {
    const buttons = [reply.better, other.better];
    if (await postFeedback({ id: reply.id, better_than: other.id }, buttons)) {
      reply.turn.better = reply.side;
      paint(reply);
      paint(other);
      setStatus(`Thanks: ${reply.model} (${reply.side === 0 ? "A" : "B"}) preferred.`, "info");
    }
  }

  // --- controls --------------------------------------------------------------------------------------------------

  function updateControls() {
    const busy = state.active.size > 0;
    ui.send.disabled = busy || !state.models.length;
    ui.stop.disabled = !busy;
    ui.compare.disabled = busy;
    ui.newChat.disabled = busy;
    ui.modelBField.hidden = !ui.compare.checked;
    document.body.classList.toggle("comparing", ui.compare.checked);
  }

  function newChat() {
    if (state.active.size) return;
    for (const turn of [...state.turns]) removeTurn(turn);
    setStatus("");
    ui.prompt.focus();
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stopAll);
  ui.newChat.addEventListener("click", newChat);
  ui.compare.addEventListener("change", () => {
    if (state.turns.length) {
      newChat();
      setStatus(ui.compare.checked ? "Side by side: a new conversation, each message goes to both models."
        : "A new conversation with one model.", "info");
    }
    updateControls();
  });
  ui.keyform.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.key.value.trim();
    if (!key) {
      askForKey("Enter the server's API key.");
      return;
    }
    storeKey(key);
    setStatus("Checking the key…", "info");
    loadModels();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.active.size) stopAll();
  });

  if (window.matchMedia("(max-width: 860px)").matches) $("settings").open = false;  // small screens: the chat first
  updateControls();
  start();
})();
