"""Segmenting a cohort: finding the cases, naming their outputs, resuming, sharding across torchrun ranks.

A case is one volume: a NIfTI/NRRD/MHA file or a DICOM series folder. Inputs may also be a folder holding
cases (one per volume file or per series subfolder) or a CSV with an ``image`` column (optional ``id`` and
``output``). Each case's label map goes to ``DIR/<id>.nii.gz`` (and ``DIR/<id>.seg.nrrd``), written
atomically, so a case whose outputs exist is complete and is skipped on a rerun. A case that fails is
recorded with its one-line reason and the others go on.

Under ``torchrun`` every rank plans the same way and takes its share of the cases (balanced by slice
count, deterministic); after a barrier rank 0 writes the merged statistics and failures.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import SAMedError, one_line
from .volume_io import atomic_output_path, read_volume, remove_stale_temporaries

__all__ = ["case_id", "is_single_volume", "Case", "CohortError", "CohortResult", "discover_cases", "shard_cases",
           "is_complete", "run_cohort", "distributed_context", "close_distributed", "ModelSource", "write_failures",
           "FAILURES_NAME"]

log = logging.getLogger(__name__)

FAILURES_NAME = "failures.csv"
# Single files that hold one volume; any other folder entry (notes, CSVs, previous outputs' temp files) is no case.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_SUFFIX = ".nii.gz"
SEG_SUFFIX = ".seg.nrrd"
# What a bad case can raise while being read, segmented or written; anything else is a bug and stops the run.
CASE_ERRORS = (SAMedError, ValueError, OSError, RuntimeError, MemoryError)


class CohortError(SAMedError, ValueError):
    """The cohort cannot be run at all (no cases, duplicate ids, bad CSV): exit status 2."""


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    output: Path
    seg_nrrd: Path | None = None
    slices: int = 1  # axial slices, the unit of work for sharding

    def outputs(self) -> list[Path]:
        return [self.output] + ([self.seg_nrrd] if self.seg_nrrd else [])


@dataclass
class CohortResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (case id, one-line reason)
    statistics: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- discovery


def _volume_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s) and not name.endswith(SEG_SUFFIX)), None)


def case_id(path: str | os.PathLike) -> str:
    """A case's default id: the file name without its volume extension, or the series folder's name."""
    path = Path(path)
    suffix = _volume_suffix(path) if path.is_file() else None
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _is_case_collection(folder: Path) -> bool:
    """A folder holding cases (volume files or series subfolders), as opposed to one DICOM series."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return any(p.is_dir() or _volume_suffix(p) for p in entries)


def is_single_volume(path: str | os.PathLike) -> bool:
    """True unless ``path`` is a CSV case list or a folder of cases (a missing path counts as one volume)."""
    path = Path(path)
    return not (path.suffix.lower() == ".csv" or (path.is_dir() and _is_case_collection(path)))


def _expand(path: Path, output_dir: Path) -> list[tuple[str, Path, str | None]]:
    """(id, image, explicit output or None) for one command-line input."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_case_csv(path)
    if path.is_dir() and _is_case_collection(path):
        # The output folder may sit inside the input folder: it is no case.
        entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.resolve() != output_dir.resolve())
        return [(case_id(p), p, None) for p in entries if p.is_dir() or _volume_suffix(p)]
    # A single file or a DICOM series folder; reading it later says what is wrong with it, if anything.
    return [(case_id(path), path, None)]


def _read_case_csv(path: Path) -> list[tuple[str, Path, str | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"{path}: cannot read CSV: {exc}") from exc
    if not rows or "image" not in rows[0]:
        raise CohortError(f"{path}: a case list needs an 'image' column (optional 'id' and 'output')")
    cases = []
    for number, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        image = (row.get("image") or "").strip()
        if not image:
            raise CohortError(f"{path}: line {number} has no image")
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        name = (row.get("id") or "").strip() or case_id(image_path)
        cases.append((name, image_path, (row.get("output") or "").strip() or None))
    return cases


def _slice_count(image: Path) -> int:
    """Axial slices from the header alone (or the file count of a DICOM folder); 1 if unreadable."""
    try:
        if image.is_dir():
            return max(1, sum(1 for p in image.iterdir() if p.is_file()))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image))
        reader.ReadImageInformation()
        size = reader.GetSize()
        if len(size) != 3:
            return 1
        direction = np.abs(np.array(reader.GetDirection()).reshape(3, 3))
        return int(size[int(np.argmax(direction[2]))])  # the voxel axis closest to superior-inferior
    except (OSError, RuntimeError):
        return 1


def discover_cases(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                   seg_nrrd: bool = False) -> list[Case]:
    """All cases named by ``inputs`` (files, DICOM folders, folders of cases, CSV lists), in input order."""
    from .volume_io import WRITABLE_EXTENSIONS

    output_dir = Path(output_dir)
    cases, seen = [], {}
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise CohortError(f"{path}: no such file or folder")
        for name, image, explicit in _expand(path, output_dir):
            if name in seen:
                raise CohortError(f"case id '{name}' is used twice ({seen[name]} and {image}); "
                                  "give unique ids in a CSV 'id' column")
            seen[name] = image
            if explicit:
                output = Path(explicit) if Path(explicit).is_absolute() else output_dir / explicit
                if not output.name.lower().endswith(WRITABLE_EXTENSIONS):
                    raise CohortError(f"{output}: unsupported output extension; use one of "
                                      f"{', '.join(WRITABLE_EXTENSIONS)}")
                stem = output.name[: len(output.name) - len(next(e for e in WRITABLE_EXTENSIONS
                                                                  if output.name.lower().endswith(e)))]
                seg = output.with_name(stem + SEG_SUFFIX)
            else:
                output, seg = output_dir / (name + LABEL_SUFFIX), output_dir / (name + SEG_SUFFIX)
            cases.append(Case(name, image, output, seg if seg_nrrd else None, _slice_count(image)))
    if not cases:
        raise CohortError(f"no cases found in {', '.join(map(str, inputs))}")
    return cases


# --------------------------------------------------------------------------- resume and sharding


def is_complete(case: Case) -> bool:
    """Outputs are only ever moved into place whole, so a case whose outputs all exist is done."""
    return all(p.is_file() and p.stat().st_size > 0 for p in case.outputs())


def shard_cases(cases: Sequence[Case], rank: int, world: int) -> list[Case]:
    """This rank's cases: largest first to the least-loaded rank (ties: id, then lowest rank). Same on every rank."""
    loads = [0] * world
    mine = []
    for case in sorted(cases, key=lambda c: (-c.slices, c.id)):
        target = min(range(world), key=lambda r: (loads[r], r))
        loads[target] += case.slices
        if target == rank:
            mine.append(case)
    order = {case.id: i for i, case in enumerate(cases)}
    return sorted(mine, key=lambda c: order[c.id])


# --------------------------------------------------------------------------- distributed


def distributed_context(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) under torchrun (one device and a share of the CPU threads per process)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    from .trainer import init_distributed

    rank, world = init_distributed(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:
        # torchrun sets one thread per process; the processes on a machine share its cores instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def close_distributed(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _gather(result: CohortResult, world: int) -> list[CohortResult]:
    if world <= 1:
        return [result]
    import torch.distributed as dist

    everyone: list = [None] * world
    dist.all_gather_object(everyone, result)
    return everyone


# --------------------------------------------------------------------------- running


def write_failures(failures: Sequence[tuple[str, str]], output_dir: Path) -> Path | None:
    """``DIR/failures.csv`` (case, error); removed when nothing failed so an old list cannot mislead."""
    path = output_dir / FAILURES_NAME
    if not failures:
        path.unlink(missing_ok=True)
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "error"])
    writer.writerows(failures)
    with atomic_output_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


class ModelSource:
    """A checkpoint loaded at most once per process, and only when a case needs it (a rerun may need none)."""

    def __init__(self, path: str | os.PathLike, load: Callable[[], object]):
        self.path, self._load, self._model = Path(path), load, None

    @property
    def name(self) -> str:
        return self.path.name

    def classes(self):
        from .checkpoint import read_model_card

        return self._model.card.classes if self._model is not None else read_model_card(self.path).classes

    def get(self):
        if self._model is None:
            self._model = self._load()
        return self._model


def run_cohort(cases: Sequence[Case], model: ModelSource, segment: Callable, *, output_dir: str | os.PathLike,
               overwrite: bool = False, statistics: bool = False, rank: int = 0, world: int = 1,
               progress: bool = True) -> CohortResult:
    """Segment this rank's share of ``cases``; returns the merged result of all ranks.

    ``segment(image, loaded_model)`` returns the label map on the image's grid. Statistics of skipped cases
    are computed from their existing label maps. Rank 0 writes ``failures.csv`` after every rank is done.
    """
    from .segfile import write_seg_nrrd
    from .statistics import label_statistics
    from .volume_io import write_image

    from .inference import Cancelled

    started = time.perf_counter()
    output_dir = Path(output_dir)
    # Every rank sees the same files here (nothing is written before the barrier), so all plan alike; the
    # cases still to do are shared out by themselves, so a resumed run stays balanced.
    pending = [c for c in cases if overwrite or not is_complete(c)]
    finished = [c for c in cases if c not in pending]
    todo = shard_cases(pending, rank, world)
    result = CohortResult(skipped=[c.id for c in shard_cases(finished, rank, world)])
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    # Loaded on every rank if any case needs it: a bad checkpoint then stops all ranks, not just some.
    loaded = model.get() if pending else None
    classes = model.classes() if statistics else []

    if statistics:
        for case in (c for c in finished if c.id in result.skipped):
            try:
                image, labels = read_volume(case.image), read_volume(case.output, allow_constant=True)
                result.statistics.extend(label_statistics(image, labels, classes, case.id, model.name))
            except CASE_ERRORS as exc:
                result.failures.append((case.id, one_line(exc)))

    bar = _progress_bar(len(todo), enabled=progress and rank == 0, world=world)
    # Reading and preparing the next volume overlaps the model work on this one.
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_volume, todo[0].image) if todo else None
        for i, case in enumerate(todo):
            loading, pending = pending, (reader.submit(read_volume, todo[i + 1].image) if i + 1 < len(todo) else None)
            try:
                image = loading.result()
                labels = segment(image, loaded)
                for output in case.outputs():
                    remove_stale_temporaries(output)
                write_image(labels, case.output)
                if case.seg_nrrd:
                    write_seg_nrrd(labels, loaded.card.classes, case.seg_nrrd)
                if statistics:
                    result.statistics.extend(label_statistics(image, labels, classes, case.id, model.name))
                result.done.append(case.id)
            except Cancelled:
                raise
            except CASE_ERRORS as exc:
                log.debug("case %s failed", case.id, exc_info=True)
                result.failures.append((case.id, one_line(exc)))
            bar.update(1)
    bar.close()
    result.seconds = time.perf_counter() - started

    merged = _merge(_gather(result, world), cases)
    if rank == 0:
        write_failures(merged.failures, output_dir)
    return merged


def _merge(results: Iterable[CohortResult], cases: Sequence[Case]) -> CohortResult:
    """All ranks' results in the cases' input order (so the files do not depend on the sharding)."""
    order = {case.id: i for i, case in enumerate(cases)}
    merged = CohortResult()
    for part in results:
        merged.done += part.done
        merged.skipped += part.skipped
        merged.failures += part.failures
        merged.statistics += part.statistics
        merged.seconds = max(merged.seconds, part.seconds)
    merged.done.sort(key=order.get)
    merged.skipped.sort(key=order.get)
    merged.failures.sort(key=lambda f: order[f[0]])
    merged.statistics.sort(key=lambda row: (order[row["case"]], row["class_value"]))
    return merged


def _progress_bar(total: int, enabled: bool, world: int):
    from tqdm import tqdm

    desc = "cases" if world == 1 else f"cases (rank 0 of {world})"
    return tqdm(total=total, desc=desc, unit="case", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
