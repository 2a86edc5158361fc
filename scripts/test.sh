#!/usr/bin/env bash
# The test command (README and .ci/run both use it): installs PyPI's scim2-server into .venv for
# the interop tests, then runs the whole suite with cargo test. PostgreSQL tests run when
# SCIMSYNC_TEST_POSTGRES is set (e.g. postgres://postgres@127.0.0.1:5432/postgres) and say
# "skipped" otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/scim2-server ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check 'scim2-server==0.8.3'
fi
export SCIMSYNC_SCIM2_SERVER="$PWD/.venv/bin/scim2-server"
exec cargo test --locked "$@"
