"""Where a tensor's pieces are: read from the shard headers of the ranks that wrote it, lazily.

The manifest names, for each tensor, the ranks whose files hold its pieces; the pieces themselves
(boxes and chunk checksums) are in those files' headers. A loading rank asks for a box of a
tensor and reads headers only until the box is covered: at the same world size that is its own
files (FSDP shards) or the one rank that wrote a replicated tensor; after resharding, the ranks
whose share of dim 0 is nearest the box, then the others. What one rank reads therefore stays
flat as the job grows, where a single global index would grow with the number of ranks.
"""

from __future__ import annotations

import math
import threading

from ..format import manifest as M
from ..format.shard import Piece
from .reader import CheckpointReader


class PieceIndex:
    """Lazily built view of the pieces of one checkpoint (thread-safe)."""

    def __init__(self, reader: CheckpointReader, rank: int | None = None) -> None:
        self.reader = reader
        self.manifest = reader.manifest
        self.rank = rank  # this process's rank when the world size is the saving one
        self._pieces: dict[int, dict[str, list[Piece]]] = {}  # writer rank -> key -> pieces
        self._files: dict[int, list[str]] = {}  # writer rank -> its shard files
        for name in sorted(self.manifest.files):
            self._files.setdefault(self.manifest.files[name].rank, []).append(name)
        self._lock = threading.Lock()
        self.headers_read = 0

    def _load_rank(self, rank: int) -> dict[str, list[Piece]]:
        with self._lock:
            if rank in self._pieces:
                return self._pieces[rank]
        found: dict[str, list[Piece]] = {}
        files = self._files.get(rank, [])
        for name in files:
            header = self.reader.check_any(name)
            where = f"{self.reader.location.display}/{self.reader.step_dir}/{name}"
            for piece in header.pieces:
                M.meta_of_piece(self.manifest, piece, rank, where)
                found.setdefault(piece.key, []).append(piece)
        with self._lock:
            if rank not in self._pieces:  # another thread may have read this rank meanwhile
                self.headers_read += len(files)
            return self._pieces.setdefault(rank, found)

    def _order(self, meta: M.TensorMeta, offsets: tuple[int, ...]) -> list[int]:
        """The writers to try: this rank first, then by how near each one's share of dim 0
        (assuming an even split in rank order, as FSDP and DTensor ``Shard(0)`` make it) lies
        to the box."""
        writers = meta.writers
        if len(writers) == 1 or not meta.shape or not meta.shape[0]:
            return writers
        centre = (offsets[0] + 0.5) / meta.shape[0]

        def distance(i_w: tuple[int, int]) -> tuple[bool, float, int]:
            i, w = i_w
            return (w != self.rank, abs((i + 0.5) / len(writers) - centre), w)
        return [w for _, w in sorted(enumerate(writers), key=distance)]

    def meta_for(self, meta: M.TensorMeta, key: str, offsets: tuple[int, ...],
                 lengths: tuple[int, ...]) -> M.TensorMeta:
        """``meta`` with the pieces that tile the box ``offsets/lengths`` exactly (checked):
        ``IncompleteCheckpointError`` if its writers' files leave a gap, ``Corrupt...`` if two
        pieces overlap."""
        where = f"{self.reader.location.display}/{self.reader.step_dir}/{M.MANIFEST_NAME} " \
                f"tensor {key!r}"
        want = math.prod(lengths)
        pieces: list[Piece] = []
        covered = 0
        for writer in self._order(meta, offsets):
            for piece in self._load_rank(writer).get(key, ()):
                common = _overlap(piece, offsets, lengths)
                if common is not None or not want:
                    pieces.append(piece)
                    covered += common or 0
            if want and covered >= want:
                break
        found = M.TensorMeta(meta.dtype, meta.shape, tuple(pieces), meta.ranks)
        M.check_coverage(found, where, offsets, lengths)
        return found


def _overlap(piece: Piece, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> int | None:
    """Elements the piece shares with the box, or None if none."""
    n = 1
    for a, la, b, lb in zip(piece.offsets, piece.lengths, offsets, lengths):
        k = min(a + la, b + lb) - max(a, b)
        if k <= 0:
            return None
        n *= k
    return n


def full_manifest(reader: CheckpointReader) -> M.Manifest:
    """The reader's manifest with every tensor's pieces attached, from the headers of all its
    files (each from the first location holding a good copy), validated for exact coverage."""
    manifest = reader.manifest
    if manifest.indexed:
        return manifest
    headers = {name: reader.check_any(name).pieces for name in sorted(manifest.files)}
    full = M.attach_pieces(manifest, headers,
                           f"{reader.location.display}/{reader.step_dir}/{M.MANIFEST_NAME}")
    reader.manifest = full
    return full
