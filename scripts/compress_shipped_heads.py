"""How the shipped heads became 28.6 MB (issue #36; run once at ea24919, kept as the record):

    python scripts/compress_shipped_heads.py medusa_bench/data/heads /tmp/heads-int8

copies the heads folders, drops Hydra's fourth head (its `hydra_mlp.3.*` tensors and the depth-4
calibration paths), trims each draft_vocab.json to the tokens seen in the answers and stores every
folder's matrices in int8 (heads/io.compress_folder). New heads get the same from
`scripts/train_default_heads.sh` (`--save-dtype int8`, Hydra `--heads 3`). Results:
docs/results/cpu-heads-int8-data-curve.md.
"""
import json, shutil, sys
from pathlib import Path
from medusa_bench.heads import io

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
hydra = dst / "smollm2-135m-hydra"
t = io.load_tensors(hydra / "hydra_lm_head.pt")
t = {k: v for k, v in t.items() if not k.startswith("hydra_mlp.3.")}
(hydra / "hydra_lm_head.pt").unlink()
io.save_tensors(hydra / "hydra_lm_head.safetensors", t)
cfg = io.read_json(hydra / "config.json"); cfg["hydra_num_heads"] = 3; io.write_json(hydra / "config.json", cfg)
cal = json.loads((hydra / "calibration.json").read_text())
cal["paths"] = {p: q for p, q in cal["paths"].items() if len(p.split(",")) <= 3}
for key in ("per_depth", "top1", "top10", "positions"):
    cal[key] = cal[key][:3]
(hydra / "calibration.json").write_text(json.dumps(cal, indent=2, sort_keys=True) + "\n")
for f in dst.glob("*/draft_vocab.json"):
    d = json.loads(f.read_text())
    d["token_ids"] = d["token_ids"][: d["distinct_tokens_seen"]]
    f.write_text(json.dumps(d) + "\n")
for folder in sorted(dst.iterdir()):
    io.compress_folder(folder)
total = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
print(f"{dst}: {total / 1e6:.2f} MB")
for folder in sorted(dst.iterdir()):
    print(folder.name, round(sum(f.stat().st_size for f in folder.iterdir()) / 1e6, 2))
