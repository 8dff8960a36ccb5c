"""Small documents, and a BPE tokenizer trained on them inside the test: nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the a quick brown fox jumps over lazy dog cat sat on mat and ran to house tree river bird sings "
    "morning evening light dark water stone green blue red small large old new window garden road city "
    "mountain valley wind rain snow summer winter spring autumn friend letter story book page word line "
    "number seven eleven twenty hundred thousand because although while before after under between"
).split()


def documents(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` short documents of sentences drawn from WORDS (some with non-ASCII text)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(1, 6))
        ]
        docs.append(f"Document {i}. " + " ".join(sentences) + (" Ünïcödé ✓ — ok" if i % 10 == 0 else ""))
    return docs


def train_bpe(folder: Path, docs: list[str], vocab_size: int = 500) -> Path:
    """A byte-level BPE trained on ``docs``, saved as ``folder/tokenizer.json`` (EOS: <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # byte-level both ways: decoding gives the text back exactly
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(docs, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=row_group_size)
    return path
