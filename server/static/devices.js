// The split, drawn from GET /v1/plan: one card per model (state, split mode, tensor_split, predicted tokens/s)
// and one card per device with two stacked bars, what the tuner predicted and what llama.cpp allocated, each
// cut into weights / KV / compute / overhead per model, then free. The table under the bars holds the same
// numbers in bytes (data-bytes), so the drawing can be checked against the plan.

import { el, formatBytes, formatRate, scrollsByKeyboard } from "./format.js";

const PARTS = [
  ["weights", "weights"],
  ["kv", "KV"],
  ["compute", "compute"],
  ["overhead", "overhead"],
];
const STATE_WORDS = { ready: "loaded", planned: "loading", loading: "loading", unloaded: "unloaded", failed: "failed" };

/** Redraw both panels from /v1/plan's `data`; `zoom` scales the bars to the models' share, not the card. */
export function renderPlan(plans, zoom) {
  renderModels(plans);
  renderDevices(plans, zoom);
}

function renderModels(plans) {
  const list = document.getElementById("models");
  list.replaceChildren(
    ...plans.map((entry, index) => {
      const plan = entry.plan;
      const card = el("li", null, `model-card model-${index % 4}`);
      card.dataset.model = entry.model;
      const head = el("div", null, "model-head");
      head.append(el("span", null, "swatch"), el("strong", entry.model), stateBadge(entry.status));
      const facts = el("dl", null, "facts");
      const fact = (name, value, key) => {
        const dd = el("dd", value);
        dd.dataset.fact = key;
        facts.append(el("dt", name), dd);
      };
      fact("split mode", plan.split_mode, "split_mode");
      fact("tensor_split", plan.tensor_split ? plan.tensor_split.join(", ") : "–", "tensor_split");
      fact("layers on devices", `${plan.n_gpu_layers} of ${plan.n_layer + 1}`, "n_gpu_layers");
      fact("context", `${plan.n_ctx.toLocaleString("en")} cells, ${plan.n_seq_max} sequences`, "n_ctx");
      fact("predicted", `${formatRate(plan.predicted_tokens_per_s)} tokens/s`, "predicted_tokens_per_s");
      card.append(head, facts);
      if (entry.error) card.append(el("p", entry.error, "error"));
      return card;
    }),
  );
}

function stateBadge(status) {
  const badge = el("span", STATE_WORDS[status] || status, `badge state-${STATE_WORDS[status] || status}`);
  badge.dataset.state = status;
  return badge;
}

// Devices by name across every model's plan, in plan order, with the host's RAM last.
function collectDevices(plans) {
  const devices = new Map();
  for (const [index, entry] of plans.entries()) {
    for (const device of entry.plan.devices) {
      if (!devices.has(device.name)) {
        devices.set(device.name, { name: device.name, kind: device.kind, capacity: 0, rows: [] });
      }
      const slot = devices.get(device.name);
      // Models are planned one after another into what the earlier ones leave: the first saw the most.
      slot.capacity = Math.max(slot.capacity, device.free_bytes);
      slot.rows.push({ entry, index, device, predicted: device, actual: device.actual_bytes });
    }
    const host = entry.plan.host;
    if (!devices.has("host")) devices.set("host", { name: "host", kind: "host RAM", capacity: 0, rows: [] });
    const hostActual = entry.memory?.host?.actual_bytes;
    devices.get("host").rows.push({
      entry, index, device: { layers: host.layers, holds_output: false, host: true },
      predicted: { ...host, overhead_bytes: 0 },
      actual: hostActual === null || hostActual === undefined ? null : { total_bytes: hostActual },
    });
  }
  const host = devices.get("host");
  devices.delete("host");
  return host ? [...devices.values(), host] : [...devices.values()];
}

function renderDevices(plans, zoom) {
  const container = document.getElementById("devices");
  container.replaceChildren(...collectDevices(plans).map((device) => deviceCard(device, zoom)));
}

function deviceCard(device, zoom) {
  const card = el("article", null, "device-card");
  card.dataset.device = device.name;
  const title = el("h3", device.name === "host" ? "Host RAM" : device.name);
  if (device.name !== "host") title.append(" ", el("span", device.kind, "kind"));
  card.append(title);
  const predictedTotal = sum(device.rows.map((row) => row.predicted.total_bytes));
  const actualTotal = sum(device.rows.map((row) => row.actual?.total_bytes ?? 0));
  // Scale: the device's memory (free before any model), or, zoomed or without a known size, the models' share.
  const scale = zoom || !device.capacity ? Math.max(predictedTotal, actualTotal, 1) : device.capacity;
  card.append(
    bar("predicted", device, (row) => row.predicted, scale),
    bar("allocated", device, (row) => row.actual, scale),
  );
  if (device.capacity) {
    card.append(el("p", `${formatBytes(device.capacity)} free before loading; ${formatBytes(device.capacity - predictedTotal)} left as planned`, "note"));
  }
  card.append(scrollsByKeyboard(table(device), `${title.textContent}: bytes by model`));
  return card;
}

function bar(label, device, pick, scale) {
  const row = el("div", null, "bar-row");
  const track = el("div", null, "bar");
  track.dataset.bar = label;
  // What a screen reader says for the bar: every figure drawn in it, model by model and part by part, in the
  // words and units of the table ("smol 85.3 MiB (not loaded): weights 60.0 MiB, KV 24.0 MiB; free 7.83 GiB").
  const spoken = [];
  let used = 0;
  for (const item of device.rows) {
    const values = pick(item);
    if (!values) continue;
    const loaded = item.entry.status === "ready";
    // An allocation known only as a total (the host's RAM) is drawn as one segment.
    const parts = values.weights_bytes === undefined ? [["total", "total", values.total_bytes]]
      : PARTS.map(([key, word]) => [key, word, values[`${key}_bytes`] ?? 0]);
    const drawn = [];
    for (const [key, word, bytes] of parts) {
      if (!bytes) continue;
      used += bytes;
      const segment = el("span", null, `segment part-${key} model-${item.index % 4}${loaded ? "" : " idle"}`);
      segment.style.width = `${(100 * bytes) / scale}%`;
      segment.title = `${item.entry.model}: ${word} ${formatBytes(bytes)}`;
      track.append(segment);
      if (key !== "total") drawn.push(`${word} ${formatBytes(bytes)}`);
    }
    const state = loaded ? "" : " (not loaded)"; // faded on screen
    const detail = drawn.length ? `: ${drawn.join(", ")}` : "";
    spoken.push(`${item.entry.model} ${formatBytes(sum(parts.map((p) => p[2])))}${state}${detail}`);
  }
  if (device.capacity && scale === device.capacity) {
    const free = el("span", null, "segment part-free");
    free.style.width = `${Math.max(0, (100 * (device.capacity - used)) / scale)}%`;
    free.title = `free ${formatBytes(device.capacity - used)}`;
    track.append(free);
    spoken.push(`free ${formatBytes(device.capacity - used)}`);
  }
  if (used) spoken.push(`total ${formatBytes(used)}`);
  track.setAttribute("role", "img");
  track.setAttribute("aria-label", `${label}: ${(used ? spoken : ["nothing yet", ...spoken]).join("; ")}`);
  row.append(el("span", label, "bar-label"), track, el("span", used ? formatBytes(used) : "–", "bar-total"));
  return row;
}

function table(device) {
  const wrap = el("div", null, "table-wrap");
  const tableEl = el("table");
  const head = el("tr");
  for (const name of ["model", "layers", "weights", "KV", "compute", "overhead", "predicted", "allocated"]) {
    const th = el("th", name);
    th.scope = "col";
    head.append(th);
  }
  const thead = el("thead");
  thead.append(head);
  const tbody = el("tbody");
  for (const item of device.rows) {
    const tr = el("tr");
    tr.dataset.model = item.entry.model;
    const name = el("th", null);
    name.scope = "row";
    name.append(el("span", null, `swatch model-${item.index % 4}`), item.entry.model);
    tr.append(name, el("td", layers(item.device, item.entry.plan.n_layer), "layers"));
    const cell = (part, bytes) => {
      const td = el("td", formatBytes(bytes), "num");
      td.dataset.part = part;
      if (bytes !== null && bytes !== undefined) td.dataset.bytes = String(bytes);
      tr.append(td);
    };
    for (const [key] of PARTS) cell(key, item.predicted[`${key}_bytes`]);
    cell("total", item.predicted.total_bytes);
    cell("actual", item.actual ? item.actual.total_bytes : null);
    tbody.append(tr);
  }
  tableEl.append(thead, tbody);
  wrap.append(tableEl);
  return wrap;
}

// The tuner's wording (tuner/render.py): "0–18", "19–29 + output"; layer n_layer is the output layer.
function layers(device, nLayer) {
  if (!device.layers) return device.host ? "embeddings" : "–"; // the token embeddings always stay in RAM
  const [first, last] = device.layers;
  let text = first < nLayer ? `${first}–${Math.min(last, nLayer - 1)}` : "";
  if (device.holds_output) text = text ? `${text} + output` : "output";
  return text;
}

function sum(values) {
  return values.reduce((a, b) => a + (b || 0), 0);
}
