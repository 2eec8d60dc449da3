// Drives the demo page as a user would: node tests/web/browser_demo.mjs URL ARTIFACTS_DIR [MAX_NEW_TOKENS]
// For each adapter in the page's list (then the base model): pick it, read the switch time the page shows,
// type each sample prompt, press Generate and record the text as it streams in (a MutationObserver on the
// output, installed by this script, not by the page). Saves a screenshot into ARTIFACTS_DIR and prints one
// JSON line with everything seen; tests/web/test_browser.py judges it against Python's runtime.
import fs from "node:fs";
import path from "node:path";
import { main, openDemo } from "./browser_lib.mjs";

main(async () => {
  const [url, artifacts, maxNewTokens = "16"] = process.argv.slice(2);
  const { browser, page, logs } = await openDemo(url);
  try {
    const setup = await page.evaluate(() => ({
      crossOriginIsolated: globalThis.crossOriginIsolated, threads: window.ia3demo.state.threads,
      sessionsOpened: window.ia3demo.state.sessionsOpened,
      adapters: [...document.querySelectorAll("#adapter option")].map((o) => o.value).filter(Boolean),
      prompts: [...document.querySelectorAll("#prompts option")].map((o) => o.value),
      sizes: [...document.querySelectorAll("#sizes tbody tr")].map((tr) => [tr.children[0].textContent,
        Number(tr.dataset.bytes)]),
    }));
    await page.fill("#max-tokens", maxNewTokens);
    const runs = [];
    for (const adapter of [...setup.adapters, ""]) {  // the select starts on the base: each pick is a change
      await page.selectOption("#adapter", adapter);
      const switchMs = Number(await page.getAttribute("#switch-ms", "data-ms"));
      for (const prompt of setup.prompts) {
        await page.fill("#prompt", prompt);
        await page.evaluate(() => {  // snapshots of the shown continuation while the page is generating
          const out = document.getElementById("output");
          window.seen = [];
          window.observer?.disconnect();
          window.observer = new MutationObserver(() => {
            const text = out.textContent;
            if (document.body.dataset.state === "generating" && text !== window.seen.at(-1)) window.seen.push(text);
          });
          window.observer.observe(out, { childList: true, characterData: true, subtree: true });
        });
        await page.click("#generate");
        await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 120000 });
        const run = await page.evaluate(() => ({ status: document.getElementById("status").textContent,
          text: document.getElementById("output").dataset.text, shown: document.getElementById("output").textContent,
          seen: window.seen, last: window.ia3demo.state.runs.at(-1) }));
        if (run.status !== "done") throw new Error(`${adapter || "base"} / ${prompt}: ${run.status}`);
        runs.push({ adapter: adapter || null, prompt, switchMs, text: run.text, shown: run.shown,
                    tokens: run.last.tokens, partials: run.seen.filter((t) => t !== run.shown).length,
                    firstTokenMs: run.last.firstTokenMs, ms: run.last.ms });
      }
    }
    await page.selectOption("#adapter", setup.adapters[0]);  // the screenshot shows an adapter's output
    await page.fill("#prompt", setup.prompts.at(-1));
    await page.click("#generate");
    await page.waitForSelector("body[data-state=done]");
    fs.mkdirSync(artifacts, { recursive: true });
    const screenshot = path.resolve(artifacts, "demo_page.png");
    await page.screenshot({ path: screenshot, fullPage: true });
    const sessionsAfter = await page.evaluate(() => window.ia3demo.state.sessionsOpened);
    return { ...setup, sessionsAfter, runs, screenshot, console: logs };
  } finally {
    await browser.close();
  }
});
