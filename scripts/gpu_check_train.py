"""GPU check of training (run on a CUDA machine from the repo root): fp32/bf16/fp16 autocast,
activation checkpointing and Adafactor on CUDA, and CUDA fp32 vs CPU on the same run. Writes
$OUT/gpu_train_check.json (or /tmp/...)."""
import json, os, sys, time, traceback
sys.path.insert(0, os.getcwd())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers
out = os.environ.get("OUT", "/tmp")
res = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import peft; res["peft"] = peft.__version__
except Exception as e:
    res["peft"] = repr(e)
from ia3_export.examples.tiny import save_tiny
from ia3_export.train import train
from safetensors.torch import load_file
work = "/tmp/gtc"; os.makedirs(work, exist_ok=True)
model = save_tiny(f"{work}/llama", "llama", initializer_range=0.2)
data = f"{work}/d.jsonl"
with open(data, "w") as f:
    for i in range(48):
        f.write(json.dumps({"prompt": "x" * (1 + i % 5), "completion": "yz" * (1 + i % 3)}) + "\n")
runs = {}
for name, kw in [("cpu_fp32", dict(device="cpu")), ("cuda_fp32", dict(device="cuda")), ("cuda_bf16", dict(device="cuda", precision="bf16")),
                 ("cuda_fp16", dict(device="cuda", precision="fp16")), ("cuda_fp16_gc", dict(device="cuda", precision="fp16", gradient_checkpointing=True)),
                 ("cuda_adafactor_bf16", dict(device="cuda", precision="bf16", optimizer="adafactor"))]:
    try:
        t = time.time()
        r = train(model, data, "text-generation", f"{work}/{name}", quiet=True, force=True, max_steps=20, learning_rate=0.1, batch_size=8, **kw)
        runs[name] = {"first_loss": r.log[0]["loss"], "last_loss": r.log[-1]["loss"], "eval_before": r.metrics["eval_loss_before"],
                      "eval_after": r.metrics["eval_loss"], "seconds": round(time.time() - t, 2)}
    except Exception:
        runs[name] = {"error": traceback.format_exc()[-1500:]}
res["runs"] = runs
try:
    a = load_file(f"{work}/cpu_fp32/adapter_model.safetensors"); b = load_file(f"{work}/cuda_fp32/adapter_model.safetensors")
    res["cuda_vs_cpu_fp32_max_abs"] = max((a[k] - b[k]).abs().max().item() for k in a)
    for n in ("cuda_bf16", "cuda_fp16"):
        c = load_file(f"{work}/{n}/adapter_model.safetensors")
        res[f"{n}_vs_cpu_max_abs"] = max((a[k] - c[k]).abs().max().item() for k in a)
except Exception:
    res["compare_error"] = traceback.format_exc()[-800:]
print(json.dumps(res, indent=1))
with open(os.path.join(out, "gpu_train_check.json"), "w") as f:
    json.dump(res, f, indent=1)
