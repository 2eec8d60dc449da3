"""Long commands show stages on a terminal and nothing when piped or with --quiet (CI logs stay clean)."""
from __future__ import annotations

import os
import pty
import subprocess
import threading

from cli_helpers import EXE, run_cli


def run_on_terminal(*args) -> tuple[int, str, str]:
    """The installed script with stderr on a pseudo-terminal, as in an interactive shell."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([EXE, *map(str, args)], stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout = proc.stdout.read()
    code = proc.wait()
    reader.join(timeout=30)
    os.close(leader)
    return code, stdout, b"".join(chunks).decode()


def test_export_shows_its_stages_on_a_terminal(model_dir, tmp_path):
    code, stdout, terminal = run_on_terminal("export", model_dir("llama"), "--out", tmp_path / "o", "--mode", "swappable")
    assert code == 0, terminal
    stages = [line.split("] ", 1)[1] for line in terminal.splitlines() if line.startswith("[")]
    assert stages[0].startswith(f"loading {model_dir('llama')}")
    assert "tracing model.onnx" in stages and "validating model.onnx against PyTorch on ONNX Runtime" in stages
    assert stdout.startswith("exported llama")  # the result itself stays on stdout


def test_merge_is_silent_with_quiet_or_when_piped(model_dir, adapter_dir, tmp_path):
    code, stdout, terminal = run_on_terminal("merge", model_dir("llama"), adapter_dir("llama"), "--out", tmp_path / "a",
                                             "--quiet")
    assert code == 0 and terminal.strip() == "", terminal
    piped = run_cli("merge", model_dir("llama"), adapter_dir("llama"), "--out", tmp_path / "b")
    assert piped.exit_code == 0 and piped.stderr == "", piped.stderr
    code, stdout, terminal = run_on_terminal("merge", model_dir("llama"), adapter_dir("llama"), "--out", tmp_path / "c")
    assert code == 0 and "saving the merged model to" in terminal, terminal
