"""prepare: BPE and bytes, JSONL and Parquet, any worker count, and the errors it names."""

import hashlib
import json
import re

import numpy as np
import pytest

from moe_cluster.cli import main as cli_main
from moe_cluster.data import load_bin, load_tokenizer, prepare, read_meta
from moe_cluster.data.tokenizer import decode
from tests.data.helpers import documents, train_bpe, write_jsonl, write_parquet

DOCS = documents(300)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe-model"), DOCS)


def _bins(folder):
    return (folder / "train.bin").read_bytes(), (folder / "val.bin").read_bytes()


def _docs(ids, eos):
    """Split a token stream at its end-of-document ids."""
    ends = np.flatnonzero(ids == eos)
    return [ids[a + 1 if i else 0 : b] for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def test_bpe_from_jsonl_and_parquet_gives_identical_bins_for_any_worker_count(tmp_path, bpe):
    # Three JSONL files (three chunks, in sorted order) and one Parquet file of six row groups.
    for i, name in enumerate(["a.jsonl", "b.json", "c.jsonl"]):
        write_jsonl(tmp_path / "jsonl" / name, DOCS[100 * i : 100 * (i + 1)])
    write_parquet(tmp_path / "docs.parquet", DOCS, row_group_size=50)
    runs = {  # the tokenizer as a file, or as the folder holding it
        "jsonl-1": prepare(tmp_path / "jsonl", tmp_path / "jsonl-1", tokenizer=str(bpe), val_fraction=0.1),
        "jsonl-2": prepare(tmp_path / "jsonl", tmp_path / "jsonl-2", tokenizer=str(bpe.parent), val_fraction=0.1,
                           workers=2),
        "parquet-2": prepare(tmp_path / "docs.parquet", tmp_path / "parquet-2", tokenizer=str(bpe), val_fraction=0.1,
                             workers=2),
    }  # fmt: skip
    reference = _bins(tmp_path / "jsonl-1")
    for name in runs:
        assert _bins(tmp_path / name) == reference, name
    assert (tmp_path / "jsonl-1" / "meta.json").read_bytes() == (tmp_path / "jsonl-2" / "meta.json").read_bytes()
    meta = read_meta(tmp_path / "parquet-2")
    assert meta == runs["parquet-2"]
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert meta["tokenizer"] == {"name": "bpe-model0", "path": str(bpe), "sha256": sha, "file": "tokenizer.json"}
    assert (tmp_path / "parquet-2" / "tokenizer.json").read_bytes() == bpe.read_bytes()  # self-contained
    assert (meta["vocab_size"], meta["eos_id"], meta["eos_token"], meta["dtype"]) == (500, 0, "<|endoftext|>", "uint16")
    assert meta["documents"] == {"train": 270, "val": 30} and meta["val_every"] == 10
    assert meta["source"]["format"] == "parquet" and runs["jsonl-1"]["source"]["format"] == "jsonl"
    # Every 10th document, the first included, is validation; decoding gives the text back.
    spec = load_tokenizer(str(tmp_path / "parquet-2" / "tokenizer.json"))
    val = _docs(load_bin(tmp_path / "parquet-2" / "val.bin", 500), eos=0)
    train = _docs(load_bin(tmp_path / "parquet-2" / "train.bin", 500), eos=0)
    assert len(val) == 30 and len(train) == 270
    assert decode(spec, val[0]) == DOCS[0] and decode(spec, val[1]) == DOCS[10] and decode(spec, train[0]) == DOCS[1]
    ids = np.concatenate([val[0], train[0]])
    assert meta["max_token_id"] >= ids.max() and meta["tokens"]["train"] + meta["tokens"]["val"] > 300


def test_bytes_from_text_files_jsonl_and_parquet_agree(tmp_path):
    docs = DOCS[:40]
    for i, d in enumerate(docs):
        (tmp_path / "text" / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "text" / f"{i:03d}.txt").write_text(d)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    write_parquet(tmp_path / "docs.parquet", docs, row_group_size=7)
    for name in ("text", "docs.jsonl", "docs.parquet"):
        meta = prepare(tmp_path / name, tmp_path / f"out-{name}", val_every=4, workers=2)
        assert _bins(tmp_path / f"out-{name}") == _bins(tmp_path / "out-text"), name
        assert (meta["vocab_size"], meta["eos_id"], meta["tokenizer"]["name"]) == (257, 256, "bytes")
    val = _docs(load_bin(tmp_path / "out-text" / "val.bin", 257), eos=256)
    assert bytes(val[1].astype(np.uint8)).decode() == docs[4]
    assert not (tmp_path / "out-text" / "tokenizer.json").exists()


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    write_jsonl(tmp_path / "d.jsonl", ["w69999 w5", "w0 w1", "w7"])
    meta = prepare(tmp_path / "d.jsonl", tmp_path / "out", tokenizer=str(tmp_path / "words.json"), val_every=2)
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"], meta["max_token_id"]) == ("uint32", 70_002, 1, 70_001)
    assert load_bin(tmp_path / "out" / "val.bin", 70_002).tolist() == [70_001, 7, 1, 9, 1]


def test_the_end_of_document_token_comes_from_the_tokenizer_config_or_the_flag(tmp_path, bpe):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes(bpe.read_bytes())
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "Document"}}))
    assert load_tokenizer(str(model)).eos_token == "Document"
    assert load_tokenizer(str(model), eos_token="<|endoftext|>").eos_id == 0
    with pytest.raises(ValueError, match="'<none>' is not in its vocabulary; pass --eos-token"):
        load_tokenizer(str(model), eos_token="<none>")
    # A vocabulary without any known end-of-document token must be told which one to use.
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "x": 1}, unk_token="[UNK]")).save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match=r"plain.json has no end-of-document token: .* pass --eos-token TOKEN"):
        load_tokenizer(str(tmp_path / "plain.json"))
    assert load_tokenizer(str(tmp_path / "plain.json"), eos_token="x").eos_id == 1


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown-extension", r"notes.csv: unknown extension '.csv'; prepare reads .jsonl, .json"),
        ("single-text-file", r"corpus.txt: unknown extension '.txt'"),
        ("missing-field", r"d.jsonl, line 3: no 'text' field \(its keys: id, body\); pass --text-field KEY"),
        ("bad-json", r"d.jsonl, line 2: not a JSON object"),
        ("not-an-object", r"d.jsonl, line 1: holds a JSON list"),
        ("empty", r"holds 0 document\(s\) in 1 file\(s\)"),
        ("one-document", r"holds 1 document\(s\) .* need one document each"),
        ("bad-tokenizer", r"broken.json does not parse as a Hugging Face tokenizer.json"),
        ("no-tokenizer", r"--tokenizer .*nothing: no such file or folder; pass a Hugging Face tokenizer.json"),
        ("no-tokenizer-in-folder", r"--tokenizer .*: .*/model/tokenizer.json does not exist"),
        ("parquet-column", r"d.parquet has no column 'text' \(its columns: id, body\); pass --text-field"),
        ("parquet-null", r"d.parquet, row 2 \(from 0\): 'text' is null"),
        ("not-parquet", r"d.parquet is not a readable Parquet file"),
        ("val-fraction", r"--val-fraction must be in \(0, 0.5\], got 0.7"),
        ("missing", r"no files under .*nowhere \(it does not exist\)"),
    ],
)
def test_bad_input_is_named(tmp_path, case, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, kw = tmp_path / "d.jsonl", {}
    lines = ['{"id": 0, "text": "one"}', '{"id": 1, "text": "two"}', '{"id": 2, "body": "three"}']
    if case == "unknown-extension":
        src = tmp_path / "corpus"
        write_jsonl(src / "a.jsonl", ["x", "y"])
        (src / "notes.csv").write_text("a,b\n")
        (src / ".hidden.csv").write_text("hidden files are skipped, not refused")
    elif case == "single-text-file":
        src = tmp_path / "corpus.txt"
        src.write_text("one big text")
    elif case == "missing-field":
        src.write_text("\n".join(lines) + "\n")
    elif case == "bad-json":
        src.write_text(lines[0] + "\n{not json\n")
    elif case == "not-an-object":
        src.write_text('["text"]\n')
    elif case == "empty":
        src.write_text("\n\n")
    elif case == "one-document":
        src.write_text(lines[0] + "\n")
    elif case == "bad-tokenizer":
        src.write_text("\n".join(lines[:2]))
        (tmp_path / "broken.json").write_text('{"model": {"type": "BPE"')
        kw["tokenizer"] = str(tmp_path / "broken.json")
    elif case == "no-tokenizer":
        kw["tokenizer"] = str(tmp_path / "nothing")
    elif case == "no-tokenizer-in-folder":
        (tmp_path / "model").mkdir()
        kw["tokenizer"] = str(tmp_path / "model")
    elif case.startswith("parquet") or case == "not-parquet":
        src = tmp_path / "d.parquet"
        if case == "not-parquet":
            src.write_text("plain text")
        else:
            column = "body" if case == "parquet-column" else "text"
            pq.write_table(pa.table({"id": [0, 1, 2], column: ["a", "b", None]}), src, row_group_size=2)
    elif case == "val-fraction":
        kw["val_fraction"] = 0.7
    elif case == "missing":
        src = tmp_path / "nowhere"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        prepare(src, out, **kw)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing left behind


def test_cli_prepare_with_a_tokenizer_folder(tmp_path, bpe, capsys):
    write_jsonl(tmp_path / "d.jsonl", [d.replace("Document", "Doc") for d in DOCS[:60]], field="content")
    argv = ["prepare", str(tmp_path / "d.jsonl"), str(tmp_path / "out"), "--tokenizer", str(bpe.parent),
            "--text-field", "content", "--val-fraction", "0.25", "--workers", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"wrote .*train.bin \([\d,]+ tokens, 45 documents\), val.bin \([\d,]+, 15\); bpe-model0", out)
    assert "tokens/s" in out and read_meta(tmp_path / "out")["source"]["text_field"] == "content"
    assert cli_main(["prepare", str(tmp_path / "d.jsonl"), str(tmp_path / "o2")]) == 2
    assert "d.jsonl, line 1: no 'text' field (its keys: id, content); pass --text-field KEY" in capsys.readouterr().err


def _contents(folder):
    """Every path under ``folder`` and its bytes ("dir" for a folder, the target for a symlink)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = f"-> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def test_prepare_into_a_non_empty_folder_needs_overwrite_which_replaces_it(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS[:20])
    out = tmp_path / "out"  # an earlier BPE run's folder, with a subfolder and links out of it
    (out / "sub").mkdir(parents=True)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json", "sub/notes.txt"):
        (out / name).write_text("stale")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("kept")
    (out / "link-to-folder").symlink_to(tmp_path / "outside")
    (out / "link-to-file").symlink_to(tmp_path / "outside" / "keep.txt")
    before = _contents(out)
    argv = ["prepare", str(src), str(out), "--val-every", "4", "--workers", "1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moe-cluster prepare: error: output folder {out} is not empty (link-to-file, link-to-folder")
    assert "pass --overwrite to replace its contents, or choose an empty folder" in err
    assert _contents(out) == before
    # A run refused on its input after reading all of it (one document) removes nothing either.
    write_jsonl(tmp_path / "one.jsonl", DOCS[:1])
    assert cli_main(["prepare", str(tmp_path / "one.jsonl"), str(out), "--overwrite", "--workers", "1"]) == 2
    assert "need one document each" in capsys.readouterr().err and _contents(out) == before

    assert cli_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # bytes: no tokenizer.json
    assert read_meta(out)["documents"] == {"train": 15, "val": 5}
    assert _contents(tmp_path / "outside") == {"keep.txt": b"kept"}  # the links went, not their targets
    (tmp_path / "empty").mkdir()  # an existing empty folder needs no flag
    prepare(src, tmp_path / "empty", val_every=4)
    assert _bins(tmp_path / "empty") == _bins(out)


def test_prepare_never_writes_into_or_around_its_source(tmp_path, capsys):
    src = tmp_path / "corpus" / "texts"
    src.mkdir(parents=True)
    for i in range(4):
        (src / f"{i}.txt").write_text(DOCS[i])
    before = _contents(tmp_path)
    for out, message in [
        (src, f"output folder {src} is the source itself; choose another output folder"),
        (src / "out", f"output folder {src / 'out'} is inside the source {src}; choose a folder outside it"),
        (tmp_path / "corpus", f"output folder {tmp_path / 'corpus'} holds the source {src} (--overwrite would "
                              "delete it); choose a folder that does not contain it"),
    ]:  # fmt: skip
        for extra in ([], ["--overwrite"]):
            assert cli_main(["prepare", str(src), str(out), "--workers", "1", *extra]) == 2, (out, extra)
            assert f"moe-cluster prepare: error: {message}" in capsys.readouterr().err
    # A single file's folder holds it too.
    with pytest.raises(ValueError, match="holds the source .*0.txt"):
        prepare(src / "0.txt", src, overwrite=True)
    assert _contents(tmp_path) == before  # nothing written, not even a temporary folder
