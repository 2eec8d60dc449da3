// scripts/bench_web.py's onnxruntime-web runner: node tests/web/browser_bench.mjs URL SPEC_JSON
// Opens the demo page (served by examples/web/serve.py; `?threads=` from the spec) in headless chromium
// and runs examples/web/bench.mjs's loops in it on the page's live model; prints one JSON line.
import { main, openDemo } from "./browser_lib.mjs";

main(async () => {
  const [url, specJson] = process.argv.slice(2);
  const spec = JSON.parse(specJson);
  const { browser, page } = await openDemo(`${url}?threads=${spec.threads}`);
  try {
    return await page.evaluate(async (spec) => {
      const bench = await import("/examples/web/bench.mjs");
      const { model, state } = window.ia3demo;
      const runs = {};
      for (const adapter of spec.adapters) runs[adapter ?? "(base)"] = await bench.timeGenerate(model, { ...spec, adapter });
      return { openMs: state.openMs, threads: state.threads, crossOriginIsolated: state.crossOriginIsolated,
               ort: state.ortVersion, adapterLoad: state.adapters, runs,
               switches: bench.timeSwitches(model, model.adapters, spec.switchRounds) };
    }, spec);
  } finally {
    await browser.close();
  }
});
