# Create (or reuse) .venv with everything releaser and its tests need. Sourced by the demo and test scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[${RELEASER_EXTRAS:-test}]" 2>&1 | grep -v '^WARNING: Location' || true
