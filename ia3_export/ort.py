"""ONNX Runtime for the package: the one place that imports `onnxruntime` and `onnxruntime_genai`.

Telemetry: ORT 1.32 and onnxruntime-genai 0.18 (official builds) keep a device id and an event
queue under $XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/ (plus $TMPDIR/.ses) and, in a
process that lives about 30 s, look up and post to mobile.events.data.microsoft.com. Both read
ORT_DISABLE_TELEMETRY=1 once, when the library loads (at import): the API switch
(`disable_telemetry_events`) alone still writes the files. So the variable is set in this process's
environment before the first import, and every subprocess we start inherits it. IA3_EXPORT_TELEMETRY=1
leaves ONNX Runtime's own default. A program that imported onnxruntime before ia3_export must set
ORT_DISABLE_TELEMETRY=1 itself.

Logs: ORT's default logger and our sessions log only fatal errors, so its coloured lines (warnings,
and errors our own `error:` line repeats) do not precede that line; `--debug` (IA3_EXPORT_DEBUG=1)
shows its warnings and errors.

Which ONNX Runtime: `onnxruntime` (CPU) and `onnxruntime-gpu` (and the other builds) all own the
`onnxruntime` module, so two of them overwrite each other's files; ORT's maintainers say to install
exactly one, and the package's `cpu` and `gpu` extras give one each."""
from __future__ import annotations

import importlib
import os
from importlib import metadata

DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn")
INSTALL = "pip install 'ia3-export[cpu]' (or 'ia3-export[gpu]' for CUDA)"
TELEMETRY_OPT_IN = "IA3_EXPORT_TELEMETRY"
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}  # read by ORT and onnxruntime-genai when they load
FATAL, WARNING = 4, 2  # ORT log severities (WARNING is ORT's default; ERROR lines repeat what our error line says)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def debug() -> bool:
    """`--debug` / IA3_EXPORT_DEBUG=1: ORT's warnings on stderr, tracebacks of internal errors."""
    return _flag("IA3_EXPORT_DEBUG")


def telemetry_off() -> None:
    """Switch ORT's and genai's telemetry off for this process and its children, unless opted in."""
    if not _flag(TELEMETRY_OPT_IN):
        os.environ.update(TELEMETRY_OFF)


def child_environment() -> dict:
    """The environment for a subprocess we start (the model builder, tritonserver): telemetry off."""
    telemetry_off()
    return dict(os.environ)


def log_severity() -> int:
    """Severity for ORT's default logger and every session we create."""
    return WARNING if debug() else FATAL


def onnxruntime(submodule: str | None = None):
    """`onnxruntime` (or `onnxruntime.<submodule>`), telemetry off and its default logger quiet."""
    telemetry_off()
    import onnxruntime as ort

    if not _flag(TELEMETRY_OPT_IN):
        ort.disable_telemetry_events()
    ort.set_default_logger_severity(log_severity())
    return importlib.import_module(f"onnxruntime.{submodule}") if submodule else ort


def session_options(threads: int | None = None, spin: bool = True):
    """SessionOptions that log at `log_severity()` (optionally with `threads` intra-op threads). spin=False:
    ONNX Runtime's idle intra-op threads sleep instead of spinning, leaving the cores between runs to the
    other threads and processes of a server (docs/serving.md, "How the streamed path got here")."""
    options = onnxruntime().SessionOptions()
    options.log_severity_level = log_severity()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def genai():
    """`onnxruntime_genai` with telemetry off (ImportError when it is not installed)."""
    onnxruntime()  # genai loads ORT's library: quiet it first
    import onnxruntime_genai as og

    if not _flag(TELEMETRY_OPT_IN):
        og.disable_telemetry_events()
    return og


def installed() -> list[str]:
    """The ONNX Runtime distributions installed in this environment."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def missing_message(error: ImportError) -> str:
    return f"ONNX Runtime cannot be imported ({error}); install exactly one: {INSTALL}"


def clash_message(found: list[str]) -> str | None:
    """A warning when several builds share the module (the one imported is whichever wrote last)."""
    if len(found) < 2:
        return None
    return (f"{' and '.join(found)} are all installed and overwrite each other's `onnxruntime` module; keep one: "
            f"pip uninstall -y {' '.join(found)}, then {INSTALL}")
