// One job: its state and controls, live metric curves, events, checkpoints with adapter
// downloads, and its spec. Curves and events follow the job's SSE streams; the job object
// itself is re-read every few seconds while the job can still change.

import { MetricCharts } from "./charts.js";
import { ApiError, api, download, stream } from "./client.js";
import { errorBox, fill, h, number, table, time } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;
const MAX_EVENTS_SHOWN = 200;
// The fields of the job object that say what it trains, as the API resolved them.
const SPEC_FIELDS = [
  "model", "training_file", "validation_file", "method", "hyperparameters", "adapter",
  "max_seq_len", "resources", "seed", "suffix", "metadata", "integrations",
];

export async function jobPage(view, jobId, signal) {
  let job;
  try {
    job = await api(`fine_tuning/jobs/${encodeURIComponent(jobId)}`, { signal });
  } catch (error) {
    // Another owner's job is a 404 like a missing one: the page cannot tell them apart either.
    const notFound = error instanceof ApiError && error.status === 404;
    view.append(
      h("h1", {}, notFound ? "Job not found" : "Job"),
      notFound ? h("p", { id: "not-found" }, `There is no job ${jobId} for this key.`) : errorBox(error),
    );
    return;
  }

  const header = h("section", { id: "job-header" });
  const controls = h("p", { class: "toolbar", id: "controls" });
  const message = h("p", { class: "error", role: "alert", hidden: true });
  const charts = h("div", { id: "charts", class: "charts" });
  const events = h("ol", { id: "events", class: "events" });
  const checkpoints = h("div", { id: "checkpoints" });
  const spec = h("pre", { id: "spec" });
  const submitted = h("pre", { id: "spec-submitted" }, "…");
  view.append(
    header, controls, message,
    h("h2", {}, "Metrics"), charts,
    h("div", { class: "columns" },
      h("section", {}, h("h2", {}, "Events"), events),
      h("section", {}, h("h2", {}, "Checkpoints"), checkpoints, h("h2", {}, "Spec (as submitted)"), submitted, h("h2", {}, "Spec (as resolved by the API)"), spec),
    ),
  );

  // The body as its owner sent it never changes: read once (null for jobs older than it).
  api(`fine_tuning/jobs/${encodeURIComponent(jobId)}/spec`, { signal }).then(
    (body) => { submitted.textContent = body.submitted ? JSON.stringify(body.submitted, null, 2) : "(not kept for this job)"; },
    (error) => { if (!signal.aborted) submitted.textContent = `(could not be read: ${error.message})`; },
  );

  const curves = new MetricCharts(charts);
  signal.addEventListener("abort", () => curves.destroy());

  function show(next) {
    job = next;
    spec.textContent = JSON.stringify(Object.fromEntries(SPEC_FIELDS.filter((f) => f in job).map((f) => [f, job[f]])), null, 2);
    fill(header,
      h("h1", {}, job.id),
      h("dl", { class: "facts" },
        fact("Status", h("span", { id: "job-status", class: `status ${job.status}` }, job.status)),
        fact("Detail", job.substatus ?? "—"),
        fact("Method", job.method?.type ?? "—"),
        fact("Model", job.model),
        fact("Fine-tuned model", job.fine_tuned_model ?? "—"),
        fact("Progress", job.progress ? `${job.progress.step}/${job.progress.total_steps} (${job.progress.percent}%)` : "—"),
        fact("Created", time(job.created_at)),
        fact("Finished", time(job.finished_at)),
        job.error ? fact("Error", [job.error.code, job.error.message].filter(Boolean).join(": ")) : null,
      ),
    );
    // Rebuilt only when they change, so that a poll never swaps a button under the pointer.
    const state = JSON.stringify([job.status, job.substatus, job.result_files]);
    if (state === controls.dataset.state) return;
    controls.dataset.state = state;
    const running = ["running", "queued", "validating_files"].includes(job.status);
    fill(controls,
      action("Pause", "pause", running && job.substatus !== "pausing"),
      action("Resume", "resume", job.status === "paused" || job.status === "failed"),
      action("Cancel", "cancel", !TERMINAL.has(job.status) && job.substatus !== "cancelling"),
      job.status === "succeeded"
        ? h("button", { id: "download-adapter", onclick: () => save(`fine_tuning/jobs/${job.id}/adapter`, `${job.id}-adapter.tar`) }, "Download adapter")
        : null,
      ...job.result_files.map((id) =>
        h("button", { class: "results", onclick: () => save(`files/${id}/content`, `${job.id}_results.csv`) }, "Results CSV"),
      ),
    );
  }

  function fact(name, value) {
    return [h("dt", {}, name), h("dd", {}, value)];
  }

  function action(label, verb, enabled) {
    return h("button", { id: `${verb}-job`, disabled: !enabled, onclick: () => act(verb) }, label);
  }

  async function act(verb) {
    message.hidden = true;
    try {
      show(await api(`fine_tuning/jobs/${job.id}/${verb}`, { method: "POST" }));
    } catch (error) {
      message.textContent = error.message;
      message.hidden = false;
    }
  }

  async function save(path, filename) {
    message.hidden = true;
    try {
      await download(path, filename);
    } catch (error) {
      message.textContent = error.message;
      message.hidden = false;
    }
  }

  async function loadCheckpoints() {
    const page = await api(`fine_tuning/jobs/${job.id}/checkpoints?limit=100`, { signal });
    const columns = [
      ["Step", (c) => String(c.step_number)],
      ["Metrics", (c) => Object.entries(c.metrics).filter(([k]) => k !== "step").map(([k, v]) => `${k}=${number(v)}`).join("  ")],
      ["Saved", (c) => time(c.created_at)],
      ["Adapter", (c) => h("button", { class: "download-checkpoint", onclick: () => save(`fine_tuning/jobs/${job.id}/checkpoints/${c.id}/adapter`, `${c.id}-adapter.tar`) }, "Download")],
    ];
    fill(checkpoints, page.data.length ? table(columns, page.data) : h("p", {}, "No checkpoints yet."));
    // Validation runs only where a checkpoint is saved, so its metrics live on the checkpoints,
    // not in the metrics stream: they join the curves as points at those steps.
    for (const c of page.data) {
      const valid = Object.entries(c.metrics).filter(([k]) => k.startsWith("valid_"));
      if (valid.length) curves.add({ step: c.step_number, ...Object.fromEntries(valid) });
    }
  }

  function addEvent(event) {
    const kind = event.type === "metrics" ? "metrics" : event.level;
    events.prepend(h("li", { class: kind }, h("time", {}, time(event.created_at)), " ", event.message));
    while (events.children.length > MAX_EVENTS_SHOWN) events.lastChild.remove();
    if (event.message.startsWith("Checkpoint")) loadCheckpoints().catch(() => {});
  }

  show(job);
  loadCheckpoints().catch((error) => checkpoints.append(errorBox(error)));

  const base = `fine_tuning/jobs/${job.id}`;
  const follow = (path, onData) =>
    stream(path, (m) => (m.event === "done" ? show(JSON.parse(m.data)) : onData(JSON.parse(m.data))), signal).catch(
      (error) => !signal.aborted && view.append(errorBox(error)),
    );
  follow(`${base}/metrics/stream`, (point) => curves.add(point));
  follow(`${base}/events/stream`, addEvent).then(() => !signal.aborted && loadCheckpoints().catch(() => {}));

  // Status, substatus and progress change without an event for each: poll while live.
  while (!signal.aborted && !TERMINAL.has(job.status)) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (signal.aborted) return;
    try {
      show(await api(base, { signal }));
    } catch {
      // a dropped request: the next poll tries again
    }
  }
}
