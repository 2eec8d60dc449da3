// float32 -> float16 bits -> float, through ia3.mjs's converters, for values given as float32 bit patterns.
import { floatToHalf, halfToFloat } from "../../ia3_export/web/ia3.mjs";

const bits = JSON.parse(process.argv[2]);
const f = new Float32Array(Uint32Array.from(bits).buffer);
const half = Array.from(f, floatToHalf);
console.log(JSON.stringify({ half, back: half.map((h) => String(halfToFloat(h))) }));
