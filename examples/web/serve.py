"""The demo page's static server: `python examples/web/serve.py` (from the repository root, after `npm ci`).

Why not `python -m http.server`: onnxruntime-web runs WASM on several threads only in a
cross-origin-isolated page (SharedArrayBuffer), which needs the COOP/COEP headers this handler adds.
It binds 127.0.0.1 only and serves three folders of the repository and nothing else: the page
(examples/web), the pinned npm packages (node_modules) and the prepared model (build/web, written
first by prepare.py when it is missing). The first line it prints is the page's address.
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import posixpath
import subprocess
import sys
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PAGE = "/examples/web/index.html"


class IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler + cross-origin isolation headers, limited to the server's `served` folders
    (URL prefix -> folder)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")  # a re-prepared model is never served stale
        super().end_headers()

    def translate_path(self, path):
        """The file a URL names inside one of the served folders, or "" (404) for anything else."""
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path)).lstrip("/")
        if "\0" in path:  # open() would raise mid-response and drop the connection
            return ""
        for prefix, folder in self.server.served.items():
            if path.startswith(prefix) and ".." not in path.split("/"):
                return os.path.join(folder, *path[len(prefix):].split("/"))
        return ""

    def send_head(self):
        if urllib.parse.urlsplit(self.path).path in ("", "/"):
            self.send_response(302)
            self.send_header("Location", PAGE)
            self.end_headers()
            return None
        if not self.translate_path(self.path):
            self.send_error(404, "not served: the demo serves examples/web/, node_modules/ and build/web/ only")
            return None
        return super().send_head()

    def log_message(self, format, *args):  # quiet unless asked: the test reads the first line only
        if self.server.verbose:
            super().log_message(format, *args)


@contextlib.contextmanager
def running(build: str):
    """This server in a child process on a free loopback port, serving `build` as it is: yields the
    page's URL (for the browser test and scripts/bench_web.py)."""
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", "0", "--build", build,
                               "--no-prepare"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"examples/web/serve.py exited {server.wait()} before serving")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--build", default=os.path.join(ROOT, "build", "web"),
                   help="the folder prepare.py wrote, served as /build/web/ (default: build/web)")
    p.add_argument("--no-prepare", action="store_true", help="serve --build as it is, even if missing")
    p.add_argument("--verbose", action="store_true", help="log each request")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(ROOT, "node_modules", "onnxruntime-web")):
        sys.exit("error: node_modules/onnxruntime-web is missing; run `ONNXRUNTIME_NODE_INSTALL=skip npm ci` at the repository root first")
    if not args.no_prepare and not os.path.exists(os.path.join(args.build, "demo.json")):
        sys.path.insert(0, HERE)
        import prepare
        prepare.main([args.build])
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), IsolatedHandler)
    except OSError as e:
        sys.exit(f"error: cannot listen on 127.0.0.1:{args.port} ({e.strerror}); pick another port with --port")
    with server:
        server.verbose = args.verbose
        server.served = {"examples/web/": HERE, "node_modules/": os.path.join(ROOT, "node_modules"),
                         "build/web/": os.path.abspath(args.build)}
        print(f"http://127.0.0.1:{server.server_address[1]}{PAGE}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
