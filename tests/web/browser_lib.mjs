// Shared by the browser drivers: Debian's chromium through playwright-core (no browser download), opened on
// the demo page until it says it is ready. Each launch gets a fresh user data dir (playwright's launch makes one).
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.IA3_CHROMIUM ?? "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

/** Launch chromium, open `url`, wait until the page is ready; returns { browser, page, logs }. A page that
 * shows an error throws with the page's message and its console. */
export async function openDemo(url, { timeoutMs = 180000 } = {}) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  const page = await browser.newPage({ viewport: { width: 900, height: 760 } });
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => logs.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
  try {
    await page.goto(url);
    await page.waitForSelector("body[data-state=ready], body[data-state=error]", { timeout: timeoutMs });
    const failed = await page.$("body[data-state=error]");
    if (failed) throw new Error(`${await page.textContent("#status")}\n${logs.join("\n")}`);
  } catch (e) {
    await browser.close();
    throw new Error(`${e.message}\n--- page console ---\n${logs.join("\n")}`);
  }
  return { browser, page, logs };
}

/** Print one JSON line (what tests/web/conftest.py's node() returns) and exit; errors exit 1 on stderr. */
export function main(run) {
  run().then((result) => { process.stdout.write(JSON.stringify(result) + "\n"); process.exit(0); },
    (e) => { process.stderr.write(`${e.stack ?? e}\n`); process.exit(1); });
}
