"""Items: what is indexed and what is searched with. One shape for documents and queries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umr.index.errors import InvalidArgument

MODALITIES = ("image", "text", "image,text")


@dataclass
class Item:
    """A text, an image, or both. `image` is a path, raw bytes or a decoded PIL image."""

    id: str | None = None
    text: str | None = None
    image: Any = None
    metadata: dict = field(default_factory=dict)

    @property
    def modality(self) -> str:
        has_text = bool(self.text and self.text.strip())
        has_image = self.image is not None
        if has_image and has_text:
            return "image,text"
        if has_image:
            return "image"
        if has_text:
            return "text"
        raise InvalidArgument(f"item {self.id!r} has neither text nor image")

    def image_ref(self) -> str | None:
        """How the document store remembers the image: its absolute path when it has one."""
        if isinstance(self.image, (str, Path)):
            return str(Path(self.image).resolve())
        return None


def parse_modalities(text: str | list[str] | None) -> list[str] | None:
    """'image|text' or 'image,text' (the fused modality) or a list -> validated list."""
    if text is None or text == "" or text == "any":
        return None
    parts = text if isinstance(text, list) else text.split("|")
    out = []
    for p in parts:
        p = p.strip().replace("+", ",").replace(" ", "")
        if p not in MODALITIES:
            raise InvalidArgument(f"unknown modality {p!r}: use image, text or image,text (several joined by |)")
        out.append(p)
    return out


def stored_item(root: Path, doc) -> Item:
    """A stored document (umr.index.documents.DocRecord) as an Item to encode or re-rank again;
    uploaded images are kept inside the index, under paths relative to its folder."""
    image = doc.image
    if image and not Path(image).is_absolute():
        image = str(Path(root) / image)
    return Item(doc.id, doc.text, image)
