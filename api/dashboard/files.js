// The files page: upload a dataset and read its validation report (line by line), list the
// owner's files, delete one.

import { api } from "./client.js";
import { errorBox, fill, h, table, time } from "./dom.js";

export const METHODS = ["supervised", "dpo", "reinforcement", "reward_model", "kto", "orpo", "simpo", "grpo", "rloo", "ppo"];

export async function filesPage(view) {
  const input = h("input", { type: "file", id: "upload-file", name: "file", required: true, accept: ".jsonl,.json,.txt" });
  const method = h(
    "select",
    { id: "upload-method", "aria-label": "Check against method" },
    h("option", { value: "" }, "any method"),
    METHODS.map((m) => h("option", { value: m }, m)),
  );
  const report = h("section", { id: "upload-report", "aria-live": "polite" });
  const list = h("div", { id: "files-list" });
  const form = h(
    "form",
    { id: "upload-form", class: "toolbar", onsubmit: (e) => (e.preventDefault(), upload()) },
    h("label", {}, "Dataset (JSONL) ", input),
    " ",
    h("label", {}, "for ", method),
    " ",
    h("button", { type: "submit" }, "Upload"),
  );
  view.append(h("h1", {}, "Files"), form, report, h("h2", {}, "Your files"), list);

  async function upload() {
    const file = input.files[0];
    if (!file) return;
    const body = new FormData();
    body.append("purpose", "fine-tune"); // purpose first, as OpenAI's clients send it
    body.append("file", file, file.name);
    fill(report, h("p", {}, `Uploading ${file.name}…`));
    try {
      const uploaded = await api("files", { method: "POST", form: body });
      const checked = await api(`files/${uploaded.id}/validate`, {
        method: "POST",
        json: method.value ? { method: method.value } : {},
      });
      showReport(uploaded, checked);
      form.reset();
    } catch (error) {
      fill(report, errorBox(error));
    }
    await refresh();
  }

  function showReport(file, checked) {
    const ok = file.status === "processed" && checked.ok;
    fill(report,
      h("p", { id: "upload-status", class: ok ? "ok" : "error", dataset: { file: file.id } },
        `${file.filename} (${file.id}): ${file.status}`,
        checked.format ? `, ${checked.format} format` : "",
        `, ${checked.num_examples} valid rows`,
        checked.error_count ? `, ${checked.error_count} errors` : ""),
      file.status_details ? h("p", { class: "error", id: "status-details" }, file.status_details) : null,
      checked.errors.length
        ? table(
            [
              ["Line", (e) => (e.line === null ? "file" : String(e.line))],
              ["Field", (e) => e.field ?? ""],
              ["Problem", (e) => e.message],
            ],
            checked.errors,
            { id: "validation-errors" },
          )
        : null,
      checked.warnings?.length ? h("ul", { class: "warnings" }, checked.warnings.map((w) => h("li", {}, typeof w === "string" ? w : JSON.stringify(w)))) : null,
    );
  }

  async function remove(file) {
    if (!confirm(`Delete ${file.filename} (${file.id})?`)) return;
    try {
      await api(`files/${file.id}`, { method: "DELETE" });
    } catch (error) {
      list.prepend(errorBox(error));
      return;
    }
    await refresh();
  }

  async function refresh() {
    let page;
    try {
      page = await api("files?limit=200");
    } catch (error) {
      fill(list, errorBox(error));
      return;
    }
    const columns = [
      ["File", (f) => f.id],
      ["Name", (f) => f.filename],
      ["Purpose", (f) => f.purpose],
      ["Status", (f) => h("span", { class: `status ${f.status}` }, f.status)],
      ["Rows", (f) => (f.num_examples ?? "—").toString()],
      ["Bytes", (f) => String(f.bytes)],
      ["Uploaded", (f) => time(f.created_at)],
      ["", (f) => h("button", { class: "delete-file", onclick: () => remove(f) }, "Delete")],
    ];
    fill(list, page.data.length ? table(columns, page.data, { id: "files" }) : h("p", {}, "No files."));
  }

  await refresh();
}
