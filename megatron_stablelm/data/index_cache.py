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
its tokens are read in that window, the rest are repeats). We build the same three arrays with the
same C++ sample-index helper, but shuffle the documents within each epoch (every epoch is a fresh
permutation of the source's documents, as megatron-core already does for a short final epoch) and
the samples within each epoch's block of samples: the run reads its source one epoch after another,
no document repeats within an epoch (only the sample that straddles two epochs mixes them), and each
epoch has its own order. A source read for one epoch gets exactly megatron-core's arrays (same
generator, same draws). ``tests/test_mixture_epochs.py`` checks it by brute force over the sample
order. The cache description carries ``sample_order``, so caches of megatron-core's order (or of
earlier versions of this code) are never mistaken for these.
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

__all__ = [
    "SAMPLE_ORDER",
    "CheckedBlendedDataset",
    "CheckedGPTDataset",
    "CacheFileError",
    "DocumentRange",
    "epoch_ordered_indices",
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
SAMPLE_ORDER = "epoch-blocked-v1"


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


class DocumentRange:
    """The sequences ``[begin, end)`` of a shard, as a ``GPTDataset``'s ``indices``, never
    materialised unless an index is built.

    Why: megatron-core takes the sequences of a source as an array; at Stable LM 2 scale that is
    ~2.5 x 10^9 int32 (10 GB and seconds per rank) made at every start only to be measured when the
    caches are warm. ``len``, ``size`` and ``numpy.asarray`` (the array, made on demand) are what
    :class:`CheckedGPTDataset` and the tests read.
    """

    def __init__(self, begin: int, end: int) -> None:
        self.begin, self.end = int(begin), int(end)

    def __len__(self) -> int:
        return self.end - self.begin

    @property
    def size(self) -> int:
        return len(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.arange(self.begin, self.end, dtype=dtype or np.int32)


class CheckedGPTDataset(GPTDataset):
    """megatron-core's ``GPTDataset`` whose index cache is checked before it is read and written
    through a staging directory (see the module docstring). ``indices`` may be a
    :class:`DocumentRange`."""

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
        self.unique_description_hash = hashlib.md5(
            self.unique_description.encode("utf-8"), usedforsecurity=False
        ).hexdigest()

    def _build_indices_epoch_ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three arrays in epoch order (see the module docstring), sized as megatron-core sizes
        them: as many epochs as ``num_samples`` needs, its sample-index helper, its drop rule."""
        from megatron.core.datasets.utils import Split

        tokens_per_epoch = self._get_num_tokens_per_epoch()
        num_epochs = self._get_num_epochs(tokens_per_epoch)
        drop_last = (
            self.config.drop_last_partial_validation_sequence if self.index_split == Split.valid else True
        )
        return epoch_ordered_indices(
            np.asarray(self.indices, dtype=np.int32),
            self.dataset.sequence_lengths,
            self.config.sequence_length,
            num_epochs,
            tokens_per_epoch,
            self.config.random_seed,
            drop_last_partial_sequence=drop_last,
            add_extra_token=self.config.add_extra_token_to_sequence,
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


def publish_cache(cache_dir: str, paths: list[str], build: Callable[[], tuple], description: str) -> tuple:
    """Build index arrays (``build()``; after the staging directory exists, so an unwritable cache
    fails before the expensive work), write them (``paths[:-1]``, ``.npy``) and their description
    (``paths[-1]``) into a staging directory inside ``cache_dir``, then rename each into place, the
    description last: it marks a cache complete, so a reader never sees it beside partial arrays.
    Returns the arrays."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=cache_dir)
    except OSError as err:
        raise DataError(
            f"cannot write the index cache in '{cache_dir}': {err.strerror or err} "
            f"(set data_cache_dir to a writable directory)"
        ) from None
    try:
        arrays = build()
        for path, array in zip(paths, arrays):
            np.save(os.path.join(staging, os.path.basename(path)), array, allow_pickle=False)
        with open(os.path.join(staging, os.path.basename(paths[-1])), "w", encoding="utf-8") as f:
            f.write(description)
        for path in paths:
            os.replace(os.path.join(staging, os.path.basename(path)), path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return arrays


def epoch_ordered_indices(
    documents: np.ndarray,
    sequence_lengths: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    seed: int,
    *,
    drop_last_partial_sequence: bool = True,
    add_extra_token: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """megatron-core's document, sample and shuffle indexes with the shuffles kept inside epochs.

    Why: its global shuffles repeat documents within an epoch of a many-times repeated source. Here
    the document index is ``num_epochs`` independent permutations of ``documents`` back to back; the
    sample index comes from megatron-core's C++ helper over it (unchanged packing); the shuffle index
    permutes the samples that *start* in each epoch among themselves, epoch after epoch. One
    ``RandomState(seed)`` draws everything in megatron-core's order of draws, so the arrays are a pure
    function of the arguments and, for a single epoch, identical to megatron-core's.
    """
    from megatron.core.datasets import helpers

    # megatron-core's generator and draw order: a source read for one epoch gets exactly its arrays.
    rng = np.random.RandomState(seed)
    n_docs = int(documents.size)
    document_index = np.empty(num_epochs * n_docs, dtype=np.int32)
    for epoch in range(num_epochs):
        block = document_index[epoch * n_docs : (epoch + 1) * n_docs]
        block[:] = documents
        rng.shuffle(block)
    lengths = sequence_lengths
    if lengths.dtype != np.int32:
        lengths = lengths.astype(np.int32)
    elif len(document_index) * 2 > len(lengths):  # dense access: one sequential read (megatron's rule)
        lengths = np.array(lengths)
    sample_index = helpers.build_sample_idx(
        lengths,
        document_index,
        seq_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        add_extra_token,
    )
    num_samples = sample_index.shape[0] - 1
    dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_index = np.arange(num_samples, dtype=dtype)
    # The epoch each sample starts in; sample starts only move forward, so epochs are contiguous.
    starts = sample_index[:num_samples, 0] // max(n_docs, 1)
    bounds = np.searchsorted(starts, np.arange(num_epochs + 1), side="left")
    for epoch in range(num_epochs):
        rng.shuffle(shuffle_index[bounds[epoch] : bounds[epoch + 1]])
    return document_index, sample_index, shuffle_index


class CheckedBlendedDataset(BlendedDataset):
    """megatron-core's ``BlendedDataset`` with its two indexes cached the way
    :class:`CheckedGPTDataset` caches its three: checked from the ``.npy`` headers, read without
    pickle and memory-mapped, published through a staging directory.

    Why: without a cache every rank recomputes the blend at every start. That is milliseconds for a
    million samples but linear in them: about 10^9 samples for Stable LM 2's ~4T tokens at seq 4096,
    minutes of C++ plus a sort (megatron-core's oversampling check uses ``numpy.unique``) and
    ~10 GB of memory on every rank of every node (``tools/simulate_startup.py`` measures it).
    With ``config.path_to_cache`` set, rank 0 (or a single process) computes and publishes it;
    ``build_datasets`` makes the other ranks wait at a barrier and then load it (page cache shared
    on a node, instead of ~10 GB computed per rank). A rank that still finds no usable cache (rank 0
    could not publish, or a directory not shared between nodes) computes the same deterministic
    arrays in memory rather than failing. Concurrent publishers (several jobs on one cache) are
    safe: each file is renamed into place whole, and every publication of one description holds the
    same arrays. Without a cache directory it behaves as megatron-core's with none. Only sized
    blends (``size`` given) are cached.
    """

    def _build_indices(self) -> tuple[np.ndarray, np.ndarray]:
        cache_dir = self.config.path_to_cache
        if not cache_dir or self.size is None:
            return self._compute_blend() if self.size is not None else super()._build_indices()
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}"
        paths, cached = read_cache(
            cache_dir, base, BLEND_SUFFIXES, self.unique_description, self._check_shapes
        )
        if cached is not None:
            return cached
        arrays = self._compute_blend()
        if not dist.is_initialized() or dist.get_rank() == 0:
            publish_cache(cache_dir, paths, lambda: arrays, self.unique_description)
        return arrays

    def _check_shapes(self, shapes: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        """One dataset id (int16) and one sample id (int64) per sample of the blend."""
        for (path, (dtype, shape)), want in zip(shapes.items(), (np.int16, np.int64)):
            if dtype != want or shape != (self.size,):
                raise CacheFileError(
                    path, f"holds {dtype} of shape {shape}, not ({self.size},) {np.dtype(want)}"
                )

    def _compute_blend(self) -> tuple[np.ndarray, np.ndarray]:
        """megatron-core's blending helper, and its check that no source is asked for more samples
        than it holds (with ``bincount``: linear, where megatron-core sorts)."""
        from megatron.core.datasets import helpers

        dataset_index = np.zeros(self.size, dtype=np.int16)
        dataset_sample_index = np.zeros(self.size, dtype=np.int64)
        helpers.build_blending_indices(
            dataset_index, dataset_sample_index, self.weights, len(self.datasets), self.size, False
        )
        drawn = np.bincount(dataset_index, minlength=len(self.datasets))
        for i, (ds, n) in enumerate(zip(self.datasets, drawn)):
            if len(ds) < n:
                raise DataError(
                    f"the {self.split.name} blend draws {n} samples from source {i} "
                    f"('{ds.dataset_path}'), which holds {len(ds)}"
                )
        return dataset_index, dataset_sample_index
