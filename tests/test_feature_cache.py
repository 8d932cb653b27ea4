"""The on-disk tower feature cache: real towers, real files, a second process."""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from umr.retrieval.encoders import towers
from umr.retrieval.images import open_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UMR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


def shards(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/*.safetensors"))


@pytest.fixture(scope="module")
def photos(flickr):
    return sorted(str(p) for p in (flickr / "images").glob("*.jpg"))[:12]


def test_cached_features_equal_the_towers_and_a_second_process_computes_nothing(cache_dir, photos):
    it, tt = towers.image_tower(), towers.text_tower()
    first = it.cached_features(photos)
    direct = it.features(torch.stack([it.preprocess(open_image(p, min_side=224)) for p in photos]))
    assert torch.allclose(first, direct, atol=1e-5)
    texts = ["a dog runs on the grass", "two children play in the snow", "a dog runs on the grass"]
    t_first = tt.cached_features(texts)
    assert torch.allclose(t_first, tt.features(texts), atol=1e-6)
    written = shards(cache_dir)
    assert len(written) == 2  # one image shard, one text shard (the repeated text stored once)

    # Another process reads the same rows and writes no shard: it ran neither tower.
    code = (
        "import sys, json, numpy as np; from retrieval.encoders import towers;"
        "p = json.loads(sys.argv[1]);"
        "np.save(sys.argv[2], towers.image_tower().cached_features(p).numpy());"
        "np.save(sys.argv[3], towers.text_tower().cached_features(json.loads(sys.argv[4])).numpy())"
    )
    import json

    out_i, out_t = cache_dir.parent / "i.npy", cache_dir.parent / "t.npy"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(photos), str(out_i), str(out_t), json.dumps(texts)],
                       cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert shards(cache_dir) == written
    assert np.array_equal(np.load(out_i), first.numpy()) and np.array_equal(np.load(out_t), t_first.numpy())


def test_keys_are_content_a_copy_hits_an_edit_misses(cache_dir, photos, tmp_path):
    it = towers.image_tower()
    base = it.cached_features(photos[:2])
    n = len(shards(cache_dir))
    copy = tmp_path / "renamed.jpg"
    shutil.copy(photos[0], copy)
    again = it.cached_features([str(copy)])
    assert len(shards(cache_dir)) == n and torch.equal(again[0], base[0])
    from PIL import Image

    Image.open(photos[0]).transpose(Image.FLIP_LEFT_RIGHT).save(copy)  # same name, new content
    edited = it.cached_features([str(copy)])
    assert len(shards(cache_dir)) == n + 1
    assert not torch.allclose(edited[0], base[0], atol=1e-3)


def test_a_damaged_shard_is_skipped_and_recomputed(cache_dir, photos):
    it = towers.image_tower()
    good = it.cached_features(photos[:3])
    (shard,) = shards(cache_dir)
    shard.write_bytes(shard.read_bytes()[:100])  # truncated on disk
    from umr.retrieval.encoders.feature_cache import FeatureCache

    towers._image_tower.cache_clear()  # a new process: nothing indexed in memory
    FeatureCache._open.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = towers.image_tower().cached_features(photos[:3])
    finally:
        towers._image_tower.cache_clear()
    assert any("skipping unreadable shard" in str(w.message) for w in caught)
    assert torch.allclose(again, good, atol=1e-5)


def test_turned_off_writes_nothing_and_a_missing_image_names_itself(cache_dir, photos, monkeypatch):
    monkeypatch.setenv("UMR_FEATURE_CACHE", "off")
    towers.text_tower().cached_features(["nothing is stored"])
    assert not cache_dir.exists()
    monkeypatch.delenv("UMR_FEATURE_CACHE")
    with pytest.raises(ValueError, match="no-such.jpg"):
        towers.image_tower().cached_features([photos[0], "/nonexistent/no-such.jpg"])


def test_lit_encode_reads_the_cache_and_matches_the_prepared_path(cache_dir, lit, photos):
    from umr.retrieval.items import Item

    items = [Item(None, None, photos[0]), Item(None, "a dog in the snow"), Item(None, "a red shirt", photos[1])]
    cached = lit.encode(items)
    prepared = lit.embed([lit.prepare(i) for i in items])
    assert np.allclose(cached, prepared, atol=1e-5)
    assert len(shards(cache_dir)) == 2
    lit.encode(items)
    assert len(shards(cache_dir)) == 2


def test_reranker_feature_maps_are_cached_as_float16(cache_dir, photos):
    from umr.retrieval.rerank.reranker import TokenCache
    from umr.retrieval.items import Item

    it = towers.image_tower()
    direct = it.feature_map(torch.stack([it.preprocess(open_image(p, min_side=224)) for p in photos[:3]]))
    cached = it.cached_feature_maps(photos[:3])
    assert cached.shape == (3, towers.IMAGE_TOKENS, towers.IMAGE_DIM)
    assert torch.allclose(cached, direct, atol=2e-2, rtol=1e-2)  # float16 on disk
    (shard,) = [s for s in shards(cache_dir) if "-fmap-" in s.parent.name]
    assert shard.stat().st_size < 3 * towers.IMAGE_TOKENS * towers.IMAGE_DIM * 2 + 4096
    # A re-ranker in a fresh cache object (another process) reads them instead of running the tower.
    tokens = TokenCache().tokens([Item(None, None, photos[0]), Item(None, "a dog", photos[2])])
    assert torch.equal(tokens.image[0].float(), cached[0]) and torch.equal(tokens.image[1].float(), cached[2])
    assert len(shards(cache_dir)) == 1
