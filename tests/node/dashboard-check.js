// Drives the admin dashboard in headless Chromium (playwright-core with the
// system's chromium). Talks to the Rust test over stdin/stdout, one JSON
// line per step:
//   -> {"step":"servers","states":{...}}   every expected server shown
//   <- "killed <id>"                        the test killed that server
//   -> {"step":"down","after":ms}           the page shows it down
//   -> {"step":"done","consoleErrors":[...]}
// usage: node dashboard-check.js <dashboard-url> <token> <screenshot.png> <id>...
const readline = require("readline");
const { chromium } = require("playwright-core");

const [url, token, shot, ...ids] = process.argv.slice(2);
const say = (o) => console.log(JSON.stringify(o));
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

async function states(page) {
  return page.$$eval("#servers tr", (rows) =>
    Object.fromEntries(rows.map((r) => [r.dataset.server, r.dataset.state])));
}

async function until(page, what, test, ms) {
  const start = Date.now();
  for (;;) {
    const s = await states(page);
    if (test(s)) return { states: s, after: Date.now() - start };
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
    await page.waitForTimeout(100);
  }
}

(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    // the token is asked once, then kept for the tab
    await page.waitForSelector("#login:not(.hidden)", { timeout: 10000 });
    await page.fill("#token", token);
    await page.click("#login button");
    const shown = await until(page, "every server", (s) => ids.every((id) => s[id] === "up"), 15000);
    say({ step: "servers", states: shown.states });
    await page.reload(); // the token survives a reload of the tab
    await page.waitForSelector("#app:not(.hidden)", { timeout: 10000 });
    const rl = readline.createInterface({ input: process.stdin });
    const line = await new Promise((res) => rl.once("line", res));
    const killed = line.trim().split(/\s+/)[1];
    const down = await until(page, `${killed} down`, (s) => s[killed] === "down", 15000);
    say({ step: "down", after: down.after, states: down.states });
    await page.waitForTimeout(Number(process.env.SETTLE_MS || 1500)); // let the charts draw more points
    await page.screenshot({ path: shot, fullPage: true });
    say({ step: "done", consoleErrors: errors });
    rl.close();
  } catch (e) {
    say({ step: "failed", error: String(e), consoleErrors: errors });
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
})();
