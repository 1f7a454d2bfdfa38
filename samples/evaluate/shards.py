"""Generation jobs split into shards: planned deterministically, written atomically, resumed after a crash.

A *cell* (one method at one scale) needs samples ``0 .. N-1``. They are cut into shards of ``K`` consecutive indices;
shard ``[start, start + count)`` is one ``.npz`` file named after its range inside the cell's folder. A shard file is
written to a temporary file in the same folder and renamed over its final name (``os.replace``, atomic on POSIX), so
a file with a final name is always complete: a crash leaves either a whole shard or an ignored ``*.tmp`` file.

Resume is therefore "generate the planned shards whose file does not exist". Every process lists the pending shards
*before* any process writes (the caller puts a barrier between :func:`pending` and the work) and takes every
``world``-th one of that list (:func:`assign`), so the processes split the remaining work evenly, never share a shard,
and a re-run never recomputes a finished one. :func:`read_cell` reads the planned files only and checks that every
index ``0 .. N-1`` is present exactly once.

In a shard file, arrays with a leading axis of length ``count`` are per-sample; 0-d arrays are per-shard scalars
(e.g. the generation time). Every file also carries a SHA-256 of its arrays (:data:`DIGEST_KEY`): a shard whose file
cannot be loaded, lacks the digest, or whose arrays no longer match it (bytes overwritten, file truncated) is
*damaged*; :func:`quarantine` moves such files aside (``*.damaged``) so that they count as pending and are generated
again, and :func:`read_shard` raises :class:`DamagedShardError` for them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_KEY = "indices"
DIGEST_KEY = "sha256"
DAMAGED_SUFFIX = ".damaged"


class MissingShardsError(RuntimeError):
    """Raised when a cell is read before all of its shards exist."""


class DamagedShardError(ValueError):
    """A shard file that cannot be loaded or whose arrays do not match their checksum."""


@dataclass(frozen=True)
class Shard:
    """Samples ``start .. start + count - 1`` of the cell stored in folder ``cell``."""

    cell: str
    start: int
    count: int

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.count)

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.cell / f"shard-{self.start:08d}-{self.count:06d}.npz"


def plan(cell: str, num_samples: int, shard_size: int) -> list[Shard]:
    """The shards of a cell with ``num_samples`` samples, ``shard_size`` per shard (the last may be shorter)."""
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples} and {shard_size}")
    return [Shard(cell, start, min(shard_size, num_samples - start)) for start in range(0, num_samples, shard_size)]


def pending(root: str | Path, shards: list[Shard]) -> list[Shard]:
    """The shards whose file does not exist yet, in plan order."""
    return [shard for shard in shards if not shard.path(root).is_file()]


def assign(shards: list[Shard], rank: int, world: int) -> list[Shard]:
    """The shards process ``rank`` of ``world`` generates: every ``world``-th one, starting at ``rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world - 1}], got {rank}")
    return shards[rank::world]


def write_shard(root: str | Path, shard: Shard, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` (plus the indices) as the shard's file, atomically; return its path."""
    target = shard.path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if np.ndim(array) > 0 and len(array) != shard.count:
            raise ValueError(f"array {name!r} has {len(array)} rows for a shard of {shard.count} samples")
    payload = {INDEX_KEY: np.arange(shard.start, shard.start + shard.count, dtype=np.int64), **arrays}
    payload[DIGEST_KEY] = np.array(digest(payload))
    tmp: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.stem + ".", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return target


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order (the digest entry itself left out)."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        if name == DIGEST_KEY:
            continue
        array = np.ascontiguousarray(arrays[name])
        sha.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def read_shard(root: str | Path, shard: Shard) -> dict[str, np.ndarray]:
    """The arrays of a finished shard (without its digest); :class:`DamagedShardError` if the file cannot be loaded,
    fails its checksum or does not hold the shard's indices."""
    path = shard.path(root)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as error:  # noqa: BLE001  (zip, npy header, CRC, EOF: any load failure is damage)
        raise DamagedShardError(f"{path} cannot be loaded ({type(error).__name__}: {error})") from None
    stored = arrays.pop(DIGEST_KEY, None)
    if stored is None or str(stored) != digest(arrays):
        raise DamagedShardError(f"{path} fails its checksum" if stored is not None else f"{path} has no checksum")
    if not np.array_equal(arrays.get(INDEX_KEY), np.asarray(shard.indices)):
        raise DamagedShardError(f"{path} does not hold samples {shard.start}..{shard.start + shard.count - 1}")
    return arrays


def quarantine(root: str | Path, shards: list[Shard]) -> list[tuple[Path, str]]:
    """Move every existing but damaged shard file aside (``<name>.damaged``), so that it is generated again.

    Returns ``(moved_to, reason)`` per damaged file. Reads every existing shard once (its checksum).
    """
    moved = []
    for shard in shards:
        path = shard.path(root)
        if not path.is_file():
            continue
        try:
            read_shard(root, shard)
        except DamagedShardError as error:
            target = path.with_name(path.name + DAMAGED_SUFFIX)
            os.replace(path, target)
            moved.append((target, str(error)))
    return moved


def read_cell(
    root: str | Path,
    shards: list[Shard],
    convert: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """All samples of a cell: ``(per_sample, per_shard)`` arrays, per-sample ones sorted by index.

    ``convert`` maps each shard's arrays as it is read (e.g. images to features, so that a large cell never sits in
    memory as images). ``MissingShardsError`` if a planned shard is missing; ``ValueError`` unless every planned index
    occurs exactly once.
    """
    missing = pending(root, shards)
    if missing:
        raise MissingShardsError(
            f"{len(missing)} of {len(shards)} shards of {shards[0].cell} are missing (first: {missing[0].path(root)})"
        )
    per_sample: dict[str, list[np.ndarray]] = {}
    per_shard: dict[str, list[np.ndarray]] = {}
    for shard in shards:
        arrays = read_shard(root, shard)
        for name, array in (convert(arrays) if convert is not None else arrays).items():
            (per_shard if array.ndim == 0 else per_sample).setdefault(name, []).append(array)
    samples = {name: np.concatenate(parts) for name, parts in per_sample.items()}
    order = np.argsort(samples[INDEX_KEY], kind="stable")
    samples = {name: array[order] for name, array in samples.items()}
    expected = np.arange(sum(shard.count for shard in shards))
    if not np.array_equal(samples[INDEX_KEY], expected):
        raise ValueError(f"cell {shards[0].cell}: indices are not exactly 0..{len(expected) - 1} once each")
    return samples, {name: np.stack(parts) for name, parts in per_shard.items()}
