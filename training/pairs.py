"""Image-caption pair data: Flickr-style CSV (`image,caption`) or JSONL ({"image", "text"})."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from umr.index.errors import InvalidArgument


@dataclass(frozen=True)
class Pair:
    image: str
    text: str


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}


def read_class_folder(path: str | Path, template: str = "a photo of a {label}") -> list[Pair]:
    """A folder of class folders (`dress/x.jpg`): each image paired with its class name."""
    path = Path(path)
    pairs = [Pair(str(p), template.format(label=p.parent.name.replace("_", " ").replace("-", " ")))
             for p in sorted(path.glob("*/*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not pairs:
        raise InvalidArgument(f"{path} holds no class folders with images (expected {path}/CLASS/IMAGE.jpg)")
    return pairs


def read_pairs(path: str | Path, images_dir: str | Path | None = None, split: str | None = None,
               template: str = "a photo of a {label}") -> list[Pair]:
    """`split` is 'SPLIT.json:NAME': keep pairs whose image file name is listed under NAME."""
    path = Path(path)
    if path.is_dir():
        return read_class_folder(path, template)
    images_dir = Path(images_dir) if images_dir else path.parent / "images"
    pairs: list[Pair] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rec = json.loads(line)
                    if not rec.get("image") or not rec.get("text"):
                        raise InvalidArgument(f"{path}:{lineno}: a pair needs both image and text")
                    pairs.append(Pair(str(images_dir / rec["image"]), rec["text"]))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            if [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
                raise InvalidArgument(f"{path}: expected a CSV with header 'image,caption'")
            for row in reader:
                if len(row) >= 2 and row[1].strip():
                    pairs.append(Pair(str(images_dir / row[0]), ",".join(row[1:]).strip()))
    if split:
        split_file, _, name = split.rpartition(":")
        if not split_file:
            raise InvalidArgument("--split takes SPLIT.json:NAME, e.g. split.json:train")
        names = json.loads(Path(split_file).read_text())
        if name not in names:
            raise InvalidArgument(f"{split_file} has no split {name!r} (it has {', '.join(names)})")
        keep = set(names[name])
        pairs = [p for p in pairs if Path(p.image).name in keep]
    if not pairs:
        raise InvalidArgument(f"no pairs read from {path}" + (f" for split {split}" if split else ""))
    return pairs
