"""Data-parallel training: `torchrun --nproc_per_node 2` on CPU (gloo) must train exactly what
one process trains with the same global batch, which holds only if in-batch negatives span
both ranks (the embeddings are gathered) and the gradients are combined right. Training with
each rank's half batch alone ends elsewhere, which shows the comparison can fail."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FLICKR, ROOT, require_data, run_cli, write_jsonl


def _recipe(path, base, batch_size):
    path.write_text(f"""
encoder: hf-mllm:{base}
out: {path.stem}
stages:
  - name: pairs
    data: {{pairs: pairs.jsonl}}
    trainable: lora
    lora_r: 4
    epochs: 2
    batch_size: {batch_size}
    lr: 0.003
    schedule: constant
""")
    return path


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_process_trains_on_the_global_batch(tmp_path):
    import csv

    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.encoders.tiny_qwen2vl import build
    from umr.retrieval.items import Item

    root = require_data(FLICKR)
    base = build(tmp_path / "base")
    train = set(json.loads((root / "split.json").read_text())["train"][:16])
    with open(root / "captions.txt", newline="") as f:
        rows = [{"image": str(root / "images" / r["image"]), "text": r["caption"]} for r in csv.DictReader(f)
                if r["image"] in train]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    single = _recipe(tmp_path / "single.yaml", base, 8)
    ranks = _recipe(tmp_path / "ranks.yaml", base, 8)
    half = _recipe(tmp_path / "half.yaml", base, 4)

    assert run_cli("train", single).returncode == 0
    assert run_cli("train", half).returncode == 0
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "umr.cli", "train", str(ranks)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("wrote encoder") == 0 and r.stdout.count("wrote encoder") == 1  # rank 0 reports once
    provenance = json.loads((tmp_path / "ranks" / "01-pairs" / "umr_encoder.json").read_text())["provenance"]
    assert provenance["data"]["world_size"] == 2

    items = [Item(text=row["text"]) for row in rows[:10]] + [Item(image=row["image"]) for row in rows[::5]]
    emb = {name: load_encoder(str(tmp_path / name / "01-pairs"), cache=False).encode(items)
           for name in ("single", "ranks", "half")}
    moved = np.abs(emb["single"] - load_encoder(f"hf-mllm:{base}", cache=False).encode(items)).max()
    assert moved > 0.05
    assert np.abs(emb["ranks"] - emb["single"]).max() < 1e-4
    assert np.abs(emb["half"] - emb["single"]).max() > 0.01
