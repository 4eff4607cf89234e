// The jobs page: the signed-in owner's jobs, newest first, filtered by status, paged with the
// API's `after` cursor (#/jobs?status=running&after=ftjob-...). While a job shown can still
// change, the page re-reads itself every few seconds.

import { api } from "./client.js";
import { errorBox, h, table, time } from "./dom.js";

export const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
const LIVE = new Set(["validating_files", "queued", "running", "paused"]);
const PAGE = 20;
const REFRESH_MS = 5000;

function progress(job) {
  const p = job.progress;
  if (!p) return "—";
  return `${p.step}/${p.total_steps} (${Math.round(p.percent)}%)`;
}

function jobsHash(params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v)).toString();
  return `#/jobs${query ? `?${query}` : ""}`;
}

const COLUMNS = [
  ["Job", (job) => h("a", { href: `#/jobs/${job.id}` }, job.id)],
  ["Status", (job) => h("span", { class: `status ${job.status}` }, job.substatus ? `${job.status} (${job.substatus})` : job.status)],
  ["Method", (job) => job.method?.type ?? "—"],
  ["Model", (job) => job.model],
  ["Progress", progress],
  ["Created", (job) => time(job.created_at)],
  ["Finished", (job) => time(job.finished_at)],
];

export async function jobsPage(view, params, signal) {
  const status = params.get("status") || "";
  const after = params.get("after") || "";
  const filter = h(
    "select",
    {
      id: "status-filter",
      "aria-label": "Status",
      onchange: (e) => (location.hash = jobsHash({ status: e.target.value })),
    },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)),
  );
  view.append(h("h1", {}, "Jobs"), h("p", { class: "toolbar" }, filter, " ", h("a", { href: "#/new" }, "New job")));

  const query = new URLSearchParams({ limit: String(PAGE) });
  if (status) query.set("status", status);
  if (after) query.set("after", after);
  let page;
  try {
    page = await api(`fine_tuning/jobs?${query}`, { signal });
  } catch (error) {
    if (!signal.aborted) view.append(errorBox(error));
    return;
  }
  // data-status: which filter the rows answer (tests wait for it after a navigation).
  const rows = () =>
    page.data.length
      ? table(COLUMNS, page.data, { id: "jobs", "data-status": status })
      : h("p", { id: "jobs-empty", "data-status": status }, "No jobs.");
  let shown = rows();
  view.append(
    shown,
    h(
      "p",
      { class: "pager" },
      after ? h("a", { href: jobsHash({ status }), id: "first-page" }, "« First page") : null,
      " ",
      page.has_more
        ? h("a", { href: jobsHash({ status, after: page.data.at(-1).id }), id: "next-page" }, "Next page »")
        : null,
    ),
  );

  // The same query again, so the rows stay the same page; only their state moves.
  while (!signal.aborted && page.data.some((job) => LIVE.has(job.status))) {
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
    if (signal.aborted) return;
    try {
      page = await api(`fine_tuning/jobs?${query}`, { signal });
    } catch {
      continue; // a dropped request: the next tick tries again
    }
    const next = rows();
    shown.replaceWith(next);
    shown = next;
  }
}
