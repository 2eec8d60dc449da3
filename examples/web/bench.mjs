// Timing loops shared by scripts/bench_web.py's two JavaScript runners (onnxruntime-node in Node, and
// onnxruntime-web in the demo page, which imports this file), so both measure exactly the same thing.
const now = () => performance.now();
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

/** Greedy generation from token ids with `adapter` active: one warm-up, then `repeats` timed runs.
 * -> { tokens (of the last run), ms: [...], firstTokenMs: [...] } */
export async function timeGenerate(model, { adapter, ids, maxNewTokens, repeats }) {
  model.useAdapter(adapter);
  await model.generate(ids, { maxNewTokens, temperature: 0 });
  const ms = [], firstTokenMs = [];
  let tokens = null;
  for (let i = 0; i < repeats; i++) {
    const r = await model.generate(ids, { maxNewTokens, temperature: 0 });
    ms.push(r.ms);
    firstTokenMs.push(r.firstTokenMs);
    tokens = r.tokens;
  }
  return { tokens, ms, firstTokenMs };
}

/** `rounds` switches cycling through `names` (and the base, null), each timed as useAdapter reports it
 * and by the caller's clock around it; meanMs is the whole loop's time per switch, which resolves what a
 * single reading rounds to 0 (a cross-origin-isolated page's clock ticks in 5 us).
 * -> { medianMs, maxMs, outerMedianMs, meanMs, rounds } */
export function timeSwitches(model, names, rounds) {
  const cycle = [...names, null], inner = [], outer = [];
  const loop = now();
  for (let i = 0; i < rounds; i++) {
    const start = now();
    inner.push(model.useAdapter(cycle[i % cycle.length]));
    outer.push(now() - start);
  }
  const meanMs = (now() - loop) / rounds;
  return { medianMs: median(inner), maxMs: Math.max(...inner), outerMedianMs: median(outer), meanMs, rounds };
}
