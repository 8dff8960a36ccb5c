"""A crafted checkpoint never runs code: not in eval, sample, export, nor on resume.

A payload is planted where torch's own readers would unpickle it: DCP's ``.metadata``
(``pickle.load``), with and without a marker rewritten to match its checksum, and a non-tensor
item of the state (``torch.load(weights_only=False)`` in DCP's planner). Each reader must refuse
the checkpoint with a clear message, and the payload's file must never appear.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_cluster.cli import main
from moe_cluster.cluster.controller import Controller
from moe_cluster.config import JobConfig, TrainerConfig
from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.train import DataConfig, OptimConfig, TrainConfig, Trainer
from moe_cluster.train import checkpoint
from moe_cluster.train.safe_dcp import UnsafeCheckpoint, load_metadata

MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=32, moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=16))
TRAIN = TrainConfig(global_batch_size=2, seq_len=16, eval_batches=1, optim=OptimConfig(warmup_steps=1))
DATA = DataConfig(source="stdlib", max_bytes=200_000)


class Payload:
    """Unpickled, it creates the file ``path``: proof that code from the checkpoint ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    trainer = Trainer(MODEL, TRAIN, DATA, checkpoint_dir=str(tmp_path_factory.mktemp("good")))
    trainer.train_step()
    return trainer.save_checkpoint()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _rewrite_crc(ckpt: Path, name: str) -> None:
    """What an attacker who can write the folder can do too: make the marker agree with the file."""
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    marker["crc32"][name] = zlib.crc32((ckpt / name).read_bytes())
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))


def _plant_in_metadata(ckpt: Path, proof: Path, match_crc: bool) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(proof)))
    if match_crc:
        _rewrite_crc(ckpt, ".metadata")


def _plant_in_an_item(ckpt: Path, proof: Path) -> None:
    """A checkpoint of the older format (non-tensor items in DCP) whose step item is a payload."""
    trainer = Trainer(MODEL, TRAIN, DATA)
    state, _ = trainer._state()
    state["extra"] = {"step": Payload(proof), "sampler": {"epoch": 0, "position": 0}, "rng": torch.get_rng_state()}
    for f in ckpt.iterdir():
        if f.name != checkpoint.MARKER:
            f.unlink()
    dcp.save(state, checkpoint_id=str(ckpt))
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    marker.pop("sampler")
    marker["crc32"] = {f.name: zlib.crc32(f.read_bytes()) for f in ckpt.iterdir() if f.name != checkpoint.MARKER}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    assert not proof.exists()  # writing it ran nothing


PLANTS = {
    "metadata": lambda ckpt, proof: _plant_in_metadata(ckpt, proof, match_crc=False),
    "metadata, marker rewritten": lambda ckpt, proof: _plant_in_metadata(ckpt, proof, match_crc=True),
    "a non-tensor item": _plant_in_an_item,
}


def _crafted(plant: str, good_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    ckpt = _copy(good_checkpoint, tmp_path / "run" / "checkpoints" / good_checkpoint.name)
    proof = tmp_path / "PAYLOAD_RAN"
    PLANTS[plant](ckpt, proof)
    return ckpt, proof


@pytest.fixture(params=list(PLANTS))
def crafted(request, good_checkpoint, tmp_path) -> tuple[Path, Path]:
    return _crafted(request.param, good_checkpoint, tmp_path)


# The commands read the model's tensors only, never a non-tensor item: resume is what reads those.
@pytest.fixture(params=[p for p in PLANTS if p.startswith("metadata")])
def crafted_metadata(request, good_checkpoint, tmp_path) -> tuple[Path, Path]:
    return _crafted(request.param, good_checkpoint, tmp_path)


@pytest.mark.parametrize(
    "command",
    [["eval"], ["sample", "--prompt", "def ", "--max-new-tokens", "2"], ["export", "OUT"]],
    ids=["eval", "sample", "export"],
)
def test_commands_refuse_a_crafted_checkpoint_and_run_nothing(crafted_metadata, command, tmp_path, capsys):
    ckpt, proof = crafted_metadata
    argv = [command[0], str(ckpt), *[str(tmp_path / "out") if a == "OUT" else a for a in command[1:]]]
    code = main(argv)
    err = capsys.readouterr().err
    assert not proof.exists(), "the checkpoint's payload ran"
    assert code == 2, err
    assert f"moe-cluster {command[0]}: error:" in err and "unreadable" in err, err


def test_resume_sets_a_crafted_checkpoint_aside_and_runs_nothing(crafted, tmp_path):
    ckpt, proof = crafted
    run_dir = ckpt.parent.parent
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    trainer = TrainerConfig(**{f.name: getattr(TRAIN, f.name) for f in dataclasses.fields(TRAIN)})
    job = JobConfig(model=MODEL, trainer=trainer, data=DATA, resume=True, run_dir=str(run_dir))
    controller = Controller(job, run_dir, log=lambda *_: None)
    controller.check_checkpoints()  # what the driver reads before Ray starts
    point = controller._resume_point()  # the driver's choice of checkpoint
    if point is not None:  # the metadata was sound: the item is read by the ranks, which refuse it
        with pytest.raises(checkpoint.CheckpointCorrupt, match="UnpicklingError|Unsupported"):
            Trainer(MODEL, TRAIN, DATA, checkpoint_dir=str(ckpt.parent)).resume(point)
    else:
        assert controller.set_aside and not ckpt.exists()  # moved aside, never deleted
    assert not proof.exists(), "the checkpoint's payload ran"


def test_the_metadata_unpickler_admits_dcp_metadata_only(good_checkpoint, tmp_path):
    metadata = load_metadata((good_checkpoint / ".metadata").read_bytes())
    assert any(k.startswith("model.") for k in metadata.state_dict_metadata)
    proof = tmp_path / "PAYLOAD_RAN"
    for payload in (Payload(proof), {"inside": [1, Payload(proof)]}, eval):
        with pytest.raises(UnsafeCheckpoint, match="never holds"):
            load_metadata(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpoint, match="not DCP's Metadata"):
        load_metadata(pickle.dumps({"a": 1}))
    assert not proof.exists()


def test_the_unpickler_never_sets_state_on_a_class_or_a_path_outside(good_checkpoint, tmp_path):
    """Allowed names are not enough: BUILD on an allowed class would rewrite it for the whole process
    (every later Path would point where the file says), and a file name with a folder part would send
    readers outside the checkpoint."""
    import pathlib
    import pickletools

    # GLOBAL pathlib.PurePosixPath; (None, {"_str": "/tmp/HIJACK"}); BUILD: well formed, as pickletools reads it.
    hijack = b"\x80\x04cpathlib\nPurePosixPath\nN}X\x04\x00\x00\x00_strX\x0b\x00\x00\x00/tmp/HIJACKs\x86b."
    assert [op.name for op, _, _ in pickletools.genops(hijack)][-3:] == ["TUPLE2", "BUILD", "STOP"]
    before = pathlib.PurePosixPath.__dict__.get("_str")
    with pytest.raises(UnsafeCheckpoint, match="sets attributes of <class 'pathlib.PurePosixPath'>"):
        load_metadata(hijack)
    assert pathlib.PurePosixPath.__dict__.get("_str") == before and str(pathlib.Path("a")) == "a"
    metadata = load_metadata((good_checkpoint / ".metadata").read_bytes())
    next(iter(metadata.storage_data.values())).relative_path = "../../etc/passwd"
    with pytest.raises(UnsafeCheckpoint, match="outside the checkpoint folder"):
        load_metadata(pickle.dumps(metadata))


def test_a_checkpoint_holds_no_pickled_item(good_checkpoint):
    """Every item DCP wrote is a tensor; the step and sampler are JSON in the marker."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = load_metadata((good_checkpoint / ".metadata").read_bytes())
    pickled = [k for k, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]
    assert pickled == []
    info = checkpoint.read_info(good_checkpoint)
    assert info["step"] == 1 and info["sampler"] and ".metadata" in info["crc32"]
    # and it resumes: the step and the sampler's place come back from the marker
    trainer = Trainer(MODEL, TRAIN, DATA, checkpoint_dir=str(good_checkpoint.parent))
    assert trainer.resume(good_checkpoint) and trainer.step == 1
    assert trainer.sampler.state_dict() == info["sampler"]


def test_an_older_checkpoint_with_plain_items_still_resumes(good_checkpoint, tmp_path):
    """Checkpoints of the version before kept the step, sampler and model configuration as DCP items
    (plain ints, dicts, a string) and a marker without the sampler or .metadata's checksum: those
    items are read with torch.load(weights_only=True), and the shards' checksums still count."""
    ckpt = _copy(good_checkpoint, tmp_path / "old" / good_checkpoint.name)
    trainer = Trainer(MODEL, TRAIN, DATA, checkpoint_dir=str(ckpt.parent))
    state, _ = trainer._state()
    sampler = {"epoch": 0, "position": 7}
    model_config = json.dumps(dataclasses.asdict(MODEL))
    state["extra"] = {"step": 1, "sampler": sampler, "rng": torch.get_rng_state(), "model_config": model_config}
    for f in ckpt.iterdir():
        if f.name not in (checkpoint.MARKER, "tokenizer.json"):
            f.unlink()
    dcp.save(state, checkpoint_id=str(ckpt))
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    marker.pop("sampler")
    marker["crc32"] = {f.name: zlib.crc32(f.read_bytes()) for f in sorted(ckpt.glob("*.distcp"))}  # shards only
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    fresh = Trainer(MODEL, TRAIN, DATA, checkpoint_dir=str(ckpt.parent))
    assert fresh.resume(ckpt) and fresh.step == 1 and fresh.sampler.state_dict() == sampler
    _garbled(ckpt)  # and its checksums are checked as before
    with pytest.raises(checkpoint.CheckpointCorrupt, match="checksum"):
        fresh.resume(ckpt)


# -- point 6: every reader checks what it reads ------------------------------------------------


def _garbled(ckpt: Path) -> None:
    shard = sorted(ckpt.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: sizes still match, DCP would read it without complaint
    shard.write_bytes(bytes(data))


def _set_aside(ckpt: Path) -> Path:
    return checkpoint.set_aside(ckpt)


def _nan_weights(ckpt: Path) -> Path:
    """A checkpoint with a NaN weight, as versions before the finite check could commit one."""
    trainer = Trainer(MODEL, TRAIN, DATA)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    state, _ = trainer._state()
    for f in ckpt.iterdir():
        if f.name not in (checkpoint.MARKER, "tokenizer.json"):
            f.unlink()
    dcp.save(state, checkpoint_id=str(ckpt))
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    marker["crc32"] = {f.name: zlib.crc32(f.read_bytes()) for f in ckpt.iterdir() if f.suffix == ".distcp" or f.name == ".metadata"}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    return ckpt


BROKEN = {
    "garbled shard": (lambda c: (_garbled(c), c)[1], "does not match its checksum"),
    "set aside": (_set_aside, "was set aside as unreadable"),
    "NaN weights": (_nan_weights, "holds non-finite weights"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("command", ["eval", "sample", "export"])
def test_readers_refuse_a_broken_checkpoint(broken, command, good_checkpoint, tmp_path, capsys):
    make, reason = BROKEN[broken]
    ckpt = make(_copy(good_checkpoint, tmp_path / "run" / good_checkpoint.name))
    extra = {"eval": [], "sample": ["--prompt", "def ", "--max-new-tokens", "2"], "export": [str(tmp_path / "out")]}
    code = main([command, str(ckpt), *extra[command]])
    err = capsys.readouterr().err
    assert code == 2 and f"moe-cluster {command}: error:" in err and reason in err, err
    assert not (tmp_path / "out" / "config.json").exists()


def test_export_refuses_a_tokenizer_copy_changed_since_the_save(good_checkpoint, tmp_path, capsys):
    ckpt = _copy(good_checkpoint, tmp_path / "run" / good_checkpoint.name)
    assert checkpoint.read_info(ckpt)["tokenizer"]["file_sha256"]  # recorded at save
    (ckpt / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text() + " ")  # any change at all
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "tokenizer.json is not the one saved with it" in capsys.readouterr().err


def test_a_failed_read_of_a_whole_checkpoint_is_not_corruption(good_checkpoint, tmp_path, monkeypatch):
    """Once every checksum matched, an I/O error or a failed allocation while DCP reads is the
    machine's: raised as it is (the controller retries or stops), and the checkpoint is not set
    aside. The fault is injected where DCP reads the files (a real EIO needs a failing disk), so
    DCP wraps it as it would a real one."""
    import errno

    from moe_cluster.train.safe_dcp import SafeReader

    ckpt = _copy(good_checkpoint, tmp_path / "run" / good_checkpoint.name)
    trainer = Trainer(MODEL, TRAIN, DATA)
    for error in (OSError(errno.EIO, "Input/output error"), MemoryError("cannot allocate"), RuntimeError("read failed")):

        def failing_read(self, plan, planner, error=error):
            raise error

        monkeypatch.setattr(SafeReader, "read_data", failing_read)
        with pytest.raises(type(error)) as raised:
            trainer.resume(ckpt)
        assert not isinstance(raised.value, checkpoint.CheckpointCorrupt)
    monkeypatch.undo()
    _garbled(ckpt)
    with pytest.raises(checkpoint.CheckpointCorrupt, match="checksum"):  # a real corruption still is one
        trainer.resume(ckpt)


def test_a_refusal_during_an_overwrite_export_leaves_the_output_as_it_was(good_checkpoint, tmp_path, capsys):
    """The tokenizer and finiteness checks come while the export writes: it writes beside OUT and
    moves its files in at the end, so a refusal then removes nothing from OUT."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation_config.json").write_text("{}")
    for broken in (_nan_weights, lambda c: (c / "tokenizer.json").write_text("{}")):
        ckpt = _copy(good_checkpoint, tmp_path / f"run{len(list(tmp_path.iterdir()))}" / good_checkpoint.name)
        broken(ckpt)
        assert main(["export", str(ckpt), str(out), "--overwrite"]) == 2, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["generation_config.json"]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.export-")] == []
    assert main(["export", str(good_checkpoint), str(out), "--overwrite"]) == 0
    assert "generation_config.json" not in {p.name for p in out.iterdir()} and (out / "config.json").is_file()
