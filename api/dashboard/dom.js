// Building the page without innerHTML: every string goes in as a text node, so data from the
// API (file names, event messages, metadata) can never become markup.

// h("a", {href: "#/jobs", class: "x", onclick: fn, dataset: {id: "1"}}, "text", child, ...)
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "class") el.className = value;
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// Replace el's children; like h(), it skips null, undefined and false (the DOM's own append
// would write them out as text).
export function fill(el, ...children) {
  return append(clear(el), children);
}

export function time(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
}

export function number(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1e-3 && Math.abs(value) < 1e5 ? value.toFixed(4) : value.toExponential(3);
}

// A table of rows; columns: [[heading, row => cell content], ...].
export function table(columns, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, columns.map(([heading]) => h("th", {}, heading)))),
    h(
      "tbody",
      {},
      rows.map((row) => h("tr", { dataset: { id: row.id ?? "" } }, columns.map(([, cell]) => h("td", {}, cell(row))))),
    ),
  );
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}
