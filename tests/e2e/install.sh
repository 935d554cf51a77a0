#!/usr/bin/env bash
# Installs what the end-to-end tests against the real Open WebUI need (tests/e2e, marked `e2e`):
# Open WebUI 0.12 in its own virtualenv (its pins clash with haystream's) and Debian's Chromium for Playwright.
# Usage: bash tests/e2e/install.sh [DIR]   (default .e2e; the tests find it through HAYSTREAM_E2E_OPENWEBUI)
set -euo pipefail
dir="${1:-.e2e}"
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x "$dir/openwebui/bin/open-webui" ]; then
  python3 -m venv "$dir/openwebui"
  # torch's CPU build, or Open WebUI's dependencies pull several GB of CUDA wheels.
  echo "torch==2.13.0+cpu" > "$dir/constraints.txt"
  "$dir/openwebui/bin/pip" install -q -c "$dir/constraints.txt" torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/openwebui/bin/pip" install -q -c "$dir/constraints.txt" "open-webui==0.12.4" 2>&1 | grep -v "^WARNING: Location" || true
fi
"$dir/openwebui/bin/open-webui" --help >/dev/null
echo "Open WebUI: $dir/openwebui/bin/open-webui; Chromium: $(command -v chromium)"
