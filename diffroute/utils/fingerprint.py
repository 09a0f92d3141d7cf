"""Fingerprints of what determines a run's results, stored beside resumable results so that a resumed run never
mixes settings: on a mismatch the run is refused, naming what differs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from diffroute.errors import InputError
from diffroute.utils.io import atomic_write_json, read_json

SAMPLES_PER_TENSOR = 4096  # enough to tell two trainings apart; hashing every weight of a 12B model costs too much


class ResumeMismatchError(InputError):
    """An output folder holds results made with other settings than the ones asked for now."""


def digest(obj) -> str:
    """Short SHA-256 of a JSON-able object (canonical: sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Short SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def weights_digest(pipe) -> str:
    """Digest of a pipeline's weights: every tensor's name, shape and dtype plus evenly strided samples of its values
    (all of them for small tensors). Two different trainings or checkpoints give different digests."""
    return modules_digest(getattr(pipe, "components", {}))


@torch.no_grad()
def modules_digest(modules: dict) -> str:
    """`weights_digest` of named modules (entries that are not modules are ignored)."""
    h = hashlib.sha256()
    for name, component in sorted(modules.items()):
        if not isinstance(component, torch.nn.Module):
            continue
        for key, t in component.state_dict().items():
            h.update(f"{name}.{key}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(flat.numel() // SAMPLES_PER_TENSOR, 1)
                h.update(flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def check_or_record(path: Path, fingerprint: dict, what: str, fix: str, write: bool = True) -> None:
    """If `path` holds a fingerprint, it must equal `fingerprint` (else ResumeMismatchError naming each difference
    and `fix`); if it holds none, record this one (when `write`, i.e. on the main process)."""
    path = Path(path)
    if path.is_file():
        saved = read_json(path, f"{what} fingerprint")
        if not isinstance(saved, dict):
            raise ResumeMismatchError(f"{path} is not a fingerprint file; {fix}")
        diffs = [
            f"{k}: {_short(saved.get(k))} then, {_short(fingerprint.get(k))} now"
            for k in sorted(set(saved) | set(fingerprint))
            if saved.get(k) != fingerprint.get(k)
        ]
        if diffs:
            raise ResumeMismatchError(
                f"{what} in {path.parent} was made with other settings ({'; '.join(diffs)}). {fix}"
            )
    elif write:
        atomic_write_json(path, fingerprint)


def check_or_record_all(records, fix: str, state) -> None:
    """`records`: (path, fingerprint, what) triples. Every process checks them all before the main process records
    any (`state`: an accelerate PartialState), so a mismatch anywhere leaves nothing written."""
    for path, fingerprint, what in records:
        check_or_record(path, fingerprint, what, fix, write=False)
    state.wait_for_everyone()
    if state.is_main_process:
        for path, fingerprint, what in records:
            check_or_record(path, fingerprint, what, fix)
    state.wait_for_everyone()


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
