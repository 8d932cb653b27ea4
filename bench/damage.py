"""Each kind of damage to an index, and what verify, serving and repair make of it.

The index: 200 flickr8k-1k test photos and their 1,000 captions as documents of their own
(1,200, lit-base), as the issue's attacker had it. Each kind of damage is done to a fresh copy;
then, on that copy:
  verify   `umr index verify --full --reencode 1201` (every document embedded again): its exit
           status and first finding;
  serve    what `umr serve` and `umr search` do when they open it (Engine.open, read-only and
           for writing): refused with a message, or how many of 20 caption queries keep the top 5
           they had on the intact index;
  repair   `umr index verify --repair --full --reencode 1201`, then serving again.
Random damage (64 bytes written over, 8 single bytes flipped) is done TRIALS times at random
offsets of docs.sqlite; the others are deterministic.
Run: python bench/damage.py [--trials 5]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, ROOT, machine, write_section  # noqa: E402

FLICKR = DATA / "flickr8k-1k"
QUERIES = 20


def build(tmp: Path) -> tuple[Path, list[str]]:
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.indexing.pipeline import build_index

    split = json.loads((FLICKR / "split.json").read_text())["test"][:200]
    caps: dict[str, list[str]] = {}
    with open(FLICKR / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"])
    records = [{"id": f"photo-{i}", "image": str(FLICKR / "images" / img)} for i, img in enumerate(split)]
    records += [{"id": f"caption-{i}-{j}", "text": c} for i, img in enumerate(split) for j, c in enumerate(caps[img][:5])]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    build_index(corpus, load_encoder("lit-base"), tmp / "intact", progress=False)
    return tmp / "intact", [caps[img][0] for img in split[:QUERIES]]


def answers(idx: Path, queries: list[str], mode: str):
    """The top 5 ids per query, or the one-line refusal."""
    from umr.index.errors import UmrError
    from umr.retrieval.engine import Engine, Query

    try:
        eng = Engine.open(idx, mode=mode)
    except UmrError as e:
        return f"refused: {str(e).split(';')[0][:110]}"
    try:
        return [[h.id for h in hs] for hs in eng.search([Query(q) for q in queries], k=5, modalities=["text"])]
    except UmrError as e:
        return f"answers 500: {str(e)[:90]}"
    finally:
        eng.close()


def served(idx: Path, queries, intact) -> str:
    out = []
    for mode, who in (("read", "`umr search`, `serve --read-only`"), ("write", "`umr serve`")):
        got = answers(idx, queries, mode)
        out.append(f"{who}: {got if isinstance(got, str) else f'{sum(a == b for a, b in zip(got, intact))} of {QUERIES} as before'}")
    return "; ".join(out)


def verified(idx: Path, repair: bool = False) -> str:
    from umr.index.verify import verify
    from umr.retrieval.indexing.reencode_check import reencode_check

    report = verify(idx, repair=repair, full=True)
    if report.fatal:
        return f"exit 2: {report.fatal.split(';')[0][:110]}"
    if not report.unrepairable:  # as the CLI: re-encoding a store that cannot be read is pointless
        reencode_check(idx, 10**6, repair=repair).add_to(report)
    code = 0 if report.ok else 1
    if repair:
        said = [f"repaired: {r[:90]}" for r in report.repaired[:1]] + [f"says it cannot: {u[:90]}" for u in report.unrepairable[:1]]
        return f"exit {code}, " + ("; ".join(said) or "nothing to repair")
    return "exit 0, ok" if report.ok else f"exit 1: {len(report.problems)} problem(s), first: {report.problems[0][:90]}"


# -- kinds of damage ---------------------------------------------------------------------------
def random_bytes(idx: Path, seed: int, span: int) -> None:
    path, rng = idx / "docs.sqlite", random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if span > 1:
            f.seek(rng.randrange(4096, size - span))
            f.write(os.urandom(span))
        else:
            for _ in range(8):
                f.seek(rng.randrange(100, size))
                f.write(bytes([rng.randrange(256)]))


def index_page(idx: Path) -> None:
    db = sqlite3.connect(idx / "docs.sqlite")
    page = db.execute("SELECT pageno FROM dbstat WHERE name='rows_state' AND pagetype='leaf' LIMIT 1").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(idx / "docs.sqlite", "r+b") as f:
        f.seek((page - 1) * size + size // 2)
        f.write(bytes(range(64)))


def lost_wal(idx: Path) -> None:
    code = ("import sys, time, numpy as np\nfrom index import IndexStore\nfrom index.docstore import DocRecord\n"
            "s = IndexStore.open(sys.argv[1])\nv = np.zeros((1, s.active.dim), np.float32); v[0, 0] = 1\n"
            "for i in range(40):\n    s.add([DocRecord(f'late-{i}', 'text', text='late')], v)\n"
            "print('ok', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(idx)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.remove(idx / "docs.sqlite-wal")


def older_store(idx: Path, older: Path) -> None:
    shutil.copy(older / "docs.sqlite", idx / "docs.sqlite")


def faiss_file(idx: Path) -> Path:
    return idx / json.loads((idx / "manifest.json").read_text())["segments"][0]["faiss_file"]


def faiss_random(idx: Path) -> None:
    with open(faiss_file(idx), "r+b") as f:
        f.seek(faiss_file(idx).stat().st_size // 2)
        f.write(os.urandom(4096))


def faiss_tampered(idx: Path) -> None:
    """Other vectors in the FAISS file, and its manifest record made to match."""
    import numpy as np

    from umr.index import integrity
    from umr.index import vector_index as vi

    manifest = json.loads((idx / "manifest.json").read_text())
    seg = manifest["segments"][0]
    index = vi.read_index(str(faiss_file(idx)))
    rng = np.random.default_rng(0)
    v = rng.normal(size=(index.ntotal, index.d)).astype(np.float32)
    other = vi.new_index(vi.IndexChoice.from_dict(seg["index"]), index.d)
    other.add(v / np.linalg.norm(v, axis=1, keepdims=True))
    vi.write_index(other, str(faiss_file(idx)))
    seg["checkpoint"] = integrity.checkpoint_record(faiss_file(idx), index.ntotal, seg["checkpoint"]["epoch"])
    (idx / "manifest.json").write_text(json.dumps(manifest))


def stored_vector(idx: Path) -> None:
    """One caption's stored vector swapped with another's, FAISS made to agree (a race between two
    encodings leaves this)."""
    from umr.index.verify import verify

    db = sqlite3.connect(idx / "docs.sqlite")
    with db:
        a = db.execute("SELECT r.vec FROM rows r JOIN docs d USING(segment, row) WHERE d.id='caption-0-0'").fetchone()[0]
        db.execute("UPDATE rows SET vec=? WHERE (segment, row) = (SELECT segment, row FROM docs WHERE id='caption-7-0')", (a,))
    db.close()
    verify(idx, repair=True)


def metadata(idx: Path) -> None:
    db = sqlite3.connect(idx / "docs.sqlite")
    with db:
        db.execute("UPDATE docs SET metadata='{not json' WHERE id='caption-3-0'")
    db.close()


def manifest(idx: Path) -> None:
    (idx / "manifest.json").write_text('{"format_version": 1, "segm')


def foreign(idx: Path, other: Path) -> None:
    shutil.copy(other / "docs.sqlite", idx / "docs.sqlite")


def missing(idx: Path) -> None:
    os.remove(idx / "docs.sqlite")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="umr-bench-damage-"))
    intact_dir, queries = build(tmp)
    older = tmp / "older"
    shutil.copytree(intact_dir, older)
    other = tmp / "other"
    shutil.copytree(intact_dir, other)
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine
    from umr.retrieval.items import Item

    engine = Engine.open(intact_dir, load_encoder("lit-base"))  # the intact index moves on: the copy above is now older
    engine.add([Item("newer", "a caption added after the backup")])
    engine.checkpoint()
    engine.close()
    (other / "manifest.json").unlink()
    from umr.index import integrity

    db = sqlite3.connect(other / "docs.sqlite")
    with db:
        db.execute("UPDATE meta SET value=? WHERE key=?", (integrity.new_id(), integrity.DOCSTORE_ID))
    db.close()
    kinds = [("64 bytes written over at a random offset of docs.sqlite", lambda d, s: random_bytes(d, s, 64), a.trials),
             ("8 random bytes of docs.sqlite flipped", lambda d, s: random_bytes(d, s, 1), a.trials),
             ("a page of a docs.sqlite index overwritten", lambda d, s: index_page(d), 1),
             ("docs.sqlite-wal deleted after a crash (40 acknowledged adds only in it)", lambda d, s: lost_wal(d), 1),
             ("docs.sqlite replaced by an older copy", lambda d, s: older_store(d, older), 1),
             ("docs.sqlite of another index", lambda d, s: foreign(d, other), 1),
             ("docs.sqlite missing", lambda d, s: missing(d), 1),
             ("a stored row's metadata undecodable", lambda d, s: metadata(d), 1),
             ("a stored vector not its document's encoding", lambda d, s: stored_vector(d), 1),
             ("FAISS file: 4 KiB of random bytes", lambda d, s: faiss_random(d), 1),
             ("FAISS file: other vectors, manifest record matching", lambda d, s: faiss_tampered(d), 1),
             ("manifest.json cut short", lambda d, s: manifest(d), 1)]
    intact = answers(intact_dir, queries, "read")
    rows = ["| damage | `umr index verify --full --reencode 1201` | serving (`umr serve`, `umr search`) | "
            "`umr index verify --repair --full --reencode 1201` | serving after the repair |", "|---|---|---|---|---|"]
    for label, damage, trials in kinds:
        seen = []
        for seed in range(trials):
            copy = tmp / f"copy-{len(rows)}-{seed}"
            shutil.copytree(intact_dir, copy)
            damage(copy, seed)
            before = verified(copy), served(copy, queries, intact)
            found = (*before, verified(copy, repair=True), served(copy, queries, intact))
            seen.append(tuple(f.replace(str(copy), "IDX").replace("\n", " ") for f in found))
            shutil.rmtree(copy)
        if trials == 1:
            rows.append(f"| {label} | " + " | ".join(seen[0]) + " |")
        else:
            rows.append(f"| {label} ({trials} trials) | " + " | ".join(
                "<br>".join(f"{n}x {text}" for text, n in Counter(s[col] for s in seen).most_common())
                for col in range(4)) + " |")
    body = "\n".join([
        "## Damage: what verify, serving and repair make of each kind (`python bench/damage.py`)", "",
        f"Machine: {machine()}. Index: 200 flickr8k-1k test photos and their 1,000 captions (1,200 documents, "
        f"lit-base). Serving: {QUERIES} caption queries (captions only), \"as before\" when a query keeps the top 5 "
        "it had on the intact index. Each kind of damage on a fresh copy.", "", *rows])
    write_section("damage", body)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
