// The status page: polls /v1/status and fills the cards. Text only (textContent), never HTML.
"use strict";

const REFRESH_MS = 5000;
const KEY_ITEM = "appliance-api-key";
let timer = null;

function $(id) { return document.getElementById(id); }
function set(id, value) { $(id).textContent = value === null || value === undefined || value === "" ? "–" : String(value); }

function bytes(n) {
  if (typeof n !== "number") return null;
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " min";
  if (m) return m + " min " + (s % 60) + " s";
  return s + " s";
}

function ms(value) { return typeof value === "number" ? value + " ms" : null; }

// Each path run on this CPU, with its figures here and on the machine that converted it.
function proofText(proof) {
  if (!proof) return null;
  const paths = Object.entries(proof.paths || {}).map(([key, p]) =>
    key + ": " + (p.passed_here ? "passes" : "FAILS") + " here (" + p.here + "); converting machine: " +
    (p.converting_machine || "passed"));
  return proof.state + ": " + proof.reason + (paths.length ? ". " + paths.join(". ") : "");
}

// The live parity watch: its state, and the agreement with the reference path over its window.
function watchText(watch) {
  if (!watch) return null;
  if (watch.state === "off") return "off";
  if (watch.state === "reference") return "nothing to watch: the reference path serves";
  const window = watch.in_window ? (watch.top1_agreement * 100).toFixed(1) + "% top-1, max |dp| " +
      watch.max_abs_dp.toPrecision(3) + " over " + watch.in_window + " of " + watch.window : "no sample yet";
  const fell = watch.fell_back ? "FELL BACK to " + watch.reference + ": " + watch.fell_back + ". " : "";
  return fell + window + " (1 in " + watch.every + " photos against " + watch.reference + ")";
}

function render(status) {
  const model = status.model || {};
  const runtime = status.runtime || {};
  const recent = status.recent || {};
  const storage = status.storage || {};
  const inference = status.inference || {};
  set("model-name", model.name);
  set("model-version", model.version);
  set("model-available", model.available_version);
  const reload = model.last_reload;
  set("model-last-reload", reload ? reload.at + " (" + reload.trigger + "): " + reload.result + " v" + (reload.version || "?") +
      ": " + reload.reason : "none since start");
  set("model-artifact", model.artifact ? model.artifact + (model.precision ? " (" + model.precision + ")" : "") : null);
  const served = status.served_path || {};
  set("served-path", served.key);
  set("served-why", served.why);
  set("served-proof", proofText(served.proof));
  set("served-watch", watchText(served.watch));
  set("model-demo", model.demo ? "yes: not medical predictions" : "no");
  $("demo-banner").hidden = !model.demo;
  set("runtime-name", runtime.runtime);
  set("runtime-device", runtime.device);
  set("ready", status.appliance.ready ? "yes" : "no");
  set("uptime", duration(status.appliance.uptime_s));
  set("appliance-version", status.appliance.version);
  const security = status.security || {};
  set("api-keys", security.api_keys === 0 ? "none: the API is open" : security.api_keys);
  set("tls", security.tls ? "yes" : "no: plain HTTP");
  // Phones pin this; compare it with the one `appliance check-config` printed on the box.
  set("tls-fingerprint", security.tls_fingerprint_sha256);
  set("window", "(last " + Math.round((recent.window_s || 300) / 60) + " min)");
  set("requests", recent.requests);
  set("client-errors", recent.client_errors);
  set("server-errors", recent.server_errors);
  set("p50", ms(recent.p50_ms));
  set("p95", ms(recent.p95_ms));
  set("queue", inference.queue_size ? inference.queue_depth + " / " + inference.queue_size : null);
  set("storage-backend", storage.backend);
  set("storage-images", storage.images);
  set("storage-cases", storage.cases);
  set("storage-bytes", bytes(storage.image_bytes));
  set("disk-free", storage.disk_total_bytes ? bytes(storage.disk_free_bytes) + " of " + bytes(storage.disk_total_bytes) : null);
  const sync = status.sync;
  if (sync === null || sync === undefined) {
    set("sync-state", "not configured");
    set("sync-backlog", null);
    set("sync-dead", null);
    set("sync-error", null);
  } else {
    set("sync-state", sync.state);
    set("sync-backlog", sync.backlog);
    // Jobs given up after sync.max_attempts: kept until `appliance sync retry`.
    set("sync-dead", sync.dead_letters ? `${sync.dead_letters} (run: appliance sync retry)` : sync.dead_letters);
    set("sync-error", sync.last_error || "none");
  }
  set("summary", (model.name ? model.name + " v" + model.version : "No model") + " on " + (runtime.runtime || "?") +
      " · " + (status.appliance.ready ? "ready" : "NOT READY"));
  set("updated", "updated " + new Date().toLocaleTimeString());
}

function showError(message) {
  $("error-banner").textContent = message;
  $("error-banner").hidden = !message;
}

async function refresh() {
  const headers = { "Accept": "application/json" };
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers["X-API-Key"] = key;
  let response;
  try {
    response = await fetch("/v1/status", { headers: headers, cache: "no-store" });
  } catch (err) {
    showError("The appliance does not answer (" + err.message + "); retrying.");
    return;
  }
  if (response.status === 401) {
    // No more polling without a key (each try would only be refused); submitting one resumes it.
    if (timer !== null) clearInterval(timer);
    timer = null;
    sessionStorage.removeItem(KEY_ITEM);
    $("cards").hidden = true;
    $("key-form").hidden = false;
    showError(key ? "That API key was not accepted." : "");
    set("summary", "API key needed");
    return;
  }
  if (!response.ok) {
    showError("Status request failed: HTTP " + response.status);
    return;
  }
  render(await response.json());
  showError("");
  $("key-form").hidden = true;
  $("cards").hidden = false;
}

function schedule() {
  if (timer !== null) clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", function () {
  $("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("key-input").value.trim());
    $("key-input").value = "";
    refresh();
    schedule();
  });
  schedule();
  refresh();
});
