#!/usr/bin/env bash
# Headless Chromium for tests/test_evaluation.py, which renders report.html and checks that every image loads.
# Installs Debian's chromium package with apt-get when /usr/bin/chromium is missing and this runs as root with
# apt-get available; otherwise it says in one line why it installed nothing (the report test then skips) and
# exits 0, so that it never fails a job.
set -uo pipefail

CHROMIUM=/usr/bin/chromium
if [[ -x "$CHROMIUM" ]]; then
    echo "setup_chromium: $CHROMIUM is already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
if [[ "$EUID" -ne 0 ]]; then
    echo "setup_chromium: not installing chromium: $CHROMIUM is missing and apt-get needs root (run this as root)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_chromium: not installing chromium: $CHROMIUM is missing and there is no apt-get (not Debian/Ubuntu)"
    exit 0
fi
if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; then
    echo "setup_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
else
    echo "setup_chromium: apt-get could not install chromium (exit $?); the report test will skip"
fi
exit 0
