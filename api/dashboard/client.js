// Talking to /v1 with the signed-in key: JSON calls, downloads and server-sent event streams.
//
// The key lives in sessionStorage only (gone when the tab closes; sign out clears it). Every
// call sends it as a bearer header, which is all /v1 accepts; so downloads go through fetch()
// and a blob, and streams through fetch() with a streaming reader, not EventSource (which
// cannot send a header).

const KEY = "alignd.key";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// Called with the ApiError of any 401, so that the app can send the user back to sign in.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

async function send(path, { method = "GET", json, form, signal, key, headers = {} } = {}) {
  const init = { method, signal, headers: { Authorization: `Bearer ${key ?? session.key()}`, ...headers } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // multipart: the browser sets the boundary
  } else if (method === "POST") {
    init.body = "";
  }
  const response = await fetch(`/v1/${path}`, init);
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const error = new ApiError(response.status, body);
    if (response.status === 401 && key === undefined) onUnauthorized(error);
    throw error;
  }
  return response;
}

export async function api(path, options) {
  return (await send(path, options)).json();
}

// Save what `path` answers as a file: fetch → blob → object URL → a click on a download link.
export async function download(path, filename) {
  const blob = await (await send(path)).blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  // After the click has been handled: revoking at once can cancel the download in some browsers.
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// Follow an SSE stream until it sends `done` or `signal` aborts. Each message goes to
// onMessage({event, id, data}); a dropped connection is resumed after `retry` ms with
// Last-Event-ID, so nothing is missed or repeated (api/streams.py).
export async function stream(path, onMessage, signal) {
  let lastId = null;
  let retryMs = 1000;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await send(path, { signal, headers });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let message = { event: "message", id: null, data: [] };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop(); // an incomplete line waits for the next chunk
        for (const line of lines) {
          if (line === "") {
            if (message.data.length) {
              if (message.id !== null) lastId = message.id;
              const payload = { event: message.event, id: message.id, data: message.data.join("\n") };
              if (payload.event === "done") {
                onMessage(payload);
                return;
              }
              onMessage(payload);
            }
            message = { event: "message", id: null, data: [] };
            continue;
          }
          if (line.startsWith(":")) continue; // keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") message.data.push(text);
          else if (field === "event") message.event = text;
          else if (field === "id") message.id = text;
          else if (field === "retry" && /^\d+$/.test(text)) retryMs = Number(text);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
}
