"""The demo page's model: `python examples/web/prepare.py [OUT]` (default build/web, gitignored).

Writes, all at once (an atomic folder, as every output of the project):
- `train/`: the embedded tiny causal LM (ia3_export.examples.shipped.tiny_causal_lm: a tiny Llama
  pretrained on a toy world where animals are mostly followed by their colour, and an IA3 adapter
  trained to say their sound instead) and two adapters with random vectors, PEFT folders;
- `model/`: ONE swappable export of the base with the three adapters, which the page loads once and
  switches between; the JavaScript module reads the `.onnx_adapter` files the export ships in `adapters/`;
- `merged/`: the same base with the `sounds` adapter folded in (merged mode), what a user would
  download per adapter without swappable exports: the page shows the two sizes side by side;
- `js/`: the JavaScript module (ia3_export/web/*.mjs, or the folder $IA3_WEB_MODULE names);
- `demo.json`: what the page lists (adapters, files, sizes, sample prompts).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(ROOT, "build", "web")
RANDOM_ADAPTERS = {"random-1": 1, "random-2": 2}  # name -> seed of ia3_export.examples.tiny.randomize_adapter
# The pretrained toy base shrugs off small random scalings (ones +- 0.5 or 0.9 left its greedy text as it
# was for these prompts): +- 1.5 changes it visibly, as a real second task would.
RANDOM_SPREAD = 1.5
PROMPTS = ["the cat ", "the owl ", "the sheep "]  # "sheep" is an animal the adapter never saw


def module_dir() -> str:
    """The folder holding ia3.mjs: $IA3_WEB_MODULE (a path to ia3.mjs, for trying a module in
    development) or the installed package's copy."""
    path = os.environ.get("IA3_WEB_MODULE")
    if not path:
        from ia3_export.web import module_path
        path = module_path()
    if not os.path.isfile(path):
        from ia3_export.errors import IA3Error
        raise IA3Error(f"no JavaScript module at {path}; point IA3_WEB_MODULE at an ia3.mjs or install ia3-export")
    return os.path.dirname(os.path.abspath(path))


def graph_bytes(folder: str) -> int:
    """Bytes of an export's graphs (model.onnx and any external data): the model a page downloads."""
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.onnx*")))


def random_adapter(base_dir: str, out: str, seed: int) -> str:
    """An adapter with random vectors (ones +- RANDOM_SPREAD) on the default targets: different text."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter

    model = IA3Model(load_base_model(base_dir), IA3Config(task_type="CAUSAL_LM"))
    randomize_adapter(model, "default", seed=seed, spread=RANDOM_SPREAD)
    return model.save_adapter(out)


def demo_model(tmp: str) -> tuple[str, list[str]]:
    """The page's default model: the trained toy LM, its `sounds` adapter first, then the random ones."""
    from ia3_export.examples.shipped import tiny_causal_lm

    lm = tiny_causal_lm(os.path.join(tmp, "train", "lm"))
    sounds = os.path.join(tmp, "train", "sounds")
    shutil.copytree(lm["adapter_dir"], sounds)
    return lm["base_dir"], [sounds] + [random_adapter(lm["base_dir"], os.path.join(tmp, "train", name), seed)
                                       for name, seed in RANDOM_ADAPTERS.items()]


def prepare(out: str = DEFAULT_OUT, model=demo_model, prompts=PROMPTS) -> dict:
    """Build the page's folder at `out` (replacing one this script wrote before); returns demo.json's
    content. `model(tmp) -> (base_dir, adapter_dirs)` writes the inputs inside the folder being built
    (scripts/bench_web.py passes a larger one); the first adapter is also merged, for the size comparison."""
    from ia3_export.export import export_model
    from ia3_export.formats.atomic import atomic_output_dir, open_for_writing
    from ia3_export.formats.jsonfile import dumps
    from ia3_export.formats.manifest import MERGED, SWAPPABLE

    js = module_dir()
    out = os.path.abspath(out)
    with atomic_output_dir(out, force=True) as tmp:
        base_dir, adapters = model(tmp)
        model_dir = os.path.join(tmp, "model")
        shipped = export_model(base_dir, model_dir, mode=SWAPPABLE, adapters=adapters)["adapters"]
        export_model(base_dir, os.path.join(tmp, "merged"), mode=MERGED, adapters=adapters[:1])
        os.makedirs(os.path.join(tmp, "js"))
        for path in glob.glob(os.path.join(js, "*.mjs")):
            shutil.copyfile(path, os.path.join(tmp, "js", os.path.basename(path)))
        demo = {
            "model": "model/", "module": "js/ia3.mjs", "prompts": list(prompts),
            "base": {"bytes": graph_bytes(model_dir)},
            "adapters": [{"name": a["name"], "file": f"model/{a['file']}",
                          "bytes": os.path.getsize(os.path.join(model_dir, a["file"]))} for a in shipped],
            "merged": {"adapter": shipped[0]["name"], "dir": "merged/", "bytes": graph_bytes(os.path.join(tmp, "merged"))},
        }
        with open_for_writing(os.path.join(tmp, "demo.json")) as f:
            f.write(dumps(demo) + "\n")
    return demo


def main(argv=None) -> None:
    """The command: prepare OUT (default build/web); a bad input is one `error:` line, exit 1."""
    from ia3_export.errors import IA3Error

    argv = sys.argv[1:] if argv is None else argv
    try:
        done = prepare(argv[0] if argv else DEFAULT_OUT)
    except IA3Error as e:
        sys.exit(f"error: {e}")
    print(f"prepared {len(done['adapters'])} adapters: {', '.join(a['name'] for a in done['adapters'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
