"""megatron-core's index caches, checked before they are read and published whole.

Why: megatron-core's ``GPTDataset`` caches each source's document, sample and shuffle indexes as
``.npy`` files and reads them back with ``numpy.load(allow_pickle=True)``: a file in the cache
directory that holds a pickle instead of an array runs arbitrary code when training starts, and cache
directories often sit beside shared data. It also writes the files in place, so an interrupted build
leaves a truncated file that breaks every later run with an anonymous mmap error.

:class:`CheckedGPTDataset` is megatron-core's ``GPTDataset`` with only that handling replaced:

* **Reading.** Every file is checked from its ``.npy`` header alone (``numpy.lib.format``: magic,
  version, header): a plain integer dtype (never an object array), C order, the shape this dataset
  implies and a file size equal to what the header announces. The description file must be this
  dataset's description. Only then are the arrays opened, with ``allow_pickle=False`` (memory-mapped),
  so a warm start costs a few header reads.
* **A bad file.** In a *private* cache directory -- owned by this user and writable by nobody else,
  the file owned by this user too -- only this user's own interrupted runs can have left it: it is
  rebuilt (a warning names it). Anywhere else it may be someone else's: the run stops with a
  :class:`~megatron_stablelm.data.errors.DataError` naming the file and what is wrong, and nothing
  is removed. Point ``data_cache_dir`` at a private directory to get the first behaviour.
* **Writing.** The files are built (see *Epoch order*) and saved without pickle in a fresh staging
  directory inside the cache directory, then each is renamed into place (the description last): a
  reader sees whole files or none, and concurrent builders of the same cache (several jobs on one
  data set) cannot corrupt it.

:class:`CheckedBlendedDataset` does the same for megatron-core's ``BlendedDataset`` (its two blend
indexes), whose own cache needs a process group on every rank; a blend of ~10^9 samples costs minutes
and ~10 GB per rank to recompute at every start (``tools/simulate_startup.py``). ``build_datasets``
builds it like the per-source datasets: rank 0 computes and publishes, the others load after a barrier.

**Epoch order.** megatron-core shuffles the document index over *all* epochs at once and the sample
order over all samples, so a source repeated six times can serve one document twice before another
once (about a third of a 6-epoch source's first epoch-length of reads are repeats: 1 - (1 - 1/6)^6 of
its tokens are read in that window, the rest are repeats), and it draws everything from one generator,
so a source's build is one core's work (minutes for RefinedWeb at Stable LM 2 scale). We build the same
three arrays, with megatron-core's packing of documents into samples, but every epoch is its own
permutation of the source's documents and the samples are permuted within each epoch's block: the run
reads its source one epoch after another, no document repeats within an epoch (only the sample that
straddles two epochs mixes them), and each epoch has its own order. The permutations are drawn in
pieces that ``build_workers`` processes build in parallel (:mod:`megatron_stablelm.data.sample_order`).
``tests/test_mixture_epochs.py`` checks the order by brute force, ``tests/test_sample_order.py`` the
pieces against megatron-core's packing. The cache description carries ``sample_order``, so caches of
megatron-core's order (or of earlier versions of this code) are never mistaken for these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable

import numpy as np
import torch.distributed as dist
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset
from numpy.lib import format as npy_format

from megatron_stablelm.data.errors import DataError
from megatron_stablelm.data.indexed import private_directory
from megatron_stablelm.data.sample_order import DocumentRange, available_cores, build_blend, build_indices

__all__ = [
    "SAMPLE_ORDER",
    "CheckedBlendedDataset",
    "CheckedGPTDataset",
    "CacheFileError",
    "DocumentRange",
    "npy_header",
]

logger = logging.getLogger(__name__)

# megatron-core's file suffixes, in the order GPTDataset returns the arrays; the description last.
INDEX_SUFFIXES = ("document_index.npy", "sample_index.npy", "shuffle_index.npy")
DESCRIPTION_SUFFIX = "description.txt"
# megatron-core's BlendedDataset cache files, in the order its _build_indices returns them.
BLEND_SUFFIXES = ("dataset_index.npy", "dataset_sample_index.npy")
_MAX_DESCRIPTION_BYTES = 1 << 20
# Recorded in each cache description: the order the arrays encode (see the module docstring).
SAMPLE_ORDER = "epoch-blocked-v2"
# Recorded in each blend cache description: the blend's order (sample_order.build_blend).
BLEND_ORDER = "due-time-v1"


def build_workers() -> int:
    """Processes that build a missing index or blend: ``CheckedGPTDataset.build_workers``, or every
    core this process may run on."""
    return CheckedGPTDataset.build_workers or available_cores()


def _description_hash(description: str) -> str:
    """megatron-core's cache key of a dataset description (the file-name prefix of its cache)."""
    return hashlib.md5(description.encode("utf-8"), usedforsecurity=False).hexdigest()


class CacheFileError(Exception):
    """Why one cache file is unusable, as ``'PATH' reason`` (the dataset turns it into a rebuild or a
    ``DataError``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"'{path}' {reason}")


def npy_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape of the plain integer ``.npy`` array at ``path``, read from its header alone.

    Raises :class:`CacheFileError` saying what is wrong: not a regular file, not ``.npy`` (a pickle
    has no ``.npy`` magic), a header that does not parse, an object or non-integer dtype, Fortran
    order, or a size that differs from the header's (truncated or padded).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CacheFileError(path, "is not a regular file")
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
        except ValueError:
            raise CacheFileError(path, "is not a .npy array file (no .npy magic: a pickle?)") from None
        readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
        if version not in readers:
            raise CacheFileError(path, f"has unsupported .npy version {version}")
        try:
            shape, fortran_order, dtype = readers[version](f)
        except (ValueError, SyntaxError) as err:
            raise CacheFileError(path, f"has an unreadable .npy header ({err})") from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in "iu":
        raise CacheFileError(path, f"holds a {dtype} array, not integers (object arrays are pickles)")
    if fortran_order:
        raise CacheFileError(path, "holds a Fortran-ordered array")
    expected = offset + math.prod(shape) * dtype.itemsize
    if st.st_size != expected:
        raise CacheFileError(
            path, f"is truncated or padded: its header announces {expected} bytes, the file has {st.st_size}"
        )
    return dtype, tuple(shape)


def _check_shapes(shapes: dict[str, tuple[np.dtype, tuple[int, ...]]], documents: int, samples: int) -> None:
    """The shapes megatron-core's builder gives (``shapes`` by path, in :data:`INDEX_SUFFIXES` order):
    the document index a whole number of epochs of ``documents`` int32 entries; the sample index
    ``[n + 1, 2]`` with ``n >= samples``; one shuffle entry per sample."""
    (doc_path, (doc_dtype, doc)), (sample_path, (_, sample)), (shuffle_path, (_, shuffle)) = shapes.items()
    if doc_dtype != np.int32 or len(doc) != 1 or doc[0] == 0 or doc[0] % max(documents, 1):
        raise CacheFileError(doc_path, f"holds {doc_dtype} of shape {doc}, not epochs of {documents} int32")
    if len(sample) != 2 or sample[1] != 2 or sample[0] - 1 < samples:
        raise CacheFileError(sample_path, f"has shape {sample}, expected [>= {samples + 1}, 2]")
    if shuffle != (sample[0] - 1,):
        raise CacheFileError(shuffle_path, f"has shape {shuffle}, expected ({sample[0] - 1},)")


def _check_description(path: str, description: str) -> None:
    with open(path, "rb") as f:
        text = f.read(_MAX_DESCRIPTION_BYTES)
    if text != description.encode("utf-8"):
        raise CacheFileError(path, "does not describe this dataset")


def _private(directory: str, path: str) -> bool:
    """Whether only this user can have written ``path`` (see :func:`indexed.private_directory`)."""
    return private_directory(directory, path)


class CheckedGPTDataset(GPTDataset):
    """megatron-core's ``GPTDataset`` whose index cache is checked before it is read and written
    through a staging directory (see the module docstring). ``indices`` may be a
    :class:`DocumentRange`."""

    # Processes that build a missing index (train.py's rank 0 while the other ranks wait, or
    # tools/prepare_data_cache.py); None: every core this process may run on. The indexes do not
    # depend on it.
    build_workers: int | None = None

    def _get_num_tokens_per_epoch(self) -> int:
        """megatron-core's count (the tokens of ``indices``), as a slice sum for a range."""
        if isinstance(self.indices, DocumentRange):
            lengths = self.dataset.sequence_lengths[self.indices.begin : self.indices.end]
            return int(lengths.sum(dtype=np.int64))
        return super()._get_num_tokens_per_epoch()

    def _build_document_sample_shuffle_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._describe_sample_order()
        cache_dir = self.config.path_to_cache
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        paths, arrays = read_cache(
            cache_dir,
            base,
            INDEX_SUFFIXES,
            self.unique_description,
            lambda shapes: _check_shapes(shapes, len(self.indices), self.num_samples or 0),
        )
        return arrays if arrays is not None else self._build_staged(cache_dir, paths)

    def _describe_sample_order(self) -> None:
        """Add :data:`SAMPLE_ORDER` to megatron-core's identifiers (set by its constructor just
        before it asks for the indexes), so the cache file names and description differ from those of
        megatron-core's global-shuffle order."""
        if self.unique_identifiers.get("sample_order") == SAMPLE_ORDER:
            return
        self.unique_identifiers["sample_order"] = SAMPLE_ORDER
        self.unique_description = json.dumps(
            self.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers
        )
        self.unique_description_hash = _description_hash(self.unique_description)

    def _build_indices_epoch_ordered(self, staged: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three arrays in epoch order (see the module docstring), written as memory maps at
        ``staged``, sized as megatron-core sizes them: as many epochs as ``num_samples`` needs, its
        packing, its drop rule; built by ``build_workers`` processes."""
        from megatron.core.datasets.utils import Split

        num_epochs = self._get_num_epochs(self._get_num_tokens_per_epoch())
        drop_last = (
            self.config.drop_last_partial_validation_sequence if self.index_split == Split.valid else True
        )
        documents = self.indices
        if not isinstance(documents, DocumentRange):
            documents = np.asarray(documents, dtype=np.int32)
        return build_indices(
            documents,
            self.dataset.sequence_lengths,
            self.config.sequence_length,
            num_epochs,
            self.config.random_seed,
            drop_last_partial_sequence=drop_last,
            add_extra_token=self.config.add_extra_token_to_sequence,
            workers=build_workers(),
            paths=staged,
        )

    def _build_staged(self, cache_dir: str, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """megatron-core's build into a staging directory, then each file renamed into place."""
        if dist.is_initialized() and dist.get_rank() != 0:
            # megatron-core builds only on rank 0; the others come after a barrier and must find it.
            raise DataError(
                f"index cache file '{paths[0]}' is missing or unusable on rank {dist.get_rank()} after "
                f"rank 0 built it: data_cache_dir ('{cache_dir}') must be one directory every rank sees"
            )
        return publish_cache(cache_dir, paths, self._build_indices_epoch_ordered, self.unique_description)


def _handle_bad_cache(cache_dir: str, present: list[str], err: CacheFileError) -> None:
    """Rebuild in a private directory (return), else refuse (a ``DataError`` naming the file)."""
    if all(_private(cache_dir, p) for p in present):
        logger.warning("index cache file %s; rebuilding it", err)
        return
    raise DataError(
        f"index cache file {err}; it is left in place because '{cache_dir}' is not a private "
        f"directory of this user: delete it, or set data_cache_dir to a private directory"
    )


def read_cache(
    cache_dir: str,
    base: str,
    suffixes: tuple[str, ...],
    description: str,
    check_shapes: Callable[[dict[str, tuple[np.dtype, tuple[int, ...]]]], None],
) -> tuple[list[str], tuple[np.ndarray, ...] | None]:
    """The cache ``cache_dir/base-SUFFIX`` (arrays, then the description that marks it complete):
    ``(paths, arrays)``, the arrays memory-mapped when every file is there, its description is
    ``description`` and ``check_shapes`` accepts the ``.npy`` headers; ``(paths, None)`` when it must
    be built. A bad file is rebuilt in a private directory and refused (``DataError``) in a shared
    one. No file is unpickled."""
    paths = [os.path.join(cache_dir, f"{base}-{s}") for s in (*suffixes, DESCRIPTION_SUFFIX)]
    present = [p for p in paths if os.path.lexists(p)]
    try:
        shapes = {p: npy_header(p) for p in paths[:-1] if p in present}
        if paths[-1] in present:
            _check_description(paths[-1], description)
        if len(present) == len(paths):
            check_shapes(shapes)
            return paths, tuple(np.load(p, allow_pickle=False, mmap_mode="r") for p in paths[:-1])
    except CacheFileError as err:
        _handle_bad_cache(cache_dir, present, err)
    return paths, None


def publish_cache(
    cache_dir: str, paths: list[str], build: Callable[[list[str]], tuple], description: str
) -> tuple:
    """Build index arrays, write them (``paths[:-1]``, ``.npy``) and their description
    (``paths[-1]``) into a staging directory inside ``cache_dir``, then rename each into place, the
    description last: it marks a cache complete, so a reader never sees it beside partial arrays.

    ``build(staged)`` gets the arrays' paths inside the staging directory (created first, so an
    unwritable cache fails before the expensive work); an array it returns as a memory map of its
    staged path is already written, any other is saved there. Returns the arrays.
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=cache_dir)
    except OSError as err:
        raise DataError(
            f"cannot write the index cache in '{cache_dir}': {err.strerror or err} "
            f"(set data_cache_dir to a writable directory)"
        ) from None
    try:
        staged = [os.path.join(staging, os.path.basename(p)) for p in paths]
        arrays = build(staged[:-1])
        for path, array in zip(staged, arrays):
            if not (isinstance(array, np.memmap) and os.path.abspath(array.filename or "") == path):
                np.save(path, array, allow_pickle=False)
        with open(staged[-1], "w", encoding="utf-8") as f:
            f.write(description)
        for path, target in zip(staged, paths):
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return arrays


class CheckedBlendedDataset(BlendedDataset):
    """megatron-core's ``BlendedDataset`` with its two indexes built in parallel pieces (in order of
    due time, :func:`~megatron_stablelm.data.sample_order.build_blend`, instead of its one-core
    greedy loop) and cached the way :class:`CheckedGPTDataset` caches its three: checked from the
    ``.npy`` headers, read without pickle and memory-mapped, published through a staging directory.

    Why: without a cache every rank recomputes the blend at every start. That is milliseconds for a
    million samples but linear in them: about 10^9 samples for Stable LM 2's ~4T tokens at seq 4096,
    a minute of one core's work plus a sort (megatron-core's oversampling check uses ``numpy.unique``) and
    ~10 GB of memory on every rank of every node (``tools/simulate_startup.py`` measures it).
    With ``config.path_to_cache`` set, rank 0 (or a single process) computes and publishes it;
    ``build_datasets`` makes the other ranks wait at a barrier and then load it (page cache shared
    on a node, instead of ~10 GB computed per rank). A rank that still finds no usable cache (rank 0
    could not publish, or a directory not shared between nodes) computes the same deterministic
    arrays in memory rather than failing. Concurrent publishers (several jobs on one cache) are
    safe: each file is renamed into place whole, and every publication of one description holds the
    same arrays. Without a cache directory it computes the blend at every start, as megatron-core's
    does with none. Only sized blends (``size`` given) are ours; unsized ones are megatron-core's.
    """

    def _build_indices(self) -> tuple[np.ndarray, np.ndarray]:
        if self.size is None:
            return super()._build_indices()
        self._describe_blend_order()
        cache_dir = self.config.path_to_cache
        if not cache_dir:
            return self._compute_blend(None, build_workers())
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}"
        paths, cached = read_cache(
            cache_dir, base, BLEND_SUFFIXES, self.unique_description, self._check_shapes
        )
        if cached is not None:
            return cached
        if dist.is_initialized() and dist.get_rank() != 0:
            return self._compute_blend(None, 1)  # rank 0 could not publish: the same arrays, here
        workers = build_workers()
        return publish_cache(
            cache_dir, paths, lambda staged: self._compute_blend(staged, workers), self.unique_description
        )

    def _describe_blend_order(self) -> None:
        """Add :data:`BLEND_ORDER` to megatron-core's identifiers (set by its constructor just before
        it asks for the indexes): the cache names and description differ from its greedy blend's."""
        identifiers = json.loads(self.unique_description)
        if identifiers.get("blend_order") == BLEND_ORDER:
            return
        identifiers["blend_order"] = BLEND_ORDER
        self.unique_description = json.dumps(identifiers, indent=4)
        self.unique_description_hash = _description_hash(self.unique_description)

    def _check_shapes(self, shapes: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        """One dataset id (int16) and one sample id (int64) per sample of the blend."""
        for (path, (dtype, shape)), want in zip(shapes.items(), (np.int16, np.int64)):
            if dtype != want or shape != (self.size,):
                raise CacheFileError(
                    path, f"holds {dtype} of shape {shape}, not ({self.size},) {np.dtype(want)}"
                )

    def _compute_blend(self, staged: list[str] | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """The blend in due-time order (:func:`~megatron_stablelm.data.sample_order.build_blend`,
        ``workers`` processes, memory maps at ``staged`` when given), and megatron-core's check that
        no source is asked for more samples than it holds (from the end of the order: megatron-core
        sorts all of it)."""
        dataset_index, dataset_sample_index = build_blend(
            self.weights, self.size, workers=workers, paths=staged
        )
        drawn = blend_counts(dataset_index, dataset_sample_index, len(self.datasets))
        for i, (ds, n) in enumerate(zip(self.datasets, drawn)):
            if len(ds) < n:
                raise DataError(
                    f"the {self.split.name} blend draws {n} samples from source {i} "
                    f"('{ds.dataset_path}'), which holds {len(ds)}"
                )
        return dataset_index, dataset_sample_index


def blend_counts(dataset_index: np.ndarray, dataset_sample_index: np.ndarray, sources: int) -> np.ndarray:
    """How many samples a blend draws from each source, read from the end of the order.

    Why: a blend numbers each source's samples in order (``dataset_sample_index``), so a source's
    count is its last sample's number + 1, and every source of weight w appears within the last
    ~1/w samples (megatron-core's greedy blend and ours alike). Reading blocks from the end until
    every source is found (or the start is reached: a source never drawn has 0) costs a few blocks,
    where counting the whole order costs ~25 s and an 8 GB temporary at 10^9 samples.
    """
    counts = np.zeros(sources, dtype=np.int64)
    found = np.zeros(sources, dtype=bool)
    end, block = len(dataset_index), 1 << 16
    while end > 0 and not found.all():
        begin = max(0, end - block)
        ids = np.asarray(dataset_index[begin:end])[::-1]
        present, first = np.unique(ids, return_index=True)  # first in reverse = last in order
        for source, at in zip(present.tolist(), first.tolist()):
            if not found[source]:
                found[source] = True
                counts[source] = int(dataset_sample_index[end - 1 - at]) + 1
        end, block = begin, block * 2
    return counts
