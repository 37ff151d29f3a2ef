// fetch() for the server's API with its API key: the page loads without a key, and the first 401 opens the key
// dialog. The key lives in sessionStorage, so it is gone when the browser session ends and never leaves this
// origin; every request waiting on the dialog continues once a key is given.

const STORAGE_KEY = "llamasplit.apiKey";
let pendingKey = null; // one dialog for every request that got a 401 at the same time

// Nothing on the page works without the key, so Escape does not dismiss the dialog.
document.getElementById("key-dialog").addEventListener("cancel", (event) => event.preventDefault());

export function hasKey() {
  return Boolean(sessionStorage.getItem(STORAGE_KEY));
}

export function forgetKey() {
  sessionStorage.removeItem(STORAGE_KEY);
}

/** fetch(path) with the API key; on 401 asks for a key and retries. `options.signal` aborts as usual. */
export async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(STORAGE_KEY);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const reason = await errorMessage(response);
    if (sessionStorage.getItem(STORAGE_KEY) === key) forgetKey(); // another request may have set a new one
    await askForKey(key ? `That key was refused: ${reason}` : "This server requires an API key.");
  }
}

/** The JSON body of an API response, or an Error carrying the server's OpenAI-shaped message. */
export async function json(path, options = {}) {
  const response = await api(path, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function askForKey(message) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const form = dialog.querySelector("form");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = message;
  pendingKey = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        input.focus();
        return;
      }
      sessionStorage.setItem(STORAGE_KEY, key);
      input.value = "";
      form.removeEventListener("submit", submit);
      dialog.close();
      pendingKey = null;
      document.dispatchEvent(new CustomEvent("llamasplit:key"));
      resolve();
    };
    form.addEventListener("submit", submit);
  });
  dialog.showModal();
  input.focus();
  return pendingKey;
}
