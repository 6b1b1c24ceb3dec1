"""Text the benchmarks train on: the sample corpus shipped with igea, plus the shared real translations."""

from __future__ import annotations

import json
from pathlib import Path

from igea.config import sample_corpus_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ncbi-disease-it"


def base_texts() -> list[str]:
    """The shipped sample corpus, plus the shared real translations when they are beside the project."""
    texts = Path(sample_corpus_path()).read_text(encoding="utf-8").splitlines()
    for split in ("train", "dev", "test"):
        path = SHARED / f"{split}.jsonl"
        if path.is_file():
            texts += [json.loads(line)["text"].replace("\n", " ") for line in path.read_text("utf-8").splitlines()]
    return [t for t in texts if t.strip()]
