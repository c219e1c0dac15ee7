// Drives the Thymis web UI in headless Chromium (Debian's), as a person would.
// Usage: node ui-test.mjs PHASE   with THYMIS_URL, THYMIS_TOKEN, SHOTS (screenshot dir),
// EXPECT (JSON: devices with their expected commit prefix), and THYMIS_SPKI (base64 sha256
// of the controller's public key: Chromium trusts that one certificate). Exits non-zero
// on failure.
import { chromium } from "playwright-core";

const url = process.env.THYMIS_URL;
const token = process.env.THYMIS_TOKEN;
const shots = process.env.SHOTS;
const expect = JSON.parse(process.env.EXPECT || "{}");
const phase = process.argv[2];

function check(cond, what) {
  if (!cond) throw new Error(`UI check failed: ${what}`);
}

// The device page: its deployments, its journal followed live, and a terminal that
// answers what is typed into it.
async function devicePage(page) {
  await page.click(`tr[data-device="${expect.device}"] [data-testid=device-link]`);
  await page.waitForURL(new RegExp(`#/devices/${expect.device}$`));
  await page.waitForFunction(() => document.querySelector("[data-testid=device-facts]")?.textContent.includes("idle"), null, { timeout: 30000 });
  const row = page.locator(`tr[data-history-task="${expect.task}"] [data-testid=history-result]`);
  check((await row.innerText()).includes(expect.result), `task ${expect.task} in the history says ${await row.innerText()}`);
  await page.waitForFunction((t) => document.querySelector("[data-testid=journal]")?.textContent.includes(t), expect.journal, { timeout: 30000 });
  // Filtered to one unit, then followed: a line written now shows up without a reload.
  await page.fill("[data-testid=journal-units]", expect.unit);
  await page.click("[data-testid=journal-show]");
  await page.waitForFunction((t) => document.querySelector("[data-testid=journal]")?.textContent.includes(t), expect.journal, { timeout: 30000 });
  const filtered = await page.locator("[data-testid=journal]").innerText();
  check(!filtered.includes("thymis-agent"), `the unit filter lets other units through: ${filtered}`);
  await page.screenshot({ path: `${shots}/device-page.png`, fullPage: true });

  await page.click("[data-testid=terminal-open]");
  await page.waitForFunction(() => document.getElementById("terminal-status")?.textContent === "connected", null, { timeout: 30000 });
  await page.click("[data-testid=terminal] .xterm");
  await page.keyboard.type("echo hello-$RANDOM\n");
  await page.waitForFunction(() => /hello-\d+/.test(document.querySelector("[data-testid=terminal] .xterm-rows")?.textContent || ""), null, { timeout: 30000 });
  await page.screenshot({ path: `${shots}/device-terminal.png`, fullPage: true });
  await page.keyboard.type("exit 5\n");
  await page.waitForFunction(() => document.getElementById("terminal-status")?.textContent === "exited with status 5", null, { timeout: 30000 });
}

// Devices that cannot do everything say so: one whose agent refuses the terminal and
// has no journal, and one that has not enrolled yet (a new token from its page).
async function otherDevices(page) {
  // A change of the URL's hash only: wait for that device's page, not the one before.
  await page.goto(`${url}#/devices/${expect.refusing}`);
  await page.waitForFunction((d) => document.querySelector("main h1")?.textContent.startsWith(d)
    && document.querySelector("[data-testid=terminal-status]"), expect.refusing);
  check(await page.locator("[data-testid=terminal-open]").isDisabled(), "the terminal is offered on a device that refuses it");
  const why = await page.locator("[data-testid=terminal-status]").innerText();
  check(why.includes("terminal is disabled on this device"), `the terminal's reason reads "${why}"`);
  const journal = await page.locator("[data-testid=journal-unavailable]").innerText();
  check(journal.includes("no journal"), `the journal's reason reads "${journal}"`);
  check(await page.locator("[data-testid=journal]").isHidden(), "an empty journal pane is shown");
  await page.screenshot({ path: `${shots}/device-refusing.png`, fullPage: true });

  await page.goto(`${url}#/devices/${expect.unenrolled}`);
  await page.waitForFunction((d) => document.querySelector("main h1")?.textContent.startsWith(d), expect.unenrolled);
  await page.waitForSelector("[data-testid=enroll-card]");
  const state = await page.locator("[data-testid=state]").first().innerText();
  check(state === "waiting for enrollment", `a device that never enrolled reads "${state}"`);
  await page.click("[data-testid=new-token]");
  await page.waitForSelector("[data-testid=enrollment-token]");
  await page.screenshot({ path: `${shots}/device-unenrolled.png`, fullPage: true });
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    .concat(process.env.THYMIS_SPKI ? [`--ignore-certificate-errors-spki-list=${process.env.THYMIS_SPKI}`] : []),
});
let page;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  page.setDefaultTimeout(60000);
  // A normal page load logs no error and fails no request.
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  page.on("response", (r) => { if (r.status() >= 400) problems.push(`${r.status()} ${r.url()}`); });
  const loaded = (selector) => page.waitForSelector(selector, { timeout: 20000 });
  await page.goto(url);
  await loaded("[data-testid=login-token]");
  check(await page.locator("[data-testid=deploy-button]").isHidden(), "the log-in page shows the navigation");
  // Log in with the admin token.
  await page.fill("[data-testid=login-token]", token);
  await page.click("[data-testid=login-submit]");
  await loaded("[data-testid=devices-table]");
  check(problems.length === 0, `loading and logging in logged: ${problems.join("; ")}`);
  // Whether each device runs the project's HEAD.
  for (const [name, head] of Object.entries(expect.head || {})) {
    const badge = await page.locator(`tr[data-device="${name}"] [data-testid=head]`).innerText();
    check(badge.includes(head), `${name} says "${badge}", expected "${head}"`);
  }

  // The devices table shows the devices and the commits they run.
  for (const [name, commit] of Object.entries(expect.devices || {})) {
    const row = page.locator(`tr[data-device="${name}"]`);
    await row.waitFor();
    const shown = (await row.locator("[data-testid=device-commit]").innerText()).trim();
    check(commit === "" ? shown === "–" : commit.startsWith(shown) && shown.length > 0, `${name} shows commit ${shown}, expected ${commit}`);
  }
  // A device whose profile was set by hand says what it boots next.
  for (const [name, next] of Object.entries(expect.bootsNext || {})) {
    const shown = await page.locator(`tr[data-device="${name}"] [data-testid=boots-next]`).innerText();
    check(shown.includes(`boots next ${next}`), `${name} shows "${shown}", expected it to boot ${next} next`);
  }
  await page.screenshot({ path: `${shots}/${phase}-devices.png`, fullPage: true });

  if (phase === "secrets") {
    // A secret set from the page; the page never shows its value again.
    await page.click("[data-testid=nav-secrets]");
    await page.waitForSelector("[data-testid=secrets-table]");
    await page.fill("[data-testid=secret-name]", expect.secret.name);
    await page.selectOption("[data-testid=secret-kind]", "tag");
    await page.selectOption("[data-testid=secret-scope]", expect.secret.tag);
    await page.fill("[data-testid=secret-value]", expect.secret.value);
    await page.click("[data-testid=secret-set]");
    await page.waitForSelector(`tr[data-secret="${expect.secret.name}"]`);
    check(!(await page.content()).includes(expect.secret.value), "the secrets page shows a value");
    await page.screenshot({ path: `${shots}/secrets.png`, fullPage: true });
    console.log(`ui phase ${phase}: ok`);
    process.exit(0);
  }
  if (phase === "device") {
    await devicePage(page);
    await otherDevices(page);
    console.log(`ui phase ${phase}: ok`);
    process.exit(0);
  }

  await page.click("[data-testid=deploy-button]");
  await page.waitForSelector("[data-testid=deploy-modal]");
  const changes = await page.locator("[data-testid=changes]").innerText();
  check(changes.includes(expect.changed), `the deploy view lists ${expect.changed}: ${changes}`);
  const message = await page.inputValue("[data-testid=commit-message]");
  check(message.trim().length > 0, "a commit message is pre-filled");
  if (expect.tag) {
    await page.click(`[data-tag="${expect.tag}"]`);
  } else {
    for (const d of expect.targets) await page.check(`[data-dev="${d}"]`);
  }
  for (const d of expect.preview) await page.waitForSelector(`[data-preview-device="${d}"]`);
  const change = await page.locator(`[data-preview-device="${expect.preview[0]}"]`).innerText();
  check(change.includes("→"), `the preview does not say what ${expect.preview[0]} changes from and to: ${change}`);
  if (expect.canary) {
    await page.fill("[data-testid=rollout-canary]", expect.canary);
    const plan = await page.locator("[data-testid=wave-plan]").innerText();
    check(plan.includes(expect.wavePlan), `the wave plan reads "${plan}", not "${expect.wavePlan}"`);
  }
  if (expect.stageOnly) await page.check("[data-testid=stage-only]");
  if (expect.dryRun) {
    // What the update changes, before deploying it.
    await page.click("[data-testid=dry-run]");
    await page.waitForFunction((d) => document.querySelector("[data-testid=dry-run-result]")?.textContent.includes(`${d}: lacks`), expect.dryRun, { timeout: 90000 });
    const said = await page.locator("[data-testid=dry-run-result]").innerText();
    check(said.includes(expect.dryRunPackage), `the preview does not name ${expect.dryRunPackage}: ${said}`);
    check(/sends \d/.test(await page.locator(`[data-device-send="${expect.dryRun}"]`).innerText()), `the preview does not say what ${expect.dryRun} receives: ${said}`);
  }
  const button = page.locator("[data-testid=deploy-submit]");
  check((await button.innerText()).includes("Commit & Deploy"), "uncommitted changes offer Commit & Deploy");
  await page.screenshot({ path: `${shots}/${phase}-deploy.png`, fullPage: true });
  await button.click();

  // The task page updates live (no reload) until the deployment is finished.
  await page.waitForURL(/#\/tasks\/\d+/);
  const ended = expect.state || "finished";
  await page.waitForFunction((s) => document.querySelector("[data-testid=task-state]")?.textContent === s, ended, { timeout: 90000 });
  if (expect.rollout) {
    const status = await page.locator("[data-testid=rollout-status]").innerText();
    check(status.includes(expect.rollout), `the rollout says "${status}", not "${expect.rollout}"`);
    const error = await page.locator("[data-testid=task-error]").innerText();
    check(error.includes(expect.halted), `the task says "${error}", not why it halted ("${expect.halted}")`);
    check(await page.locator("[data-testid=resume]").isVisible(), "a halted rollout offers Resume");
  }
  for (const [device, text] of Object.entries(expect.results)) {
    const cell = (await page.locator(`tr[data-child="${device}"] [data-testid=child-result]`).innerText()).trim();
    check(cell.includes(text), `${device}: "${cell}" does not say "${text}"`);
  }
  // How far, how long, what: the start, the duration, the commit's subject, sizes.
  const took = await page.locator("[data-testid=task-duration]").innerText();
  check(/^\d+ (s|min)/.test(took), `the task's duration reads "${took}"`);
  const subject = await page.locator("[data-testid=task-commit-subject]").innerText();
  check(subject.trim().length > 0, "the task does not show its commit's message");
  for (const cell of await page.locator("[data-testid=child-bytes]").allInnerTexts()) {
    check(/^\d+(\.\d)? (B|KiB|MiB|GiB)/.test(cell), `bytes read "${cell}"`);
  }
  await page.screenshot({ path: `${shots}/${phase}-task.png`, fullPage: true });
  if (expect.activate) {
    // Staged devices switch when told to, through the normal path.
    await page.click("[data-testid=activate]");
    await page.waitForFunction(() => document.querySelector("[data-testid=task-state]")?.textContent === "finished", null, { timeout: 90000 });
    for (const [device, text] of Object.entries(expect.activate)) {
      const cell = (await page.locator(`tr[data-child="${device}"] [data-testid=child-result]`).innerText()).trim();
      check(cell.includes(text), `${device} after Activate: "${cell}" does not say "${text}"`);
    }
    await page.screenshot({ path: `${shots}/${phase}-activated.png`, fullPage: true });
  }

  // The other views.
  await page.click("[data-testid=nav-tasks]");
  await page.waitForSelector("[data-testid=tasks-table]");
  await page.screenshot({ path: `${shots}/${phase}-tasks.png`, fullPage: true });
  await page.click("[data-testid=nav-configs]");
  await page.waitForSelector("[data-build]");
  await page.screenshot({ path: `${shots}/${phase}-configurations.png`, fullPage: true });

  // Readable on a phone.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.click("[data-testid=nav-devices]");
  await page.waitForSelector("[data-testid=devices-table]");
  await page.screenshot({ path: `${shots}/${phase}-phone.png`, fullPage: true });

  // Log out: the session is gone, the log-in form is back.
  await page.click("[data-testid=logout-button]");
  await page.waitForSelector("[data-testid=login-token]");
  const after = await page.evaluate(async () => (await fetch("/api/v1/devices")).status);
  check(after === 401, `after logging out the API answers ${after}`);
  console.log(`ui phase ${phase}: ok`);
} catch (err) {
  // What the page showed when it failed, for the test's output.
  if (page) {
    console.error(`the page at ${page.url()} showed:\n${await page.locator("body").innerText().catch(() => "?")}`);
    await page.screenshot({ path: `${shots}/${phase}-failure.png`, fullPage: true }).catch(() => {});
  }
  throw err;
} finally {
  await browser.close();
}
