// A device's page (#/devices/NAME): what it runs, its deployments, its journal (follow
// live, pause, unit filter) and a terminal (xterm.js, loaded when first opened).

// What stops the page's journal stream and its terminal.
let stopJournal = () => {};
let stopTerminal = () => {};

// Ends what the page left running (a followed journal, a terminal): on every route.
export function leaveDevicePage() {
  stopJournal();
  stopTerminal();
}

export async function deviceView(name, ui) {
  const { api, esc, short, storeName, resultText, handSet, holdBadge, deviceState, commitBadge, main } = ui;
  const d = await api("GET", `/api/v1/devices/${encodeURIComponent(name)}`);
  const tags = d.tags.map((t) => `<span class="badge">${esc(t)}</span>`).join(" ") || '<span class="muted">–</span>';
  const status = deviceState(d) + holdBadge(d);
  // What the device can serve, and why not (its agent says; offline: nothing).
  const noJournal = !d.enrolled ? "the device has not enrolled yet" : !d.online ? "the device is offline" : d.no_journal;
  const noTerminal = !d.enrolled ? "the device has not enrolled yet" : !d.online ? "the device is offline" : d.no_terminal;
  const when = (t) => new Date(t * 1000).toLocaleString();
  main.innerHTML = `
    <h1>${esc(d.name)} ${status}</h1>
    <div class="card columns" data-testid="device-facts">
      <div><div class="muted">Configuration</div>${esc(d.config)}${d.config_exists ? "" : ' <span class="badge bad">not in the project</span>'}</div>
      <div><div class="muted">Tags</div>${tags}</div>
      <div><div class="muted">Commit</div><code data-testid="device-page-commit">${short(d.commit)}</code> ${commitBadge(d)}<div class="muted">${esc(d.commit_subject || "")}</div></div>
      <div><div class="muted">System</div><code title="${esc(d.system)}">${storeName(d.system)}</code>${handSet(d)}</div>
      <div><div class="muted">Agent</div>${esc(d.agent_version || "–")} <span class="muted">${esc(d.agent_state || "")}</span></div>
    </div>
    ${d.enrolled && !d.revoked ? "" : `<div class="card" data-testid="enroll-card"><p>${d.revoked ? "This device's key was revoked: it can no longer connect." : "This device has not enrolled yet: start its agent with its agent configuration (it holds a single-use token)."}
      Make a new enrollment token and agent configuration (any older token stops working):</p>
      <p><button id="new-token" data-testid="new-token">New enrollment token</button></p><div id="new-enrollment"></div></div>`}
    <h2>Deployments</h2>
    <div class="table-wrap"><table data-testid="device-history">
      <thead><tr><th>Task</th><th>When</th><th>Commit</th><th>Result</th><th>Why</th></tr></thead>
      <tbody>${d.history.map((h) => `
        <tr data-history-task="${h.task}">
          <td><a href="#/tasks/${h.task}">${h.task}</a></td><td>${esc(when(h.updated))}</td>
          <td><code>${short(h.commit)}</code> <span class="muted">${esc(h.message || "")}</span></td>
          <td data-testid="history-result">${resultText(h)}</td><td class="wrap">${esc(h.error || "")}</td>
        </tr>`).join("") || '<tr><td colspan="5" class="muted">No deployments yet.</td></tr>'}</tbody>
    </table></div>
    <h2>Journal</h2>
    ${noJournal ? `<p class="muted" data-testid="journal-unavailable">Not available: ${esc(noJournal)}.</p>` : ""}
    <form class="card row" id="journal-form" ${noJournal ? "hidden" : ""}>
      <input name="units" placeholder="units (web.service, ...)" data-testid="journal-units">
      <input name="lines" type="number" min="0" max="10000" value="100" style="width:6rem" title="past entries">
      <label><input type="checkbox" name="follow" checked data-testid="journal-follow"> follow</label>
      <button class="primary" data-testid="journal-show">Show</button>
      <button type="button" id="journal-pause" data-testid="journal-pause" disabled>Pause</button>
      <span class="muted" id="journal-status"></span>
    </form>
    <pre id="journal" data-testid="journal" ${noJournal ? "hidden" : ""}></pre>
    <h2>Terminal</h2>
    <p><button id="terminal-open" data-testid="terminal-open" ${noTerminal ? "disabled" : ""}>Open a terminal</button>
       <span class="muted" id="terminal-status" data-testid="terminal-status">${noTerminal ? `Not available: ${esc(noTerminal)}.` : "A root shell on the device."}</span></p>
    <div id="terminal" data-testid="terminal" hidden></div>
    <h2>Replace or lock out</h2>
    <div class="card row">
      <button id="device-image" data-testid="device-image">Download image</button>
      ${d.enrolled && !d.revoked ? '<button id="device-revoke" class="danger" data-testid="device-revoke">Revoke its key</button>' : ""}
      <span class="muted">${d.enrolled && !d.revoked ? "A new image enrolls a new key: the device as it runs now is locked out." : "An image carries a new enrollment token."}</span>
    </div>`;
  const newToken = document.getElementById("new-token");
  if (newToken) newToken.onclick = async () => {
    const r = await api("POST", `/api/v1/devices/${encodeURIComponent(name)}/reenroll`, {});
    document.getElementById("new-enrollment").innerHTML = `<p>Enrollment token (single use):</p><pre data-testid="enrollment-token">${esc(r.enrollment_token)}</pre>
      <p>Agent configuration (keep it secret):</p><pre>${esc(r.agent_config)}</pre>`;
  };
  document.getElementById("device-image").onclick = async () => {
    // An enrolled device's image enrolls a new key and revokes the one it runs with.
    const replace = d.enrolled && !d.revoked;
    if (replace && !confirm(`${name} is enrolled: its image enrolls a new key, and the device as it runs now is locked out until it runs the image. Make the image?`)) return;
    try {
      const t = await api("POST", `/api/v1/devices/${encodeURIComponent(name)}/image`, { replace_key: replace });
      location.hash = `#/tasks/${t.id}`;
    } catch (err) {
      alert(err.message);
    }
  };
  const revoke = document.getElementById("device-revoke");
  if (revoke) revoke.onclick = async () => {
    if (!confirm(`Revoke ${name}'s key? It is disconnected at once and can no longer connect until it enrolls again with a new token.`)) return;
    await api("POST", `/api/v1/devices/${encodeURIComponent(name)}/revoke`, {});
    await deviceView(name, ui);
  };
  document.getElementById("journal-form").onsubmit = (e) => {
    e.preventDefault();
    const f = e.target;
    showJournal(name, { units: f.units.value, lines: f.lines.value, follow: f.follow.checked }, ui);
  };
  document.getElementById("terminal-open").onclick = () => openTerminal(name, ui).catch((err) => {
    document.getElementById("terminal-status").textContent = err.message;
  });
  if (!noJournal) showJournal(name, { units: "", lines: "100", follow: true }, ui);
}

// Reads the journal response line by line as it comes (one JSON event per line).
async function showJournal(name, q, ui) {
  stopJournal();
  const out = document.getElementById("journal");
  const status = document.getElementById("journal-status");
  const pause = document.getElementById("journal-pause");
  out.textContent = "";
  let paused = false;
  let held = [];
  const shown = [];
  const show = (lines) => {
    if (paused) { held.push(...lines); status.textContent = `paused: ${held.length} new entries`; return; }
    shown.push(...lines);
    if (shown.length > 2000) shown.splice(0, shown.length - 2000);
    const end = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    out.textContent = shown.join("\n");
    if (end) out.scrollTop = out.scrollHeight;
  };
  pause.disabled = false;
  pause.textContent = "Pause";
  pause.onclick = () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) { const h = held; held = []; status.textContent = q.follow ? "following" : ""; show(h); }
  };
  const abort = new AbortController();
  stopJournal = () => abort.abort();
  const params = new URLSearchParams({ follow: String(q.follow) });
  const units = q.units.split(/[\s,]+/).filter(Boolean).join(",");
  if (units) params.set("units", units);
  if (q.lines !== "") params.set("lines", q.lines);
  status.textContent = "reading…";
  try {
    const res = await fetch(`/api/v1/devices/${encodeURIComponent(name)}/journal?${params}`, {
      headers: { "X-CSRF-Token": ui.csrf() }, credentials: "same-origin", signal: abort.signal,
    });
    if (!res.ok) { status.textContent = (await res.json().catch(() => ({}))).error || res.statusText; return; }
    status.textContent = q.follow ? "following" : "";
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const parts = (rest + value).split("\n");
      rest = parts.pop();
      const lines = [];
      for (const p of parts) {
        if (!p.trim()) continue;
        const ev = JSON.parse(p);
        if (ev.entry) {
          const e = ev.entry;
          const t = new Date(e.time_us / 1000).toLocaleString();
          lines.push(`${t} ${e.identifier || e.unit || "-"}: ${e.message}`);
        } else if (ev.dropped) lines.push(`-- ${ev.dropped} entries dropped (over the rate limit, or the page was too slow) --`);
        else if (ev.end) status.textContent = ev.end.error ? ev.end.error : "end of the journal";
      }
      if (lines.length) show(lines);
    }
  } catch (err) {
    if (err.name !== "AbortError") status.textContent = err.message;
  }
}

function loadXterm() {
  if (window.Terminal) return Promise.resolve();
  const css = document.createElement("link");
  css.rel = "stylesheet";
  css.href = "/ui/vendor/xterm.css";
  document.head.appendChild(css);
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = "/ui/vendor/xterm.js";
    s.onload = resolve;
    s.onerror = () => reject(new Error("could not load the terminal (xterm.js)"));
    document.head.appendChild(s);
  });
}

async function openTerminal(name, ui) {
  stopTerminal();
  await loadXterm();
  const status = document.getElementById("terminal-status");
  const box = document.getElementById("terminal");
  box.innerHTML = "";
  box.hidden = false;
  const term = new window.Terminal({ cols: 100, rows: 28, convertEol: false, cursorBlink: true });
  term.open(box);
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const params = new URLSearchParams({ cols: "100", rows: "28" });
  // The session's CSRF token goes as an offered subprotocol, not in the URL.
  const url = `${proto}//${location.host}/api/v1/devices/${encodeURIComponent(name)}/terminal?${params}`;
  const ws = new WebSocket(url, ["thymis.terminal", `csrf.${ui.csrf()}`]);
  ws.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  status.textContent = "connecting…";
  ws.onopen = () => { status.textContent = "connected"; term.focus(); };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return term.write(new Uint8Array(e.data));
    const end = JSON.parse(e.data);
    status.textContent = end.error ? end.error : `exited with status ${end.exit_status}`;
  };
  ws.onclose = (e) => { if (status.textContent === "connecting…") status.textContent = "the terminal could not be opened: the connection to the controller closed"; };
  const input = term.onData((data) => { if (ws.readyState === WebSocket.OPEN) ws.send(enc.encode(data)); });
  stopTerminal = () => { input.dispose(); ws.close(); term.dispose(); stopTerminal = () => {}; };
}
