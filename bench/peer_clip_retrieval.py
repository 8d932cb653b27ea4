"""clip-retrieval's side of bench/peer.py; runs under clip-retrieval's own Python, never umr's.

  prepare VECTORS.npy PATHS.json FOLDER   write the index folder `clip-retrieval back` reads:
                                          image.index (exact inner product over the same vectors
                                          umr serves) and metadata/0.parquet (image_path per row)
  serve FOLDER CHECKPOINT PORT            `clip-retrieval back` on that folder with the open_clip
                                          ViT-B-32 checkpoint, bound to 127.0.0.1 (it binds
                                          0.0.0.0 itself; Flask.run is wrapped to change that)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def prepare(vectors: str, paths: str, folder: str) -> None:
    import faiss
    import numpy as np
    import pandas as pd

    x = np.ascontiguousarray(np.load(vectors), dtype=np.float32)
    out = Path(folder)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    faiss.write_index(index, str(out / "image.index"))
    pd.DataFrame({"image_path": json.loads(Path(paths).read_text())}).to_parquet(out / "metadata" / "0.parquet")
    (out.parent / "indices.json").write_text(json.dumps({"flickr": str(out)}))


def serve(folder: str, checkpoint: str, port: str) -> None:
    import flask

    original = flask.Flask.run

    def loopback_only(self, host=None, port=None, **kwargs):
        return original(self, host="127.0.0.1", port=port, **kwargs)

    flask.Flask.run = loopback_only
    from clip_retrieval.clip_back import clip_back

    clip_back(indices_paths=str(Path(folder).parent / "indices.json"), port=int(port),
              clip_model=f"open_clip:ViT-B-32/{checkpoint}", use_jit=False, enable_mclip_option=False,
              provide_aesthetic_embeddings=False, columns_to_return=["image_path"])


if __name__ == "__main__":
    {"prepare": prepare, "serve": serve}[sys.argv[1]](*sys.argv[2:])
