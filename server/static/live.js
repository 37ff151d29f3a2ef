// Live figures per model from GET /ui/stats (the gauges of /metrics as JSON): generated tokens/s over the last
// 10 s, waiting requests, busy sequences, and the time to first token, both the mean since start and the mean
// of the requests that started since the previous poll (from the histogram's sum and count).

import { el, formatRate, formatSeconds } from "./format.js";

const previous = new Map(); // model -> {sum, count} of the TTFT histogram at the last poll
const lastTtft = new Map(); // model -> seconds, kept until newer requests arrive

export function renderLive(stats) {
  const body = document.getElementById("live-rows");
  const rows = Object.entries(stats.models).map(([model, figures]) => {
    const count = figures.ttft_count ?? 0;
    const sumS = figures.ttft_sum_s ?? 0;
    const before = previous.get(model);
    if (before && count > before.count) lastTtft.set(model, (sumS - before.sum) / (count - before.count));
    else if (!before && count > 0) lastTtft.set(model, sumS / count);
    previous.set(model, { sum: sumS, count });
    const tr = el("tr");
    tr.dataset.model = model;
    const name = el("th", model);
    name.scope = "row";
    const cell = (key, text) => {
      const td = el("td", text, "num");
      td.dataset.figure = key;
      return td;
    };
    tr.append(
      name,
      cell("generated_tokens_per_s", formatRate(figures.generated_tokens_per_s)),
      cell("waiting", String(figures.waiting ?? 0)),
      cell("sequences_busy", `${figures.sequences_busy ?? 0} of ${figures.sequences ?? 0}`),
      cell("ttft_last", formatSeconds(lastTtft.get(model))),
      cell("ttft_mean", count ? formatSeconds(sumS / count) : "–"),
    );
    return tr;
  });
  body.replaceChildren(...rows);
}
