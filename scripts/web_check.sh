#!/usr/bin/env bash
# The JavaScript job (issue 24): ia3.mjs on onnxruntime-node and, through the demo page (examples/web),
# on onnxruntime-web in Debian's headless chromium, checked against the installed wheel's Python
# runtime by tests/web (IA3_WEB=1). Like the other venv jobs it installs what it needs itself:
#   - Debian's chromium when ${IA3_CHROMIUM:-/usr/bin/chromium} is missing (apt-get; root, as in CI),
#     and Node from Debian when there is none;
#   - the npm packages pinned by package-lock.json (`npm ci`; ONNXRUNTIME_NODE_INSTALL=skip: the CPU
#     binaries ship in the npm package, the install script would only fetch CUDA ones from nuget).
#     A node_modules that is a symlink (a development worktree sharing another's) is used as it is.
# The tests run on the main .venv (scripts/setup.sh: the wheel installed, not the source tree) with
# PYTHONSAFEPATH=1, as scripts/test.sh runs the main suite. The page's screenshot is kept in
# $IA3_WEB_ARTIFACTS (default runs/web). Arguments go to pytest.
#   scripts/web_check.sh [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IA3_VENV:-.venv}
apt_install() {
  [ "$(id -u)" = 0 ] || { echo "web_check.sh: $1 is missing; install it: sudo apt-get install -y $*" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
[ -x "${IA3_CHROMIUM:-/usr/bin/chromium}" ] || apt_install chromium
command -v node >/dev/null || apt_install nodejs npm
if [ -L node_modules ]; then
  echo "web_check.sh: node_modules is a link ($(readlink node_modules)): using it as it is, no npm ci"
else
  ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
fi
[ -x "$VENV/bin/python" ] || { echo "web_check.sh: no $VENV; run scripts/setup.sh first" >&2; exit 1; }
export IA3_WEB=1 PYTHONSAFEPATH=1 IA3_TEST_INSTALLED=1
export IA3_WEB_ARTIFACTS=${IA3_WEB_ARTIFACTS:-$PWD/runs/web}
mkdir -p "$IA3_WEB_ARTIFACTS"
echo "node $(node --version), $("${IA3_CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null), artefacts in $IA3_WEB_ARTIFACTS"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/web "$@"
