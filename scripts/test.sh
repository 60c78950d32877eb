#!/usr/bin/env bash
# Sets up everything (Python env, headless Chromium for the browser test) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install Debian chromium; browser tests will fail" >&2
  else
    echo "warning: /usr/bin/chromium missing (sudo apt-get install chromium); browser tests will fail" >&2
  fi
fi
. .venv/bin/activate
set +e
python -P -m pytest "$@"  # -P: not the working directory first on sys.path (see pyproject)
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$rc"
