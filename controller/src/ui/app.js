// Thymis web UI: plain modules, no build step. Talks to /api/v1 with the session
// cookie and the session's CSRF token; live task updates come as server-sent events.

import { deviceView, leaveDevicePage } from "/ui/device.js";

const main = document.getElementById("main");
const modal = document.getElementById("modal");
let csrf = null;
let events = null;

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const short = (s, n = 12) => (s ? esc(String(s).slice(0, n)) : '<span class="muted">–</span>');
// A store path's name, with the start of its hash: generations of one configuration
// share the name and differ there.
const storeName = (p) => {
  const m = p && p.match(/^\/nix\/store\/([a-z0-9]{32})-(.*)$/);
  if (!m) return p ? esc(p) : '<span class="muted">–</span>';
  return `${esc(m[2])} <span class="muted">${esc(m[1].slice(0, 7))}</span>`;
};
// Bytes in the unit a person reads them in.
const human = (n) => {
  let v = Number(n || 0);
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (v < 1024 || unit === "GiB") return unit === "B" ? `${v} B` : `${v.toFixed(1)} ${unit}`;
    v /= 1024;
  }
};
const duration = (s) => {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
};
const ago = (t) => {
  if (!t) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - t));
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
};

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (csrf && method !== "GET") headers["X-CSRF-Token"] = csrf;
  const res = await fetch(path, { method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (res.status === 401) { showLogin(); throw new Error("not logged in"); }
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function showLogin(message) {
  document.getElementById("toolbar").hidden = true;
  closeModal();
  main.innerHTML = `
    <form class="card login" id="login-form">
      <h1>Thymis</h1>
      <p class="muted">Log in with the admin token (STATE_DIR/admin-token).</p>
      <p><input type="password" name="token" placeholder="admin token" data-testid="login-token" style="width:100%" autocomplete="current-password"></p>
      <p><button class="primary" data-testid="login-submit">Log in</button> <span class="error">${esc(message)}</span></p>
    </form>`;
  document.getElementById("login-form").onsubmit = async (e) => {
    e.preventDefault();
    const token = e.target.token.value;
    const res = await fetch("/ui/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }) });
    if (!res.ok) return showLogin("That token is not right.");
    csrf = (await res.json()).csrf;
    document.getElementById("toolbar").hidden = false;
    route();
  };
}

// Why a staged device has not switched yet, and whether switching reboots it.
function waitingText(c) {
  const w = c.waiting || {};
  const text = w.for === "window" ? `waiting for window (opens ${new Date(w.opens * 1000).toLocaleString()})`
    : w.for === "hold" ? `held: ${w.reason}`
    : w.for === "connection" ? "staged: switches when the device connects"
    : "staged: waiting for activation";
  const reboot = c.reboot_needed ? ` <span class="badge warn" data-testid="reboot-needed" title="${esc(c.reboot_needed)}">reboot needed</span>` : "";
  return `<span class="badge" data-testid="staged" title="${esc(w.window || "")}">${esc(text)}</span>${reboot}`;
}

// What a device's part of a deployment is doing, in words (docs/ui.md).
function childStatus(c) {
  if (c.result) return "done";
  if (c.state === "pending") return `waiting for wave ${c.wave}`;
  if (c.state === "queued") return c.online ? "about to copy" : "offline: queued";
  if (c.state === "staged") return "staged";
  return { build: "building", copy: "copying", activate: "activating", confirm: "confirming" }[c.phase] || c.state;
}

function resultText(c) {
  const r = c.result;
  if (!r && c.state === "staged") return waitingText(c);
  if (!r) return '<span class="muted">–</span>';
  if (r === "succeeded") return `<span class="badge ok">succeeded</span>`;
  if (r === "succeeded-with-failed-units") return `<span class="badge warn">switched, units failed: ${esc((c.failed_units || []).join(", "))}</span>`;
  if (r === "succeeded-with-failed-checks") return `<span class="badge warn">switched, health checks failed: ${esc((c.failed_checks || []).join(", "))}</span>`;
  if (r === "rolled-back") return `<span class="badge bad">rolled back: ${esc(c.reason)}</span>`;
  if (r === "failed") return `<span class="badge bad">failed${c.phase ? ` (${esc(c.phase)})` : ""}</span>`;
  if (r === "cancelled" && c.reason === "halted") return `<span class="badge">not offered: rollout halted</span>`;
  return `<span class="badge bad">${esc(r)}</span>`;
}

// ---- devices ---------------------------------------------------------------------

// An idle device whose profile names another system than it runs: set on the device by
// hand, so deployments wait until it ran or is set back (docs/agent.md).
function handSet(d) {
  if (!d.boots_next || d.agent_state !== "idle") return "";
  return ` <span class="badge bad" data-testid="boots-next" title="${esc(d.boots_next)}">boots next ${storeName(d.boots_next)}, set on the device</span>`;
}

// Where a device is: enrolled or not, revoked, online, deploying.
function deviceState(d) {
  if (d.revoked) return '<span class="badge bad" data-testid="state">key revoked</span>';
  if (!d.enrolled) return '<span class="badge warn" data-testid="state">waiting for enrollment</span>';
  const link = d.deployment ? ` <a href="#/tasks/${d.deployment.task}" class="badge warn" data-testid="deploying">${d.deployment.state === "staged" ? "staged" : d.deployment.state === "pending" ? "in a later wave" : "deploying"}</a>` : "";
  return (d.online ? '<span class="badge ok" data-testid="state">online</span>' : `<span class="badge" data-testid="state">offline</span> <span class="muted">${ago(d.last_seen)}</span>`) + link;
}

// Whether a device runs the project's HEAD.
function commitBadge(d) {
  if (d.behind_head == null) return "";
  return d.behind_head === 0 ? '<span class="badge ok" data-testid="head">HEAD</span>'
    : `<span class="badge warn" data-testid="head">behind HEAD by ${d.behind_head} commit${d.behind_head === 1 ? "" : "s"}</span>`;
}

// An application on the device holds updates (past the device's maximum: not obeyed).
function holdBadge(d) {
  const h = d.hold;
  if (!h) return "";
  const since = new Date(h.since * 1000).toLocaleString();
  return h.overdue
    ? ` <span class="badge bad" data-testid="held" title="since ${esc(since)}">held: ${esc(h.reason)} (too old: not obeyed)</span>`
    : ` <span class="badge warn" data-testid="held" title="since ${esc(since)}">held: ${esc(h.reason)}</span>`;
}

async function devicesView() {
  const [devices, configs, tasks] = await Promise.all([api("GET", "/api/v1/devices"), api("GET", "/api/v1/project/configs"), api("GET", "/api/v1/tasks")]);
  const last = {};
  for (const t of tasks) for (const c of t.children || []) if (!(c.device in last)) last[c.device] = c;
  const tagsOf = (cfg) => (configs.configs[cfg]?.tags || []).map((t) => `<span class="badge">${esc(t)}</span>`).join(" ");
  const behind = devices.filter((d) => d.behind_head > 0).length;
  const known = devices.filter((d) => d.behind_head != null).length;
  main.innerHTML = `
    <h1>Devices</h1>
    <p data-testid="fleet-summary">${devices.length} devices: ${known - behind} on the project's HEAD${behind ? `, <strong>${behind} behind it</strong>` : ""}${devices.length - known ? `, ${devices.length - known} never deployed by this project` : ""}.</p>
    <div class="table-wrap"><table data-testid="devices-table">
      <thead><tr><th>Name</th><th>Configuration</th><th>Tags</th><th>Status</th><th>Commit</th><th>System</th><th>Last deployment</th></tr></thead>
      <tbody>${devices.map((d) => `
        <tr data-device="${esc(d.name)}">
          <td><a href="#/devices/${encodeURIComponent(d.name)}" data-testid="device-link"><strong>${esc(d.name)}</strong></a></td>
          <td>${esc(d.config)}</td><td>${tagsOf(d.config)}</td>
          <td data-testid="device-status">${deviceState(d)}${holdBadge(d)}</td>
          <td class="wrap"><code data-testid="device-commit">${short(d.commit)}</code> ${commitBadge(d)}<div class="muted">${esc(d.commit_subject || "")}</div></td>
          <td class="wrap"><code title="${esc(d.system)}">${storeName(d.system)}</code>${handSet(d)}</td>
          <td>${last[d.name] ? resultText(last[d.name]) : '<span class="muted">–</span>'}</td>
        </tr>`).join("")}</tbody>
    </table></div>
    <h2>Add a device</h2>
    <form class="card row" id="add-device">
      <input name="name" placeholder="name" required pattern="[A-Za-z0-9_-]{1,64}">
      <select name="config">${Object.keys(configs.configs).map((c) => `<option>${esc(c)}</option>`).join("")}</select>
      <button class="primary">Add</button>
    </form>
    <div id="enrollment"></div>`;
  document.getElementById("add-device").onsubmit = async (e) => {
    e.preventDefault();
    try {
      const r = await api("POST", "/api/v1/devices", { name: e.target.name.value, config: e.target.config.value });
      await devicesView();
      document.getElementById("enrollment").innerHTML = `
        <div class="card"><p>Enrollment token for <strong>${esc(r.name)}</strong> (shown once; single use):</p>
        <pre data-testid="enrollment-token">${esc(r.enrollment_token)}</pre><p>Agent configuration:</p><pre>${esc(r.agent_config)}</pre></div>`;
    } catch (err) {
      document.getElementById("enrollment").innerHTML = `<p class="error">${esc(err.message)}</p>`;
    }
  };
}

// ---- configurations ----------------------------------------------------------------

// ---- secrets -----------------------------------------------------------------------

// Secrets for devices: set from a text field or a file, listed without their values
// (which never come back from the controller).
async function secretsView() {
  const [secrets, configs, devices] = await Promise.all([api("GET", "/api/v1/secrets"), api("GET", "/api/v1/project/configs"), api("GET", "/api/v1/devices")]);
  const scopeText = (s) => Object.entries(s).map(([k, v]) => `${k} ${v}`).join("");
  const options = (kind) => (kind === "device" ? devices.map((d) => d.name) : kind === "config" ? Object.keys(configs.configs) : configs.tags);
  main.innerHTML = `
    <h1>Secrets</h1>
    <p class="muted">Wi-Fi keys, API tokens: each device gets its own, encrypted to its key, in <code>/run/thymis/secrets/NAME</code> before its next deployment activates. Values are never shown again.</p>
    <div class="table-wrap"><table data-testid="secrets-table"><thead><tr><th>Name</th><th>For</th><th>Owner</th><th>Group</th><th>Mode</th><th>Changed</th><th></th></tr></thead><tbody>
    ${secrets.map((s, i) => `<tr data-secret="${esc(s.name)}"><td><code>${esc(s.name)}</code></td><td>${esc(scopeText(s.scope))}</td><td>${esc(s.owner)}</td><td>${esc(s.group)}</td><td>${esc(s.mode)}</td>
      <td>${esc(new Date(s.updated * 1000).toLocaleString())}</td><td><button data-remove="${i}">Remove</button></td></tr>`).join("") || '<tr><td colspan="7" class="muted">No secrets yet.</td></tr>'}
    </tbody></table></div>
    <h2>Set a secret</h2>
    <form class="card columns" id="secret-form">
      <label>Name<br><input name="name" required pattern="[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}" data-testid="secret-name"></label>
      <label>For<br><select name="kind" data-testid="secret-kind"><option value="tag">tag</option><option value="config">configuration</option><option value="device">device</option></select>
        <select name="scope" data-testid="secret-scope"></select></label>
      <label>Owner<br><input name="owner" value="root"></label>
      <label>Group<br><input name="group" value="root"></label>
      <label>Mode<br><input name="mode" value="0400" size="5"></label>
      <label>Value<br><textarea name="value" rows="2" data-testid="secret-value" autocomplete="off"></textarea></label>
      <label>or from a file<br><input type="file" name="file"></label>
      <p><button class="primary" data-testid="secret-set">Set</button> <span class="error" id="secret-error"></span></p>
    </form>`;
  const form = document.getElementById("secret-form");
  const fill = () => { form.scope.innerHTML = options(form.kind.value).map((o) => `<option>${esc(o)}</option>`).join(""); };
  form.kind.onchange = fill;
  fill();
  form.onsubmit = async (e) => {
    e.preventDefault();
    try {
      const file = form.file.files[0];
      const bytes = file ? new Uint8Array(await file.arrayBuffer()) : new TextEncoder().encode(form.value.value);
      let bin = "";
      for (const b of bytes) bin += String.fromCharCode(b);
      await api("POST", "/api/v1/secrets", { name: form.name.value, scope: { [form.kind.value]: form.scope.value },
        owner: form.owner.value, group: form.group.value, mode: form.mode.value, value: btoa(bin), deploy: true });
      await secretsView();
    } catch (err) {
      document.getElementById("secret-error").textContent = err.message;
    }
  };
  main.querySelectorAll("[data-remove]").forEach((b) => (b.onclick = async () => {
    const s = secrets[Number(b.dataset.remove)];
    if (!confirm(`Remove ${s.name} for ${scopeText(s.scope)}? Devices drop it at their next deployment.`)) return;
    await api("POST", "/api/v1/secrets/remove", { name: s.name, scope: s.scope });
    await secretsView();
  }));
}

async function configsView() {
  const configs = await api("GET", "/api/v1/project/configs");
  main.innerHTML = `
    <h1>Configurations</h1>
    <div class="table-wrap"><table><thead><tr><th>Configuration</th><th>Tags</th><th></th></tr></thead><tbody>
    ${Object.entries(configs.configs).map(([name, c]) => `
      <tr><td><strong>${esc(name)}</strong></td><td>${(c.tags || []).map((t) => `<span class="badge">${esc(t)}</span>`).join(" ")}</td>
      <td><button data-build="${esc(name)}">Build</button></td></tr>`).join("")}
    </tbody></table></div>
    <h2>Tags</h2><p>${configs.tags.map((t) => `<span class="badge">${esc(t)}</span>`).join(" ") || '<span class="muted">none</span>'}</p>`;
  main.querySelectorAll("[data-build]").forEach((b) => (b.onclick = async () => {
    const t = await api("POST", "/api/v1/build", { config: b.dataset.build });
    location.hash = `#/tasks/${t.id}`;
  }));
}

// ---- tasks -------------------------------------------------------------------------

async function tasksView() {
  const tasks = await api("GET", "/api/v1/tasks");
  main.innerHTML = `
    <h1>Tasks</h1>
    <div class="table-wrap"><table data-testid="tasks-table"><thead><tr><th>#</th><th>Kind</th><th>State</th><th>Result</th><th>Commit</th><th>Devices</th><th>Created</th></tr></thead><tbody>
    ${tasks.map((t) => `<tr><td><a href="#/tasks/${t.id}">${t.id}</a></td><td>${esc(t.kind)}</td><td>${esc(t.state)}</td>
      <td>${t.result ? `<span class="badge ${t.result === "succeeded" ? "ok" : "bad"}">${esc(t.result)}</span>` : ""}</td>
      <td><code>${short(t.commit)}</code></td><td>${(t.children || []).length || ""}</td><td class="muted">${ago(t.created)}</td></tr>`).join("")}
    </tbody></table></div>`;
}

function progress(done, total, label = (d, t) => `${d}/${t}`) {
  if (!total) return `<span class="muted">${done || 0}</span>`;
  const pct = Math.min(100, Math.round((100 * done) / total));
  return `<span class="progress" data-testid="progress" data-pct="${pct}" title="${esc(label(done, total))}"><span style="width:${pct}%"></span></span> ${esc(label(done, total))}`;
}

// What a device gets, by package (against what it ran when the deployment was built).
function packagesText(p) {
  if (!p) return "";
  const n = p.changed.length + p.added.length + p.removed.length;
  if (!n) return '<div class="muted" data-testid="child-packages">no package changes</div>';
  const items = p.changed.map((x) => `<li>${esc(x.name)} ${esc(x.old || "–")} → ${esc(x.new || "–")}</li>`)
    .concat(p.added.map((x) => `<li>+ ${esc(x.name)} ${esc(x.version)}</li>`), p.removed.map((x) => `<li>− ${esc(x.name)} ${esc(x.version)}</li>`));
  return `<details class="muted" data-testid="child-packages"><summary>${p.changed.length} changed, ${p.added.length} added, ${p.removed.length} removed</summary><ul>${items.join("")}</ul></details>`;
}

// A device's copy: while it runs, by the bytes streamed (one large path moves the bar
// too); otherwise by the paths the device acknowledged.
function copyProgress(c) {
  if (c.copy) return progress(c.copy.nar_bytes_done, c.copy.nar_bytes_total, (d, t) => `${human(d)} of ${human(t)}`);
  return progress(c.paths_sent, c.paths_total, (d, t) => `${d}/${t} paths`);
}

// A staged rollout: which wave runs (of how many), a soak, and what can go on.
function rolloutRow(t) {
  const r = t.rollout;
  if (!r) return "";
  const waves = Math.max(1, ...(t.children || []).map((c) => c.wave || 1));
  const soaking = r.soak_until && r.soak_until * 1000 > Date.now();
  const plan = [r.canary != null ? `canary ${esc(r.canary)}` : "", r.wave_size != null ? `waves of ${esc(r.wave_size)}` : "",
    `max failures ${esc(r.max_failures ?? 0)}`, r.soak ? `soak ${esc(r.soak)} s` : ""].filter(Boolean).join(", ");
  const now = t.state === "halted" ? `halted in wave ${esc(r.wave)} of ${waves}`
    : soaking ? `wave ${esc(r.wave)} of ${waves} done; soaking until ${new Date(r.soak_until * 1000).toLocaleTimeString()}`
    : `wave ${esc(r.wave)} of ${waves}`;
  const resumable = t.state === "halted" || soaking;
  return `<div class="card row" data-testid="rollout"><span>Rollout: <strong data-testid="rollout-status">${now}</strong></span>
    <span class="muted">${plan}</span>${resumable ? '<button id="resume" data-testid="resume">Resume</button>' : ""}</div>`;
}

function renderTask(t, logs) {
  const running = !["finished", "cancelled", "halted"].includes(t.state);
  const took = (running ? Date.now() / 1000 : t.updated) - t.created;
  const staged = (t.children || []).filter((c) => c.state === "staged" && c.waiting?.for !== "hold");
  const waves = !!t.rollout;
  main.innerHTML = `
    <h1>Task ${t.id} <span class="muted">${esc(t.kind)}</span></h1>
    <div class="card row">
      <span>State: <strong data-testid="task-state">${esc(t.state)}</strong></span>
      <span>Result: <strong data-testid="task-result">${esc(t.result || "–")}</strong></span>
      <span>Started: <span data-testid="task-started">${esc(new Date(t.created * 1000).toLocaleString())}</span></span>
      <span>${running ? "Running for" : "Took"}: <strong data-testid="task-duration">${duration(took)}</strong></span>
      <span>Commit: <code>${short(t.commit)}</code> <span class="muted" data-testid="task-commit-subject">${esc(t.commit_subject || "")}</span></span>
      ${t.system ? `<span>System: <code>${storeName(t.system)}</code></span>` : ""}
      ${running && t.kind === "deployment" ? '<button id="cancel" data-testid="cancel">Cancel</button>' : ""}
      ${staged.length ? `<button id="activate" class="primary" data-testid="activate" title="Switch the staged devices now (a device held by an application switches once released)">Activate ${staged.length} staged</button>` : ""}
      ${t.kind === "image" || t.kind === "bundle" ? `<span id="artifacts"></span>` : ""}
    </div>
    ${rolloutRow(t)}
    ${t.error ? `<p class="error" data-testid="task-error">${esc(t.error)}</p>` : ""}
    ${t.warning ? `<p class="badge warn" data-testid="task-warning">${esc(t.warning)}</p>` : ""}
    ${(t.children || []).length ? `<div class="table-wrap"><table data-testid="children-table"><thead><tr><th>Device</th>${waves ? "<th>Wave</th>" : ""}<th>Configuration</th><th>Status</th><th>Progress</th><th>Sent</th><th>Result</th></tr></thead><tbody>
      ${t.children.map((c) => `<tr data-child="${esc(c.device)}"><td><strong>${esc(c.device)}</strong></td>${waves ? `<td>${esc(c.wave)}</td>` : ""}<td>${esc(c.config)}</td><td data-testid="child-status">${esc(childStatus(c))}</td>
        <td>${copyProgress(c)}</td><td data-testid="child-bytes">${human(Math.max(c.bytes_sent, c.copy?.bytes_streamed || 0))}${c.paths_substituted ? `<div class="muted" data-testid="substituted">${c.paths_substituted} paths (${human(c.bytes_substituted)}) from caches</div>` : ""}</td>
        <td class="wrap" data-testid="child-result">${resultText(c)}${c.error ? `<div class="error">${esc(c.error)}</div>` : ""}${packagesText(c.packages)}</td></tr>`).join("")}
    </tbody></table></div>` : ""}
    <h2>Log</h2><pre data-testid="task-log">${esc(logs.join("\n"))}</pre>`;
  const cancel = document.getElementById("cancel");
  if (cancel) cancel.onclick = () => api("POST", `/api/v1/tasks/${t.id}/cancel`);
  const activate = document.getElementById("activate");
  if (activate) activate.onclick = () => api("POST", `/api/v1/tasks/${t.id}/activate`, { devices: [] });
  const resume = document.getElementById("resume");
  if (resume) resume.onclick = async () => {
    const next = await api("POST", `/api/v1/tasks/${t.id}/resume`);
    if (next.id !== t.id) location.hash = `#/tasks/${next.id}`;
  };
  const arts = document.getElementById("artifacts");
  if (arts && t.result === "succeeded") api("GET", `/api/v1/tasks/${t.id}/artifacts`).then((files) => {
    arts.innerHTML = files.map((f) => `<a href="/api/v1/tasks/${t.id}/artifacts/${encodeURIComponent(f.name)}" download>${esc(f.name)}</a>`).join(" ");
  });
}

// The running task's clock, ticking between its updates.
let clock = null;

async function taskView(id) {
  let task = await api("GET", `/api/v1/tasks/${id}`);
  clearInterval(clock);
  clock = setInterval(() => {
    const el = document.querySelector("[data-testid=task-duration]");
    if (!el || !location.hash.startsWith(`#/tasks/${id}`)) return clearInterval(clock);
    if (!["finished", "cancelled", "halted"].includes(task.state)) el.textContent = duration(Date.now() / 1000 - task.created);
  }, 1000);
  const logs = [];
  renderTask(task, logs);
  events = new EventSource(`/api/v1/tasks/${id}/events`);
  events.addEventListener("log", (e) => { logs.push(e.data); renderTask(task, logs); });
  events.addEventListener("task", (e) => { task = JSON.parse(e.data); renderTask(task, logs); });
  events.onerror = () => { if (["finished", "cancelled", "halted"].includes(task.state)) events.close(); };
}

// ---- deploy ------------------------------------------------------------------------

function closeModal() { modal.hidden = true; modal.innerHTML = ""; }

async function openDeploy() {
  const [status, configs, devices] = await Promise.all([api("GET", "/api/v1/project/status"), api("GET", "/api/v1/project/configs"), api("GET", "/api/v1/devices")]);
  const chosen = { configs: new Set(), devices: new Set() };
  modal.hidden = false;
  modal.innerHTML = `
    <div class="dialog" data-testid="deploy-modal">
      <h1>Deploy</h1>
      <h2>Changes</h2>
      ${status.changes.length ? `<ul data-testid="changes">${status.changes.map((c) => `<li><span class="badge">${esc(c.status)}</span> <code>${esc(c.path)}</code> <button data-diff="${esc(c.path)}">diff</button></li>`).join("")}</ul><pre id="diff" hidden></pre>`
        : '<p class="muted" data-testid="changes">No uncommitted changes: HEAD is deployed.</p>'}
      ${status.dirty ? `<p><label>Commit message<br><textarea rows="2" id="message" data-testid="commit-message">${esc(status.default_message)}</textarea></label></p>` : ""}
      <h2>Targets</h2>
      <div class="columns">
        <div><strong>Tags</strong><div>${configs.tags.map((t) => `<span class="chip" data-tag="${esc(t)}">${esc(t)}</span>`).join("") || '<span class="muted">none</span>'}</div></div>
        <div><strong>Configurations</strong>${Object.keys(configs.configs).map((c) => `<div><label><input type="checkbox" data-config="${esc(c)}"> ${esc(c)}</label></div>`).join("")}</div>
        <div><strong>Devices</strong>${devices.map((d) => `<div><label><input type="checkbox" data-dev="${esc(d.name)}"> ${esc(d.name)}</label></div>`).join("")}</div>
      </div>
      <h2>Rollout</h2>
      <p class="muted">Empty: every device at once. A number of devices, or a percentage like 25%.</p>
      <div class="columns">
        <label>Canary first<br><input id="canary" data-testid="rollout-canary" placeholder="none" size="6"></label>
        <label>Then waves of<br><input id="wave_size" data-testid="rollout-wave-size" placeholder="all" size="6"></label>
        <label>Halt after failures over<br><input id="max_failures" data-testid="rollout-max-failures" placeholder="0" size="6"></label>
        <label>Soak after each wave (s)<br><input id="soak" data-testid="rollout-soak" placeholder="0" size="6" inputmode="numeric"></label>
      </div>
      <h2>When to switch</h2>
      <p class="muted">The copy starts at once; the switch (and a reboot) waits for the window, or for Activate on the task.</p>
      <div class="columns">
        <label><input type="checkbox" id="stage_only" data-testid="stage-only"> Stage only: switch later with Activate</label>
        <label>Maintenance window<br><input id="window" data-testid="window" placeholder="thymis.toml's, e.g. Mon-Fri 22:00-06:00" size="34"></label>
      </div>
      <h2>Preview</h2><div id="preview" data-testid="preview"><p class="muted">Pick targets.</p></div>
      <p><button id="dry-run" data-testid="dry-run" disabled>What will change?</button> <span class="muted">builds the update and compares it with what the devices run; sends nothing</span></p>
      <div id="dry-run-result" data-testid="dry-run-result"></div>
      <p class="row"><button class="primary" id="go" data-testid="deploy-submit" disabled>${status.dirty ? "Commit &amp; Deploy" : "Deploy"}</button>
      <button id="close">Close</button> <span class="error" id="deploy-error"></span></p>
    </div>`;
  const field = (id) => document.getElementById(id)?.value.trim() || null;
  const request = () => ({
    configs: [...chosen.configs], devices: [...chosen.devices], message: document.getElementById("message")?.value,
    canary: field("canary"), wave_size: field("wave_size"), max_failures: field("max_failures"),
    soak: field("soak") ? Number(field("soak")) : null,
    stage_only: !!document.getElementById("stage_only")?.checked, window: field("window"),
  });
  const preview = async () => {
    const go = document.getElementById("go");
    const dry = document.getElementById("dry-run");
    if (!chosen.configs.size && !chosen.devices.size) { go.disabled = true; dry.disabled = true; return; }
    dry.disabled = false;
    try {
      const p = await api("POST", "/api/v1/deploy/preview", request());
      // Each device: what it runs now, and what it would run.
      const change = (d) => p.commit && d.commit === p.commit ? '<span class="muted">already runs it</span>'
        : `<code>${d.commit ? short(d.commit) : "nothing yet"}</code> → <code>${p.commit ? short(p.commit) : "the new commit"}</code>`;
      let at = 0;
      const plan = (p.waves || []).map((n, i) => {
        const names = p.devices.slice(at, at + n).map((d) => esc(d.name)).join(", ");
        at += n;
        return `<li>${i === 0 && p.waves.length > 1 ? "first" : `wave ${i + 1}`}: ${names}</li>`;
      }).join("");
      document.getElementById("preview").innerHTML = `
        <p>Configurations: ${p.configs.map((c) => `<span class="badge">${esc(c)}</span>`).join(" ")}</p>
        <ul>${p.devices.map((d) => `<li data-preview-device="${esc(d.name)}">${esc(d.name)} <span class="muted">(${esc(d.config)})</span> ${change(d)} ${d.online ? '<span class="badge ok">online</span>' : '<span class="badge">offline: queued</span>'}</li>`).join("")}</ul>
        ${plan ? `<p>Waves, one after the other:</p><ol class="plain" data-testid="wave-plan">${plan}</ol>` : ""}`;
      go.disabled = false;
    } catch (err) {
      document.getElementById("preview").innerHTML = `<p class="error">${esc(err.message)}</p>`;
      go.disabled = true;
    }
  };
  modal.querySelectorAll("[data-tag]").forEach((chip) => (chip.onclick = () => {
    for (const [name, c] of Object.entries(configs.configs)) if ((c.tags || []).includes(chip.dataset.tag)) {
      chosen.configs.add(name);
      modal.querySelector(`[data-config="${CSS.escape(name)}"]`).checked = true;
    }
    chip.classList.add("on");
    preview();
  }));
  modal.querySelectorAll("[data-config]").forEach((b) => (b.onchange = () => { b.checked ? chosen.configs.add(b.dataset.config) : chosen.configs.delete(b.dataset.config); preview(); }));
  modal.querySelectorAll("[data-dev]").forEach((b) => (b.onchange = () => { b.checked ? chosen.devices.add(b.dataset.dev) : chosen.devices.delete(b.dataset.dev); preview(); }));
  modal.querySelectorAll("[data-diff]").forEach((b) => (b.onclick = async () => {
    const d = await api("GET", `/api/v1/project/diff?path=${encodeURIComponent(b.dataset.diff)}`);
    const pre = document.getElementById("diff");
    pre.hidden = false;
    // Added and removed lines in colour.
    pre.innerHTML = d.diff.split("\n").map((l) => {
      const kind = l.startsWith("+++") || l.startsWith("---") ? "file" : l.startsWith("+") ? "add" : l.startsWith("-") ? "del" : l.startsWith("@@") ? "hunk" : "";
      return kind ? `<span class="diff-${kind}">${esc(l)}</span>` : esc(l);
    }).join("\n");
  }));
  // What the update changes: built, compared with what the devices run, nothing sent.
  document.getElementById("dry-run").onclick = async () => {
    const out = document.getElementById("dry-run-result");
    out.innerHTML = '<p class="muted">building…</p>';
    try {
      const d = await api("POST", "/api/v1/deploy/dry-run", request());
      out.innerHTML = d.configs.map((c) => `<div class="card"><strong>${esc(c.config)}</strong>: ${c.closure_paths} paths, ${human(c.closure_bytes)}${c.before_bytes != null ? ` (was ${human(c.before_bytes)})` : ""};
        ${c.reboot ? `<span class="badge warn">reboot needed: ${esc(c.reboot)}</span>` : '<span class="badge ok">switches live</span>'}
        <ul>${c.changed.map((p) => `<li data-changed="${esc(p.name)}">changed <code>${esc(p.name)}</code> ${esc(p.old || "–")} → ${esc(p.new || "–")}</li>`).join("")}
        ${c.added.map((p) => `<li>added <code>${esc(p.name)}</code> ${esc(p.version)}</li>`).join("")}
        ${c.removed.map((p) => `<li>removed <code>${esc(p.name)}</code> ${esc(p.version)}</li>`).join("")}</ul></div>`).join("")
        + `<ul>${d.devices.map((v) => `<li data-device-send="${esc(v.device)}">${esc(v.device)}: lacks ${v.paths}${v.known ? "" : "?"} paths, ${human(v.bytes)}; sends ${human(v.send_bytes)}${v.deltas ? ` (${v.deltas} as deltas)` : ""}${v.from_caches && v.from_caches.paths ? `; its caches serve ${v.from_caches.paths} paths, ${human(v.from_caches.bytes)}` : ""}</li>`).join("")}</ul>`;
    } catch (err) {
      out.innerHTML = `<p class="error">${esc(err.message)}</p>`;
    }
  };
  // The wave plan follows the rollout's fields.
  for (const id of ["canary", "wave_size"]) document.getElementById(id).oninput = preview;
  document.getElementById("close").onclick = closeModal;
  document.getElementById("go").onclick = async () => {
    try {
      const t = await api("POST", "/api/v1/deploy", request());
      closeModal();
      location.hash = `#/tasks/${t.id}`;
    } catch (err) {
      document.getElementById("deploy-error").textContent = err.message;
    }
  };
}

// ---- routing -----------------------------------------------------------------------

async function route() {
  if (events) { events.close(); events = null; }
  leaveDevicePage();
  const hash = location.hash || "#/devices";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", hash.startsWith(a.getAttribute("href"))));
  try {
    const m = hash.match(/^#\/tasks\/(\d+)/);
    const dev = hash.match(/^#\/devices\/(.+)$/);
    if (m) await taskView(m[1]);
    else if (dev) await deviceView(decodeURIComponent(dev[1]), { api, esc, short, storeName, ago, resultText, handSet, holdBadge, deviceState, commitBadge, main, csrf: () => csrf });
    else if (hash.startsWith("#/tasks")) await tasksView();
    else if (hash.startsWith("#/configs")) await configsView();
    else if (hash.startsWith("#/secrets")) await secretsView();
    else await devicesView();
  } catch (err) {
    if (err.message !== "not logged in") main.innerHTML = `<p class="error">${esc(err.message)}</p>`;
  }
}

document.getElementById("deploy-button").onclick = () => openDeploy().catch((e) => alert(e.message));
document.getElementById("logout-button").onclick = async () => { await api("POST", "/ui/logout", {}); csrf = null; showLogin(); };
window.addEventListener("hashchange", route);

(async () => {
  const res = await fetch("/ui/session", { credentials: "same-origin" });
  csrf = res.ok ? (await res.json()).csrf : null;
  if (!csrf) return showLogin();
  document.getElementById("toolbar").hidden = false;
  route();
})();
