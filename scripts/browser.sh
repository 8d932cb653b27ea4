#!/usr/bin/env bash
# The browser the search-page tests drive: Debian's chromium (Playwright cannot download its own
# here). Installed when missing and this runs as root (CI does); otherwise says what to run.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/browser.sh: /usr/bin/chromium is missing; run: sudo apt-get install -y chromium" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >&2 || { apt-get update -q >&2 && apt-get install -y -q chromium >&2; }
