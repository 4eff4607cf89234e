// The "new job" form for the common cases: a model, a training file (and a validation file),
// a method and a few hyperparameters; blank means "auto". Anything more (graders, adapters,
// resources) goes through the API, whose error, if any, is shown as it comes.

import { api } from "./client.js";
import { append, errorBox, h } from "./dom.js";
import { METHODS } from "./files.js";

const HYPERPARAMETERS = [
  ["n_epochs", "Epochs", "1"],
  ["batch_size", "Batch size", "1"],
  ["learning_rate_multiplier", "Learning-rate multiplier", "any"],
];

function select(id, label, options, required = true) {
  return h("label", {}, label, " ", h("select", { id, name: id, required }, options));
}

export async function newJobPage(view) {
  let models;
  let files;
  try {
    [models, files] = await Promise.all([api("models"), api("files?purpose=fine-tune&limit=200")]);
  } catch (error) {
    view.append(h("h1", {}, "New job"), errorBox(error));
    return;
  }
  const usable = files.data.filter((f) => f.status === "processed");
  const fileOptions = usable.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id}, ${f.num_examples} rows)`));
  const message = h("div", { id: "new-job-message" });
  const form = h(
    "form",
    { id: "new-job", class: "form", onsubmit: (e) => (e.preventDefault(), submit(e.target)) },
    select("model", "Model", models.data.filter((m) => m.owned_by === "system").map((m) => h("option", { value: m.id }, m.id))),
    select("training_file", "Training file", fileOptions),
    select("validation_file", "Validation file", [h("option", { value: "" }, "none"), ...usable.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`))], false),
    select("method", "Method", METHODS.map((m) => h("option", { value: m }, m))),
    HYPERPARAMETERS.map(([name, label, step]) =>
      h("label", {}, label, " ", h("input", { type: "number", name, id: name, min: "0", step, placeholder: "auto" })),
    ),
    h("label", {}, "Suffix ", h("input", { type: "text", name: "suffix", id: "suffix", maxlength: "64" })),
    h("button", { type: "submit" }, "Create job"),
  );
  append(view, [h("h1", {}, "New job"), usable.length ? null : h("p", {}, "Upload a valid training file first (Files)."), form, message]);

  async function submit(formEl) {
    const data = new FormData(formEl);
    const type = data.get("method");
    const hyperparameters = {};
    for (const [name] of HYPERPARAMETERS) {
      const value = data.get(name);
      if (value !== "") hyperparameters[name] = Number(value);
    }
    const body = {
      model: data.get("model"),
      training_file: data.get("training_file"),
      method: { type, [type]: { hyperparameters } },
    };
    if (data.get("validation_file")) body.validation_file = data.get("validation_file");
    if (data.get("suffix")) body.suffix = data.get("suffix");
    message.replaceChildren();
    try {
      const job = await api("fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      message.append(errorBox(error));
    }
  }
}
