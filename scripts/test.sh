#!/usr/bin/env bash
# The test command (README and .ci/run both use it): installs the third-party servers the
# interop tests talk to, each into its own venv (their dependencies conflict), then runs the
# whole suite with cargo test:
#   .venv           PyPI's scim2-server (SCIM 2.0 server)
#   .venv-canaille  PyPI's canaille[oidc,scim] (OAuth2 client_credentials in front of SCIM)
# PostgreSQL tests run when SCIMSYNC_TEST_POSTGRES is set (e.g.
# postgres://postgres@127.0.0.1:5432/postgres) and say "skipped" otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_quiet=(--quiet --disable-pip-version-check)
if [ ! -x .venv/bin/scim2-server ]; then
  python3 -m venv .venv
  .venv/bin/pip install "${pip_quiet[@]}" 'scim2-server==0.8.3'
fi
export SCIMSYNC_SCIM2_SERVER="$PWD/.venv/bin/scim2-server"
if [ ! -f .venv-canaille/.installed ]; then
  python3 -m venv .venv-canaille
  # canaille 0.3.6 breaks with scim2-models >= 0.10 (model_dump signature): pin it.
  .venv-canaille/bin/pip install "${pip_quiet[@]}" 'canaille[oidc,scim]==0.3.6' 'scim2-models==0.6.12'
  touch .venv-canaille/.installed
fi
export SCIMSYNC_CANAILLE_PYTHON="$PWD/.venv-canaille/bin/python"
exec cargo test --locked "$@"
