from pathlib import Path

import pytest
from PIL import Image

from conftest import write_jsonl
from umr.retrieval.items import Item
from umr.retrieval.corpus.readers import FolderCorpus, JsonlCorpus, MbeirPoolCorpus, Rejected, open_corpus


def test_jsonl_reader_reports_each_bad_record_and_keeps_the_good(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "good-text", "text": "hello", "metadata": {"lang": "en"}},
        {"id": "good-image", "image": "a.png"},
        {"id": "both", "image": "a.png", "text": "a red square"},
        "{not json",
        {"text": "no id"},
        {"id": "empty", "text": "   "},
        {"id": "weird", "text": "x", "modality": "audio"},
        {"id": "meta", "text": "x", "metadata": [1, 2]},
        {"id": "liar", "text": "x", "modality": "image"},
    ])
    out = list(open_corpus(path))
    good = [r for r in out if isinstance(r, Item)]
    bad = {r.id: r.reason for r in out if isinstance(r, Rejected)}
    assert [g.id for g in good] == ["good-text", "good-image", "both"]
    assert [g.modality for g in good] == ["text", "image", "image,text"]
    assert good[1].image == str(tmp_path / "a.png")  # resolved against the file's folder
    assert "invalid JSON" in bad["line 4"]
    assert bad["line 5"] == "missing id"
    assert "empty item" in bad["empty"]
    assert "unknown modality 'audio'" in bad["weird"]
    assert "metadata must be a JSON object" in bad["meta"]
    assert "modality says 'image'" in bad["liar"]
    assert len(JsonlCorpus(path)) == 9


def test_folder_reader_pairs_captions_recursively(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("caption of a\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "deeper" / "b.png")
    (tmp_path / "sub" / "note.txt").write_text("a text only item")
    (tmp_path / "sub" / "empty.txt").write_text("  ")
    out = list(FolderCorpus(tmp_path))
    items = {r.id: r for r in out if isinstance(r, Item)}
    assert items["a.jpg"].text == "caption of a" and items["a.jpg"].modality == "image,text"
    assert items["sub/deeper/b.png"].modality == "image"
    assert items["sub/note.txt"].modality == "text"
    assert "a.txt" not in items  # consumed as a caption
    assert [r.id for r in out if isinstance(r, Rejected)] == ["sub/empty.txt"]
    assert open_corpus(tmp_path).kind == "folder"


def test_mbeir_pool_reader_on_real_data(flickr):
    pool = flickr / "mbeir" / "cand_pool" / "flickr8k_test_cand_pool.jsonl"
    corpus = open_corpus(pool)
    assert isinstance(corpus, MbeirPoolCorpus)
    items = [r for r in corpus if isinstance(r, Item)]
    assert len(items) == 1200
    mods = {m: sum(1 for i in items if i.modality == m) for m in ("image", "text")}
    assert mods == {"image": 200, "text": 1000}
    first_image = next(i for i in items if i.modality == "image")
    assert Path(first_image.image).resolve().parent == (flickr / "images").resolve()


def test_unknown_corpus_format_is_a_clear_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_corpus(p)
    with pytest.raises(FileNotFoundError):
        open_corpus(tmp_path / "missing.jsonl")
