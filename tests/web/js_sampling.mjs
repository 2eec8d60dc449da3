// ia3.mjs's sampling on one logit row: its probabilities and the frequencies of N seeded draws.
// Usage: node js_sampling.mjs LOGITS_JSON TEMPERATURE TOP_P N
import { chooser, probabilities } from "../../ia3_export/web/ia3.mjs";

const [row, temperature, topP, n] = [JSON.parse(process.argv[2]), Number(process.argv[3]), Number(process.argv[4]), Number(process.argv[5])];
const logits = Float32Array.from(row);
const counts = new Array(logits.length).fill(0);
const choose = chooser(temperature, topP, 11);
for (let i = 0; i < n; i++) counts[choose(logits)] += 1;
console.log(JSON.stringify({ probabilities: Array.from(probabilities(logits, temperature, topP)), counts }));
