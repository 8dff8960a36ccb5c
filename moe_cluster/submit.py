"""What ``moe-cluster submit`` sends: which files, which environment variables, over which scheme.

Files: an allow-list (``ALLOWED`` plus each ``--include PATH``), less what the rules below leave out
inside those folders; a file that looks like a key or credentials is refused, included or not.
``upload_listing`` decides, ``stage`` copies exactly that into a temporary folder, and that folder
is the job's working_dir, so what is listed is what Ray packs and sends. The project's .gitignore
and .rayignore files play no part.

Functions of their arguments and the files they name, tested without a cluster (tests/test_submit.py);
``cli.cmd_submit`` applies them in order before anything leaves this machine.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

# The one list of environment variables passed on to the job when set here, besides those named with
# `--env NAME`. Their values reach the job through Ray's runtime_env and are never printed.
PASS_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "HF_TOKEN")

# What a working dir must hold: the job runs `python jobs/train.py`, which composes conf/.
CHECKOUT_FILES = ("jobs/train.py", "conf/config.yaml")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_to_pass(extra: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """PASS_ENV plus the `--env` names, those set in `environ`; a ValueError for a bad `--env`.

    The messages name variables, never values: `--env NAME=VALUE` is refused without echoing VALUE.
    """
    for name in extra:
        if "=" in name:
            bare = name.split("=", 1)[0]
            raise ValueError(
                f"--env {bare}=...: give only the name; a value on the command line lands in the shell "
                f"history and in `ps`. Export {bare} in the environment instead, then pass --env {bare}"
            )
        if not _NAME.fullmatch(name):
            raise ValueError(f"--env {name!r} is not an environment variable name")
        if name not in environ:
            raise ValueError(f"--env {name}: {name} is not set in this environment; export it first")
    return {name: environ[name] for name in dict.fromkeys((*PASS_ENV, *extra)) if name in environ}


def working_dir(given: str | None, package_root: Path) -> Path:
    """The folder to upload: `given`, else the checkout this package runs from; it must be a checkout.

    An installed (non-editable) package has no jobs/ or conf/ beside it, so it needs `--working-dir`.
    """
    if given is None:
        if all((package_root / f).is_file() for f in CHECKOUT_FILES):
            return package_root
        raise ValueError(
            f"moe-cluster is installed as a package ({package_root}), without jobs/ and conf/: pass "
            f"--working-dir pointing at a project checkout (a folder with {' and '.join(CHECKOUT_FILES)})"
        )
    path = Path(given).resolve()
    missing = [f for f in CHECKOUT_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"--working-dir {given} is not a project checkout: it has no {' and no '.join(missing)}; "
            f"point it at a folder with {' and '.join(CHECKOUT_FILES)}"
        )
    return path


# --- Files ----------------------------------------------------------------------------------------

# Uploaded from a working dir, when present: the packages, the job scripts and their config, and the
# project file (with the README it names as its readme). Anything else (a prepared data/, outputs/,
# notes, keys) stays on this machine unless named with `--include PATH`.
ALLOWED = ("moe_cluster", "kernels", "jobs", "conf", "pyproject.toml", "README.md")

NOT_ALLOWED = "not in the allow-list"
CHECKPOINTS = "checkpoint folder"
# Left out inside allowed or included folders, by name (lowercased, fnmatch); a folder is not walked.
# Ray itself drops .git, .venv, venv and __pycache__ while packing: they are rules here too, so the
# listing stays what Ray sends. .gitignore / .rayignore play no part, and are not staged, since Ray
# would apply them while packing the staging folder.
FOLDER_RULES = (
    ("__pycache__", ("__pycache__",)),
    ("*.egg-info", ("*.egg-info",)),
    (CHECKPOINTS, ("checkpoints",)),  # and any folder holding CHECKPOINT_MARKER
    ("run outputs", ("outputs", "multirun", "wandb")),
    (".git / virtualenv", (".git", ".venv", "venv")),
)
CHECKPOINT_MARKER = "COMMITTED"  # moe_cluster.train.checkpoint.MARKER, in each complete checkpoint
DATA_FILES = tuple(f"*.{ext}" for ext in (
    "bin", "safetensors", "npy", "npz", "parquet", "arrow", "feather", "pt", "pth", "ckpt", "h5", "hdf5",
    "pkl", "pickle", "gguf", "onnx", "tfrecord", "idx", "zst", "gz", "tgz", "tar", "zip", "7z",
))  # fmt: skip
FILE_RULES = (
    ("*.pyc", ("*.pyc", "*.pyo")),
    ("*.distcp", ("*.distcp",)),
    ("data file", DATA_FILES),
    ("ignore file", (".gitignore", ".rayignore")),
    (".git / virtualenv", (".git", ".venv", "venv")),  # a submodule's .git is a file
)
MAX_FILE_BYTES = 16 * 2**20  # source and config files are far smaller: a bigger file is data
TOO_BIG = f"over {MAX_FILE_BYTES >> 20} MiB"
LINK_OUT = "link out of the working dir"
FOLDER_LINK = "link to a folder (not followed)"
NOT_REGULAR = "not a regular file (a broken link, a socket)"

# Refused wherever they are, even when named with --include: a job gets its secrets as environment
# variables (PASS_ENV, --env NAME), never as files. Names are lowercased before matching.
SECRET_NAMES = (
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
    "*.ppk", "*.kdbx", ".netrc", "_netrc", ".git-credentials", "credentials", "*credentials*.json",
    "credentials.csv", "*_accesskeys.csv", "*service-account*.json", "*service_account*.json", "client_secret*.json",
    "auth_token", "kubeconfig", "*.kubeconfig", ".npmrc", ".pypirc", "secrets.y*ml", "secrets.json", "secrets.toml",
    ".env", ".env.*", "*.env", ".envrc", ".pgpass", ".htpasswd", ".s3cfg", ".boto", ".dockercfg", ".vault-token",
)  # fmt: skip
SECRET_FOLDERS = (".ssh", ".aws", ".gnupg", ".ray", ".kube", ".docker", ".azure", ".password-store", ".terraform.d")
# Text files up to SCAN_BYTES are read for these (the patterns are written so that this file, which
# is uploaded, does not match them). What matched is named in the error; the text never is.
SCAN_BYTES = 2**20
SECRET_CONTENT = (
    ("a private key", re.compile(rb"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")),
    ("a PuTTY private key", re.compile(rb"PuTTY-User-Key-File-\d+:")),
    ("an AWS secret access key", re.compile(rb"(?i)aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+]{40}")),
    ("a Hugging Face token", re.compile(rb"\bhf_[A-Za-z0-9]{34}\b")),
    ("a GitHub token", re.compile(rb"\b(gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,})\b")),
    ("a W&B API key", re.compile(rb"(?i)wandb[_-]?api[_-]?key[\"']?\s*[=:]\s*[\"']?[0-9a-f]{40}\b")),
)
# A Google service-account key: both fields, in either order.
_SERVICE_ACCOUNT = (re.compile(rb'"type"\s*:\s*"service_account"'), re.compile(rb'"private_key"\s*:'))


@dataclass(frozen=True)
class Listing:
    """What `submit` sends from a working dir, and why the rest stays. Paths are relative, posix."""

    files: tuple[str, ...]
    """Staged and uploaded (unless any is refused), sorted."""
    size: int
    """Their bytes."""
    left_out: dict[str, tuple[str, ...]]
    """Rule -> paths it left out; a folder ends with "/" and counts once (it is not walked)."""
    refused: tuple[tuple[str, str], ...]
    """(path, why) for files that look like keys or credentials: submit stops, nothing is sent."""


def _match(name: str, rules) -> str | None:
    name = name.lower()
    return next((label for label, patterns in rules if any(fnmatch(name, p) for p in patterns)), None)


def _included(root: Path, given: str) -> str:
    """`given` (relative to `root`, or absolute inside it) as a relative path; a ValueError if it is not there."""
    path = Path(os.path.normpath(Path(given) if Path(given).is_absolute() else root / given))
    resolved = path.resolve()  # judged once links are followed: a link may not bring a file in from outside
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"--include {given}: that is outside the working dir {root}; give a path inside it (relative to "
            f"it), or copy what the job needs into the project"
        )
    if resolved == root:
        raise ValueError(f"--include {given} names the whole working dir; name the files or folders to add")
    if not path.exists():
        raise ValueError(f"--include {given}: there is no {path} (a path given to --include is relative to {root})")
    return (path if path.is_relative_to(root) else resolved).relative_to(root).as_posix()


def _walk(root: Path, top: str, files: dict[str, int], left_out: dict[str, list[str]]) -> None:
    """Add the files under folder `top` to `files` (path -> bytes), and what the rules leave out to `left_out`."""
    for here, folders, names in os.walk(root / top):
        here = Path(here)
        kept = []
        for name in sorted(folders):
            path, rel = here / name, (here / name).relative_to(root).as_posix()
            if path.is_symlink():  # not followed: what it points at may be anything, anywhere
                rule = FOLDER_LINK
            elif (path / CHECKPOINT_MARKER).is_file():
                rule = CHECKPOINTS
            else:
                rule = _match(name, FOLDER_RULES)
            if rule:
                left_out[rule].append(f"{rel}/")
            else:
                kept.append(name)
        folders[:] = kept
        for name in sorted(names):
            path, rel = here / name, (here / name).relative_to(root).as_posix()
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                rule = LINK_OUT
            elif not path.is_file():
                rule = NOT_REGULAR
            else:
                size = path.stat().st_size
                rule = _match(name, FILE_RULES) or (TOO_BIG if size > MAX_FILE_BYTES else None)
            if rule:
                left_out[rule].append(rel)
            else:
                files[rel] = size


def looks_secret(root: Path, rel: str) -> str | None:
    """Why the file `rel` under `root` looks like a key or credentials, or None. Never returns its text."""
    root = root.resolve()
    path = root / rel
    names = [rel]
    if path.is_symlink():  # a link named notes.txt may point at .ssh/id_rsa: judge the target's name too
        target = path.resolve()
        names.append((target.relative_to(root) if target.is_relative_to(root) else target).as_posix())
    for candidate in names:
        *folders, name = candidate.lower().split("/")
        if folder := next((f for f in folders if f in SECRET_FOLDERS), None):
            return f"inside a {folder}/ folder"
        if pattern := next((p for p in SECRET_NAMES if fnmatch(name, p)), None):
            return f"its name matches {pattern}"
    if path.stat().st_size > SCAN_BYTES:
        return None
    text = path.read_bytes()
    if b"\0" in text[:8192]:  # binary: keys and tokens in binary formats are caught by name
        return None
    if all(p.search(text) for p in _SERVICE_ACCOUNT):
        return "holds what looks like a service-account key"
    return next((f"holds what looks like {label}" for label, p in SECRET_CONTENT if p.search(text)), None)


def upload_listing(root: Path, includes: Sequence[str] = ()) -> Listing:
    """What `submit` uploads from working dir `root`: ALLOWED plus `includes`, less the rules; what it refuses.

    A folder (allowed or included) is walked with FOLDER_RULES and FILE_RULES; a file named on its own
    (pyproject.toml, or by --include) is taken as named, whatever FILE_RULES say. Every file taken is
    then checked by looks_secret. A ValueError for an include that is missing or outside `root`.
    """
    root = root.resolve()
    extra = [_included(root, given) for given in includes]
    files: dict[str, int] = {}
    left_out: dict[str, list[str]] = defaultdict(list)
    allowed = []
    for name in ALLOWED:
        if (root / name).is_symlink():  # it may point anywhere: out of the project, at a home folder
            left_out[LINK_OUT if not (root / name).resolve().is_relative_to(root) else FOLDER_LINK].append(name)
        elif (root / name).exists():
            allowed.append(name)
    named = list(dict.fromkeys(allowed + extra))
    for entry in sorted(root.iterdir()):
        if entry.name not in ALLOWED and not any(n.split("/")[0] == entry.name for n in named):
            left_out[NOT_ALLOWED].append(f"{entry.name}/" if entry.is_dir() else entry.name)
    for rel in named:
        if (root / rel).is_dir():
            _walk(root, rel, files, left_out)
    for rel in named:
        if not (root / rel).is_dir():
            files[rel] = (root / rel).stat().st_size
    # An include inside a folder a rule pruned (or a file a rule dropped) wins over that rule.
    covered = set(named) | {"/".join(n.split("/")[:i]) for n in named for i in range(1, n.count("/") + 1)}
    left = {rule: tuple(p for p in paths if p.rstrip("/") not in covered and p not in files)
            for rule, paths in left_out.items()}  # fmt: skip
    refused = tuple((rel, why) for rel in sorted(files) if (why := looks_secret(root, rel)))
    return Listing(
        files=tuple(sorted(files)),
        size=sum(files.values()),
        left_out={rule: paths for rule, paths in left.items() if paths},
        refused=refused,
    )


def refusal_error(listing: Listing, root: Path, cap: int = 10) -> str | None:
    """The error that stops `submit` when the listing holds keys or credentials, else None."""
    if not listing.refused:
        return None
    named = "; ".join(f"{rel} ({why})" for rel, why in listing.refused[:cap])
    if len(listing.refused) > cap:
        named += f"; and {len(listing.refused) - cap} more"
    return (
        f"refusing to upload what looks like keys or credentials from {root}: {named}. Nothing was sent. Move "
        f"each out of the uploaded folders (or out of the project, or delete it), or drop the --include that "
        f"names it; a job gets its secrets as environment variables (--env NAME), not as files"
    )


def left_out_summary(listing: Listing, cap: int = 5) -> str:
    """A few lines naming what the rules left out (at most `cap` paths per rule), or "" when nothing was."""
    if not listing.left_out:
        return ""
    count = sum(len(paths) for paths in listing.left_out.values())
    lines = [f"left out by rule: {count} paths (a folder counts once; --include PATH adds one back)"]
    for rule, paths in listing.left_out.items():
        more = f", +{len(paths) - cap} more" if len(paths) > cap else ""
        lines.append(f"  {rule} ({len(paths)}): {', '.join(paths[:cap])}{more}")
    return "\n".join(lines)


def stage(root: Path, files: Sequence[str], dest: Path) -> None:
    """Copy `files` (relative to `root`) into the empty folder `dest`, which becomes the job's working_dir."""
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)  # a link's target is copied, not the link
