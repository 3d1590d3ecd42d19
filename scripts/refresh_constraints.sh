#!/usr/bin/env bash
# Rewrite constraints.txt from what .venv holds now. Run it deliberately, after the test suite passed: the file is
# the record of versions known to work, and scripts/setup.sh installs everything within it.
set -euo pipefail
cd "$(dirname "$0")/.."

# --exclude-editable leaves out gptpipe itself (installed with -e); the grep also drops any other editable, file://
# or `name @ url` line, which pins a checkout on one machine rather than a version anyone can install.
freeze=$(.venv/bin/python -m pip --disable-pip-version-check freeze --exclude-editable)
dropped=$(grep -E '^-e |file://| @ ' <<<"$freeze" || true)
if [ -n "$dropped" ]; then
  echo "refresh_constraints: left out (not a pinned version):" >&2
  echo "$dropped" >&2
fi

# Written beside constraints.txt and moved over it, so a failure never leaves a half-written lock.
tmp=$(mktemp constraints.txt.XXXXXX)
trap 'rm -f "$tmp"' EXIT
{
  echo "# The exact versions of every package in .venv when the test suite passed (pip freeze, without gptpipe)."
  echo "# scripts/setup.sh installs with this file as pip constraints, its torch line swapped for the torch installed."
  echo "# Rewrite it deliberately, after a green suite: bash scripts/refresh_constraints.sh"
  grep -vE '^-e |file://| @ |^#|^gptpipe==' <<<"$freeze" | LC_ALL=C sort -f
} > "$tmp"
chmod 644 "$tmp"
mv "$tmp" constraints.txt
echo "refresh_constraints: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
