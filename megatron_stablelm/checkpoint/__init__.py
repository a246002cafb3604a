"""Checkpoints: the one place that knows the on-disk format.

* :mod:`.layout`: file and directory names, format versions, finding a checkpoint (``latest``);
* :mod:`.atomic`: staged writing and atomic publication (every writer uses it);
* :mod:`.meta`: ``model_meta.json`` as one typed record (:class:`ModelMeta`);
* :mod:`.model_files`: model shards per TP rank under canonical names, merged and re-split on read;
* :mod:`.optimizer_files`: Adam state per canonical parameter;
* :mod:`.rng`: random generator states;
* :mod:`.training_state`: the trainer's collective save and its resume;
* :mod:`.reshard`: a checkpoint at another TP size; :mod:`.describe`: what a checkpoint holds.

``tools/`` are thin command-line wrappers over these functions.
"""

from megatron_stablelm.checkpoint.atomic import StagedDirectory, write_latest
from megatron_stablelm.checkpoint.layout import (
    CONFIG_FILE,
    LATEST_FILE,
    META_FILE,
    TRAIN_STATE_FILE,
    CheckpointError,
    has_checkpoint,
    iteration_dirname,
    iteration_of,
    resolve_checkpoint,
    shard_filename,
)
from megatron_stablelm.lazy import lazy_attributes

# The model-file functions need torch and safetensors (and the metadata record, served from there, the
# splits' ShardSpec); they load on first use (PEP 562), so that a command which only reports a bad
# path or a bad config does not pay for importing torch.
_MODEL_FILES = {
    "ModelMeta",
    "iter_canonical_tensors",
    "load_into_model",
    "read_canonical_state_dict",
    "read_config",
    "read_header",
    "read_meta",
    "save_canonical_model",
    "save_model",
    "write_model_files",
}

__getattr__ = lazy_attributes(__name__, "megatron_stablelm.checkpoint.model_files", _MODEL_FILES)


__all__ = [
    "CONFIG_FILE",
    "LATEST_FILE",
    "META_FILE",
    "TRAIN_STATE_FILE",
    "CheckpointError",
    "ModelMeta",
    "StagedDirectory",
    "has_checkpoint",
    "iter_canonical_tensors",
    "iteration_dirname",
    "iteration_of",
    "load_into_model",
    "read_canonical_state_dict",
    "read_config",
    "read_header",
    "read_meta",
    "resolve_checkpoint",
    "save_canonical_model",
    "save_model",
    "shard_filename",
    "write_latest",
    "write_model_files",
]
