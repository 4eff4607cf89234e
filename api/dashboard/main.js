// The dashboard's entry: sign-in, hash routing, sign-out.
//
// Routes: #/jobs[?status=&after=], #/jobs/<id>, #/files, #/new. Each page renders into <main>
// and gets an AbortSignal that fires when the user leaves it, which closes its streams.

import { ApiError, api, session, setUnauthorizedHandler } from "./client.js";
import { clear, h } from "./dom.js";
import { filesPage } from "./files.js";
import { jobPage } from "./job.js";
import { jobsPage } from "./jobs.js";
import { newJobPage } from "./new_job.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
let leave = new AbortController();

function signInPage(notice) {
  nav.hidden = true;
  const key = h("input", { type: "password", id: "api-key", name: "key", autocomplete: "off", required: true, placeholder: "sk-alignd-…" });
  const message = h("p", { class: "error", role: "alert", id: "sign-in-error" }, notice ?? "");
  const form = h(
    "form",
    { id: "sign-in", class: "form", onsubmit: (e) => (e.preventDefault(), signIn(key.value.trim(), message)) },
    h("label", {}, "API key ", key),
    h("button", { type: "submit" }, "Sign in"),
  );
  view.append(
    h("h1", {}, "Sign in"),
    h("p", {}, "Sign in with an API key (", h("code", {}, "alignd keys create OWNER"), "). It is kept in this tab only."),
    form,
    message,
  );
  key.focus();
}

async function signIn(key, message) {
  try {
    // Any cheap authenticated call tells a good key from a bad one.
    await api("fine_tuning/jobs?limit=1", { key });
  } catch (error) {
    message.textContent = error instanceof ApiError && error.status === 401 ? error.message : `Cannot sign in: ${error.message}`;
    return;
  }
  session.signIn(key);
  if (location.hash.startsWith("#/signin") || !location.hash) location.hash = "#/jobs";
  else route();
}

function signOut() {
  session.signOut();
  location.hash = "#/signin";
  route();
}

async function route() {
  leave.abort();
  leave = new AbortController();
  clear(view);
  if (!session.key()) {
    signInPage();
    return;
  }
  nav.hidden = false;
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean);
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("active", link.dataset.page === parts[0]);
  if (parts[0] === "jobs" && parts[1]) await jobPage(view, decodeURIComponent(parts[1]), leave.signal);
  else if (parts[0] === "files") await filesPage(view);
  else if (parts[0] === "new") await newJobPage(view);
  else if (parts[0] === "jobs") await jobsPage(view, params, leave.signal);
  else location.hash = "#/jobs";
}

setUnauthorizedHandler(() => {
  // The key was revoked, or is unknown to this server: back to sign-in, saying why.
  session.signOut();
  leave.abort();
  clear(view);
  signInPage("Your API key was refused; sign in again.");
});
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
route();
