"""May a command write this output folder? (``prepare``, ``export``), and emptying it for ``--overwrite``.

An output folder must not overlap what the command reads: writing into the source replaces its
files (an export into the checkpoint deleted the checkpoint's tokenizer.json), an output inside a
folder of text files is read back as input, and ``--overwrite`` on a folder holding the source
deletes it. And a non-empty folder is written only on request, then emptied first: files another
model left there (``generation_config.json``, ``tokenizer.model``, ``special_tokens_map.json``)
would be loaded beside ours, and transformers would take their end-of-sequence token.

Standard library only: ``data`` and ``interop`` both import it (tests/test_packaging.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FIX_NOT_EMPTY = "pass --overwrite to replace its contents, or choose an empty folder"


def _relation(out: str, src: str) -> str | None:
    """How folder ``out`` overlaps ``src`` (two absolute paths): "same", "inside", "holds", or None."""
    if out == src:
        return "same"
    if os.path.commonpath([out, src]) == src:
        return "inside"
    if os.path.commonpath([out, src]) == out:
        return "holds"
    return None


def check_output_dir(out: str | Path, source: str | Path, *, overwrite: bool, source_name: str) -> None:
    """Raise a ValueError if ``out`` may not be written: it overlaps ``source`` (always refused), it is
    not a folder, or it is a non-empty folder and ``overwrite`` is False. Touches nothing.

    ``source_name``: what ``source`` is, for the message ("checkpoint", "source").
    """
    out, source = Path(out), Path(source)
    # Both the paths as given and as resolved: resolving catches a symlink into the source, and the
    # literal path a source read through a link inside OUT, which emptying OUT would unlink mid-read.
    for o, s in ((os.path.abspath(out), os.path.abspath(source)), (str(out.resolve()), str(source.resolve()))):
        relation = _relation(o, s)
        if relation == "same":
            raise ValueError(f"output folder {out} is the {source_name} itself; choose another output folder")
        if relation == "inside":
            raise ValueError(f"output folder {out} is inside the {source_name} {source}; choose a folder outside it")
        if relation == "holds":
            raise ValueError(
                f"output folder {out} holds the {source_name} {source} (--overwrite would delete it); "
                "choose a folder that does not contain it"
            )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder; choose a folder")
    if not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(f"output folder {out} is not empty ({shown}); {FIX_NOT_EMPTY}")


def clear_output_dir(out: str | Path) -> None:
    """Remove everything inside folder ``out``, and nothing outside it.

    A symlink is removed as a link: its target, a file or a folder anywhere, is left alone (rmtree
    does the same for links below the top level).
    """
    with os.scandir(out) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
