// The page's main loop: polls /v1/plan (states change as models load and unload), /v1/models (the picker) and
// /ui/stats (the live figures), and redraws. Each poll goes through api.js, so a 401 shows the key dialog once.

import { forgetKey, hasKey, json } from "./api.js";
import { initChat, setModels } from "./chat.js";
import { renderPlan } from "./devices.js";
import { scrollsByKeyboard } from "./format.js";
import { renderLive } from "./live.js";

const PLAN_EVERY_MS = 4000;
const STATS_EVERY_MS = 1500;
let lastPlans = null;

function setConnection(text, ok) {
  const status = document.getElementById("connection");
  // A live region: rewriting it with the same words makes some screen readers say them again, every poll.
  if (status.textContent !== text) status.textContent = text;
  status.dataset.ok = ok ? "yes" : "no";
  document.getElementById("forget-key").hidden = !hasKey();
}

// Redraw only what changed: an unchanged panel keeps its text selection, its tables' scroll and its focus.
const drawn = new Map();
function changed(name, value) {
  const text = JSON.stringify(value);
  if (drawn.get(name) === text) return false;
  drawn.set(name, text);
  return true;
}

async function refreshPlan() {
  const [plan, models] = await Promise.all([json("/v1/plan"), json("/v1/models")]);
  lastPlans = plan.data;
  if (changed("plan", plan.data)) renderPlan(lastPlans, document.getElementById("zoom").checked);
  if (changed("models", models.data.map((m) => [m.id, m.status]))) setModels(models.data);
}

async function refreshStats() {
  const stats = await json("/ui/stats");
  if (changed("stats", stats)) renderLive(stats);
}

// setTimeout after each answer rather than setInterval: a slow server never gets a pile of overlapping polls.
function every(ms, work) {
  const tick = async () => {
    try {
      await work();
      setConnection("connected", true);
    } catch (error) {
      setConnection(`cannot reach the server: ${error.message}`, false);
    }
    setTimeout(tick, document.hidden ? ms * 4 : ms);
  };
  tick();
}

initChat();
scrollsByKeyboard(document.querySelector("#placement > .table-wrap"), "Live figures by model");
document.getElementById("zoom").addEventListener("change", (event) => {
  if (lastPlans) renderPlan(lastPlans, event.target.checked);
});
document.getElementById("forget-key").addEventListener("click", () => {
  forgetKey();
  location.reload();
});
every(PLAN_EVERY_MS, refreshPlan);
every(STATS_EVERY_MS, refreshStats);
