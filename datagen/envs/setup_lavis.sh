#!/usr/bin/env bash
# Build the LAVIS caption backend's Python environment, .venv-lavis at the repository root.
#
#   bash datagen/envs/setup_lavis.sh            # idempotent: does nothing when already up to date
#   LAVIS_VENV=/some/where bash datagen/envs/setup_lavis.sh
#
# salesforce-lavis 1.0.2 needs transformers 4.26 and numpy<2, which .venv cannot have, so its Ray actors run
# under this interpreter (see datagen/stages/models/lavis.py: LavisCaption.runtime_env). The env must use the
# same Python (major.minor.micro) and the same ray as the driver, and must import this repository's datagen
# package: a .pth file puts the repository root on its sys.path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LAVIS_VENV:-$ROOT/.venv-lavis}"
REQ="$ROOT/datagen/envs/lavis-requirements.txt"
LOCK="$ROOT/datagen/envs/lavis-constraints.txt"
# Same base interpreter as the main env: Ray refuses workers whose Python differs from the driver's.
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3.11"; fi
fi

# The stamp records what the env was built from; a change of the pins or of this script rebuilds it.
want="$(cat "$REQ" "$LOCK" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
stamp="$VENV/.layerdiff-lavis-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    echo "setup_lavis: $VENV is up to date"
    exit 0
fi

echo "setup_lavis: building $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
"${PIP[@]}" install --quiet "pip==24.3.1" "setuptools<81" wheel

# The lock pins every package, torch's CUDA libraries included (the same versions as the main env's
# constraints.txt, so both envs share one CUDA stack); torch and its CUDA wheels come from the local index.
# fairscale 0.4.4 is an sdist whose setup.py imports torch: install torch first, then build fairscale
# without isolation so it sees that torch instead of fetching another one into a build env.
"${PIP[@]}" install -c "$LOCK" "$(grep -E '^torch==' "$REQ")" "$(grep -E '^torchvision==' "$REQ")" \
    "$(grep -E '^numpy==' "$REQ")"
"${PIP[@]}" install --no-build-isolation -c "$LOCK" "$(grep -E '^fairscale==' "$REQ")"
rest="$(mktemp)"
trap 'rm -f "$rest"' EXIT
grep -vE '^(salesforce-lavis|fairscale)==' "$REQ" >"$rest"
"${PIP[@]}" install -c "$LOCK" -r "$rest"
# salesforce-lavis' declared dependencies include packages without Python 3.11 wheels (open3d, ...) and
# many it never imports for captioning; the ones it does import are pinned above.
"${PIP[@]}" install --no-deps "$(grep -E '^salesforce-lavis==' "$REQ")"

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT" >"$site/layerdiff-repo.pth"

# Smoke test: LAVIS, its model registry and our backend module import in this env.
(cd "$ROOT" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -c '
import lavis.models, numpy, transformers, ray
import datagen.stages.models.lavis as m
assert numpy.__version__.startswith("1."), numpy.__version__
print("setup_lavis: ok: lavis", __import__("importlib.metadata").metadata.version("salesforce-lavis"),
      "transformers", transformers.__version__, "numpy", numpy.__version__, "ray", ray.__version__)
')
echo "$want" >"$stamp"
