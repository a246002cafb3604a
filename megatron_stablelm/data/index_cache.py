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
* **Writing.** megatron-core builds the files in a fresh staging directory inside the cache directory,
  then each is renamed into place (the description last): a reader sees whole files or none, and
  concurrent builders of the same cache (several jobs on one data set) cannot corrupt it.

megatron-core's blended-dataset cache is never used (``build_datasets`` gives ``BlendedDataset`` no
cache directory), so these three arrays and the description are all it would load.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import stat
import tempfile

import numpy as np
import torch.distributed as dist
from megatron.core.datasets.gpt_dataset import GPTDataset
from numpy.lib import format as npy_format

from megatron_stablelm.data.errors import DataError

__all__ = ["CheckedGPTDataset", "CacheFileError", "npy_header"]

logger = logging.getLogger(__name__)

# megatron-core's file suffixes, in the order GPTDataset returns the arrays; the description last.
INDEX_SUFFIXES = ("document_index.npy", "sample_index.npy", "shuffle_index.npy")
DESCRIPTION_SUFFIX = "description.txt"
_MAX_DESCRIPTION_BYTES = 1 << 20


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


def _private(directory: str, path: str) -> bool:
    """Whether only this user can have written ``path``: it and ``directory`` are this user's and the
    directory is not writable by group or others."""
    uid = os.geteuid()
    dir_st, file_st = os.stat(directory), os.lstat(path)
    return dir_st.st_uid == uid and not dir_st.st_mode & 0o022 and file_st.st_uid == uid


class CheckedGPTDataset(GPTDataset):
    """megatron-core's ``GPTDataset`` whose index cache is checked before it is read and written
    through a staging directory (see the module docstring)."""

    def _build_document_sample_shuffle_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cache_dir = self.config.path_to_cache
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        paths = [os.path.join(cache_dir, f"{base}-{s}") for s in (*INDEX_SUFFIXES, DESCRIPTION_SUFFIX)]
        present = [p for p in paths if os.path.lexists(p)]
        try:
            shapes = {p: npy_header(p) for p in paths[:-1] if p in present}
            if paths[-1] in present:
                self._check_description(paths[-1])
            if len(present) == len(paths):
                _check_shapes(shapes, len(self.indices), self.num_samples or 0)
                return tuple(np.load(p, allow_pickle=False, mmap_mode="r") for p in paths[:-1])
        except CacheFileError as err:
            self._handle_bad_cache(cache_dir, present, err)
        return self._build_staged(cache_dir, paths)

    def _check_description(self, path: str) -> None:
        with open(path, "rb") as f:
            text = f.read(_MAX_DESCRIPTION_BYTES)
        if text != self.unique_description.encode("utf-8"):
            raise CacheFileError(path, "does not describe this dataset")

    @staticmethod
    def _handle_bad_cache(cache_dir: str, present: list[str], err: CacheFileError) -> None:
        """Rebuild in a private directory (return), else refuse (a ``DataError`` naming the file)."""
        if all(_private(cache_dir, p) for p in present):
            logger.warning("index cache file %s; rebuilding it", err)
            return
        raise DataError(
            f"index cache file {err}; it is left in place because '{cache_dir}' is not a private "
            f"directory of this user: delete it, or set data_cache_dir to a private directory"
        )

    def _build_staged(self, cache_dir: str, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """megatron-core's build into a staging directory, then each file renamed into place."""
        if dist.is_initialized() and dist.get_rank() != 0:
            # megatron-core builds only on rank 0; the others come after a barrier and must find it.
            raise DataError(
                f"index cache file '{paths[0]}' is missing or unusable on rank {dist.get_rank()} after "
                f"rank 0 built it: data_cache_dir ('{cache_dir}') must be one directory every rank sees"
            )
        try:
            os.makedirs(cache_dir, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".staging-", dir=cache_dir)
        except OSError as err:
            raise DataError(
                f"cannot write the index cache in '{cache_dir}': {err.strerror or err} "
                f"(set data_cache_dir to a writable directory)"
            ) from None
        original = self.config
        self.config = copy.copy(original)
        self.config.path_to_cache = staging
        try:
            arrays = super()._build_document_sample_shuffle_indices()
            for path in paths:  # the description last: it marks a complete cache
                os.replace(os.path.join(staging, os.path.basename(path)), path)
        finally:
            self.config = original
            shutil.rmtree(staging, ignore_errors=True)
        return arrays
