"""Resumable pruning: the state a layer-wise prune leaves after each finished layer.

A state directory (by default a hidden sibling of the output, `.NAME.resume`):

    state.json               what run this is (fingerprint and its parts), how many
                             layers are finished, their records, the calibration record
    calib.safetensors        the calibration token ids (self-sampled text is not regenerated)
    layer-00003.safetensors  finished slim layer 3's weights
    xs-00004/                layer 4's input activations, one safetensors file per batch
    fisher/                  with --fisher-samples: each layer's G (prune/fisher.Curvatures),
                             read back once its complete.json is written

Every file is written under a temporary name, flushed to disk and renamed into
place (os.replace); state.json, which says how many layers are finished, is
replaced last. A process killed at any moment (SIGKILL included) therefore
leaves the previous consistent state, and a resumed run recomputes nothing
that was finished. Activations and weights round-trip through safetensors
exactly, so a resumed run gives the same bytes as an uninterrupted one.

The fingerprint is the sha256 of the source identity (sources.source_identity:
path, config.json hash, weight file sizes and mtimes), the calibration file's
identity (size and mtime) and PruneConfig.to_dict(); state with another
fingerprint is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, fsync_dir, write_error
from .errors import BadInputError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CALIB_FILE = "calib.safetensors"
FISHER_DIR = "fisher"
FORMAT = "slimgpt-deploy-resume/1"
PARTIAL = ".partial"


def default_state_dir(out: Path, kind: str = "resume") -> Path:
    """Where a command writing OUT keeps its resume state: the hidden sibling `.OUT.KIND`
    (`prune`: `.OUT.resume`; `recover`: `.OUT.recover`)."""
    out = Path(out)
    return out.parent / f".{out.name}.{kind}"


def fingerprint(identity: dict) -> str:
    """sha256 of a JSON-able identity (source, calibration file, options), key order ignored."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def calibration_identity(spec: str) -> dict | None:
    """Size and mtime of a local calibration file (None for `self` and dataset names)."""
    path = Path(spec.removeprefix("file:")).expanduser()
    if spec == "self" or not path.is_file():
        return None
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_difference(old: dict, new: dict) -> str:
    """What differs between two identities, in words (options listed with both values)."""
    parts = []
    if old.get("source") != new.get("source"):
        parts.append("the model source changed (path, config.json or weight files)")
    if old.get("calibration") != new.get("calibration"):
        parts.append("the calibration file changed")
    a, b = old.get("options") or {}, new.get("options") or {}
    changed = [
        f"--{k.replace('_', '-')} {a.get(k)!r} there, {b.get(k)!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    if changed:
        parts.append("other options: " + ", ".join(changed))
    return "; ".join(parts) or "another state format"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    # clone: a fresh, allocator-aligned tensor, so kernels take the same paths as in an uninterrupted run
    return {k: v.clone() for k, v in load_file(str(path)).items()}


@dataclass(frozen=True)
class Home:
    """Where in-memory activation batches live: a device, pinned on the host when `pin`."""

    device: torch.device
    pin: bool = False

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)  # an explicit copy when x is elsewhere, a no-op when it is here
        return x.pin_memory() if self.pin else x


class Batches:
    """Activation batches [B, S, hidden] at one layer boundary, in order.

    In memory (a list), or, to cap memory (--max-memory), one safetensors file
    per batch in `directory`, read back one batch at a time. In memory, `home`
    says where batches are kept: `Home(device)` on the compute device, or on the
    host, pinned (`pin=True`) so copies to a GPU are fast; None keeps them where
    they come from. Batches are handed out where they are kept; the reader moves
    them to its compute device.
    """

    def __init__(
        self, directory: Path | None = None, tensors: list[torch.Tensor] | None = None, home: Home | None = None
    ):
        self.directory = directory
        self.home = home
        self._tensors = tensors if tensors is not None else []
        self._n = len(list(directory.glob("*.safetensors"))) if directory is not None else 0

    def _file(self, j: int) -> Path:
        return self.directory / f"{j:05d}.safetensors"

    def append(self, x: torch.Tensor) -> None:
        if self.directory is None:
            self._tensors.append(self.home.keep(x) if self.home is not None else x)
        else:
            atomic_write(self._file(self._n), lambda tmp: save_tensors({"x": x}, tmp))
            self._n += 1

    def __len__(self) -> int:
        return self._n if self.directory is not None else len(self._tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.directory is None:
            yield from self._tensors
        else:
            for j in range(self._n):
                yield load_tensors(self._file(j))["x"]

    def write_to(self, directory: Path) -> None:
        """Save every batch into the (new) `directory`."""
        directory.mkdir(parents=True)
        for j, x in enumerate(self):
            atomic_write(directory / f"{j:05d}.safetensors", lambda tmp: save_tensors({"x": x}, tmp))

    def move_to(self, directory: Path) -> None:
        """Rename this disk-backed store's directory to `directory` (replacing a stale one)."""
        if directory.exists():
            shutil.rmtree(directory)
        self.directory.replace(directory)
        self.directory = directory

    def drop(self) -> None:
        """Free the batches (delete the files of a disk-backed store)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self._tensors = []
        self._n = 0


class ResumeState:
    """The state directory of one prune; `open` it, then the engine commits each finished layer."""

    def __init__(self, directory: Path, identity: dict, total: int, meta: dict | None = None):
        self.directory = Path(directory)
        self.identity = identity
        self.total = total
        meta = meta or {}
        self.finished: int = meta.get("finished", 0)
        self.records: list[dict] = meta.get("records", [])
        self.calibration: dict | None = meta.get("calibration")

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: Path, identity: dict, total: int, *, resume: bool) -> ResumeState:
        """The state to continue from (`resume`) or a fresh one (clearing old state).

        Raises BadInputError when `resume` finds state of another source or options.
        """
        directory = Path(directory)
        meta = cls._read_meta(directory) if directory.exists() else None
        if meta is not None and not resume:
            log.warning("clearing old resume state in %s (pass --resume to continue it)", directory)
        if resume and meta is not None:
            if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint(identity):
                what = describe_difference(meta.get("identity") or {}, identity)
                raise BadInputError(
                    f"resume state in {directory} does not match this run ({what}); "
                    f"drop --resume to start over (the old state is cleared) or delete {directory}"
                )
            state = cls(directory, identity, total, meta)
            state._clean()
            log.info("resuming from %s: %d/%d layers finished", directory, state.finished, total)
            return state
        if resume:
            log.info("no resume state in %s; starting from the beginning", directory)
        try:
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
        except OSError as err:
            raise (write_error(err, directory) or err) from err
        return cls(directory, identity, total)

    @staticmethod
    def _read_meta(directory: Path) -> dict | None:
        try:
            return json.loads((directory / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None  # never committed (killed before the first write): nothing to resume

    def _clean(self) -> None:
        """Remove what a killed run wrote past the last commit (partial files, later layers)."""
        keep = {STATE_FILE, CALIB_FILE, FISHER_DIR, f"xs-{self.finished:05d}"} | {
            f"layer-{i:05d}.safetensors" for i in range(self.finished)
        }
        for path in self.directory.iterdir():
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    # ------------------------------------------------------------------ reading

    def calibration_ids(self) -> torch.Tensor | None:
        path = self.directory / CALIB_FILE
        return load_tensors(path)["input_ids"] if self.calibration is not None and path.is_file() else None

    def layer_weights(self, i: int) -> dict[str, torch.Tensor]:
        assert i < self.finished, (i, self.finished)
        return load_tensors(self.directory / f"layer-{i:05d}.safetensors")

    def inputs(self, in_memory: bool, home: Home | None = None) -> Batches:
        """The input activations of the first unfinished layer (finished > 0)."""
        stored = Batches(self.directory / f"xs-{self.finished:05d}")
        if not in_memory:
            return stored
        kept = Batches(home=home)
        for x in stored:
            kept.append(x)
        return kept

    def describe(self) -> str:
        return f"resume state in {self.directory} (finished layers {self.finished}/{self.total})"

    # ------------------------------------------------------------------ writing

    def save_calibration(self, input_ids: torch.Tensor, record: dict) -> None:
        """Keep the calibration ids and their record; the state now has something worth resuming."""
        with self._writing():
            atomic_write(self.directory / CALIB_FILE, lambda tmp: save_tensors({"input_ids": input_ids}, tmp))
            self.calibration = record
            self._write_meta()

    def commit_layer(self, i: int, weights: dict[str, torch.Tensor], record: dict, outputs: Batches | None) -> None:
        """Layer i is finished: store its slim weights, record and outputs (the next layer's inputs).

        `outputs` is None after the last layer. A disk-backed `outputs` store is
        moved into place (and keeps serving as the next layer's inputs).
        """
        assert i == self.finished, (i, self.finished)
        with self._writing():
            atomic_write(self.directory / f"layer-{i:05d}.safetensors", lambda tmp: save_tensors(weights, tmp))
            if outputs is not None:
                final = self.directory / f"xs-{i + 1:05d}"
                if outputs.directory is not None and outputs.directory.parent == self.directory:
                    outputs.move_to(final)
                else:
                    if final.exists():
                        shutil.rmtree(final)
                    partial = self.directory / (final.name + PARTIAL)
                    if partial.exists():
                        shutil.rmtree(partial)
                    outputs.write_to(partial)
                    partial.replace(final)
            self.finished, self.records = i + 1, [*self.records, record]
            self._write_meta()  # the commit point
            shutil.rmtree(self.directory / f"xs-{i:05d}", ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_meta(self) -> None:
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint(self.identity),
            "identity": self.identity,
            "num_layers": self.total,
            "finished": self.finished,
            "calibration": self.calibration,
            "records": self.records,
        }
        text = json.dumps(meta, indent=1, default=str) + "\n"
        atomic_write(self.directory / STATE_FILE, lambda tmp: tmp.write_text(text))
        fsync_dir(self.directory)

    def _writing(self):
        return _TypedWriteErrors(self.directory)


class _TypedWriteErrors:
    """Turn a full disk (or a read-only one) while writing state into a one-line typed error."""

    def __init__(self, where: Path):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, OSError):
            typed = write_error(exc, self.where)
            if typed is not None:
                raise typed from exc
        return False
