"""`parity --runtime node`: the same cases, scenarios and greedy prompts run through the shipped
JavaScript module (ia3_export/web/ia3.mjs) on onnxruntime-node, in one Node child process
(ia3_export/web/parity.mjs) that answers one JSON line per request.

`NodeSession` stands where the check uses an `IA3Session` (`graphs`, `load_adapter`, `run`, and
`generate_ids` for the greedy prompts, each alone: the module generates one prompt at a time).
Adapters reach the module as the `.onnx_adapter` files it reads; a PEFT folder is converted first
(the same `convert_adapter` as `ia3-export convert`). Beside the outputs, the vectors the module
parsed and feeds are compared with the PEFT adapter's, so a corrupted vector fails by its name.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import types

import numpy as np

from ..compare import compare
from ..errors import IA3Error
from ..formats.adapter_format import VECTOR_SUFFIX
from ..formats.onnx_adapter import SUFFIX
from ..runtime.adapters import convert_adapter
from ..web import runner_path
from .report import OutputCheck

REPLY = "@ia3@ "
NODE_MODULES_ENV = "IA3_NODE_MODULES"
JS_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def node_modules(path: str | None) -> str:
    """The node_modules folder whose onnxruntime-node runs the check: the option, else $IA3_NODE_MODULES,
    else ./node_modules (the user's project). Missing Node or package: one line saying how to get it."""
    path = os.path.abspath(path or os.environ.get(NODE_MODULES_ENV) or "node_modules")
    if shutil.which("node") is None:
        raise IA3Error("--runtime node needs Node.js (18 or later) on PATH; install it, or check with --runtime python")
    if not os.path.isfile(os.path.join(path, "onnxruntime-node", "package.json")):
        raise IA3Error(f"onnxruntime-node is not installed in {path}; run `npm install onnxruntime-node` in your project, "
                       f"or name its node_modules with --node-modules (or ${NODE_MODULES_ENV})")
    return path


class NodeSession:
    """An exported folder opened by ia3.mjs in a Node child process."""

    def __init__(self, folder, modules: str | None = None):
        if (folder.cache or {}).get("kv_layout") not in (None, "concat"):
            raise IA3Error(f"{folder.path} keeps one KV buffer for past and present (--graph fused); ia3.mjs runs "
                           "exports with the concat KV cache: check this one with --runtime python")
        self.folder = folder
        self._tmp = tempfile.TemporaryDirectory(prefix="ia3-node-parity-")
        self._log = tempfile.TemporaryFile("w+")  # Node's stderr: a file, since a full pipe would stall Node
        self._proc = subprocess.Popen(["node", runner_path(), node_modules(modules)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        try:
            info = self._ask("open", folder=os.path.abspath(folder.path))
        except IA3Error:
            self.close()
            raise
        self.version = info["version"]
        outputs = list(info["outputs"])
        self.graphs = {"model": types.SimpleNamespace(inputs=dict.fromkeys(info["inputs"]), initializer_inputs={},
                                                      outputs=outputs)}
        self.loaded: dict[str, str] = {}

    def _ask(self, op: str, **request):
        try:
            self._proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
            self._proc.stdin.flush()
            for line in self._proc.stdout:
                if line.startswith(REPLY):
                    reply = json.loads(line[len(REPLY):])
                    if "error" in reply:
                        raise IA3Error(f"ia3.mjs on onnxruntime-node: {reply['error']}")
                    return reply["result"]
        except BrokenPipeError:
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._log.seek(0)
        lines = self._log.read().strip().splitlines()
        said = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")  # not Node's version line
        raise IA3Error("the Node parity runner stopped: " + (said.strip()[:300] or f"exit {self._proc.poll()}"))

    def load_adapter(self, source: str, name: str) -> str:
        """Load an .onnx_adapter file, or a PEFT folder converted to one, into the module."""
        path = source
        if not source.endswith(SUFFIX):
            path = os.path.join(self._tmp.name, name + SUFFIX)
            convert_adapter(source, self.folder.path, path, force=True)
        self._ask("load", name=name, path=os.path.abspath(path))
        self.loaded[name] = path
        return name

    def run(self, feeds: dict, graph: str | None = None, adapters: list | None = None, outputs: list | None = None,
            **_) -> dict:
        outputs = outputs or self.graphs["model"].outputs
        sent = {name: _encode(value) for name, value in feeds.items()}
        got = self._ask("run", feeds=sent, rows=adapters, outputs=outputs)
        return {name: _decode(got[name]) for name in outputs}

    def generate_ids(self, prompts, adapters, options) -> list[list[int]]:
        """Greedy tokens per prompt, each generated alone by the module with the KV cache."""
        adapters = adapters or [None] * len(prompts)
        return [self._ask("generate", ids=[int(t) for t in p], adapter=a, maxNewTokens=options.max_new_tokens)
                for p, a in zip(prompts, adapters)]

    def vector_checks(self, reference, atol: float, rtol: float) -> list[OutputCheck]:
        """The vectors the module parsed and feeds, against the PEFT adapter's, one comparison per vector."""
        checks = []
        for adapter, name in zip(reference.adapters, reference.names):
            if name not in self.loaded:  # merged: folded into the weights, no file to read
                continue
            got = self._ask("vectors", name=name)
            for module, want in adapter.vectors().items():
                key = module + VECTOR_SUFFIX
                actual = np.frombuffer(base64.b64decode(got[key]), dtype=np.float32) if key in got else np.array([])
                checks.append(OutputCheck("ia3.mjs", f"adapter {name}", f"vectors as loaded from {os.path.basename(self.loaded[name])}",
                                          compare(key, np.asarray(want, np.float64).reshape(-1), actual, atol, rtol)))
        return checks

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()
        self._tmp.cleanup()


def _encode(value) -> dict:
    array = np.ascontiguousarray(value)
    dtype = next((js for js, np_type in JS_TYPES.items() if array.dtype == np_type), None)
    if dtype is None:
        raise IA3Error(f"the Node parity runner takes no {array.dtype} inputs")
    return {"dtype": dtype, "dims": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode()}


def _decode(tensor: dict) -> np.ndarray:
    dtype = JS_TYPES.get(tensor["dtype"])
    if dtype is None:
        raise IA3Error(f"ia3.mjs returned a {tensor['dtype']} tensor; the parity runner reads {', '.join(JS_TYPES)}")
    return np.frombuffer(base64.b64decode(tensor["b64"]), dtype=dtype).reshape(tensor["dims"])
