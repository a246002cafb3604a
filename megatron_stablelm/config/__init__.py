"""GPT-NeoX-compatible configuration: one place for every key, its checks and its derived values.

* :mod:`.loading`: read and merge YAML files, normalise key spellings, type-check each value;
* :mod:`.validation`: :func:`validate_config`, every check that is a pure function of the config;
* :mod:`.layout`: :func:`validate_layout`, the batch arithmetic at a world size (trainer and data);
* :mod:`.schema`: :class:`Config`, its keys with GPT-NeoX's defaults and every derived value;
* :mod:`.choices`: every list of allowed values; :mod:`.adam`: the ``optimizer`` block;
* :mod:`.neox_keys`: what happens to each GPT-NeoX key that is not a field (alias, ignored with the
  reason, or refused naming the missing feature).

All validation happens before any model, process group or data is touched.
"""

from megatron_stablelm.config.adam import AdamSettings, read_adam_block
from megatron_stablelm.config.choices import (
    ACTIVATIONS,
    ADAM_IMPLS,
    ADAM_TYPES,
    ARCHITECTURE_KEYS,
    ATTENTION_HEAD_TYPES,
    ATTENTION_TYPES,
    INIT_METHODS,
    LR_DECAY_STYLES,
    MLP_TYPES,
    NORMS,
    POS_EMBS,
    PRECISIONS,
    TOKENIZER_TYPES,
)
from megatron_stablelm.config.errors import ConfigError
from megatron_stablelm.config.layout import BatchLayout, validate_layout
from megatron_stablelm.config.loading import (
    FIELDS,
    IGNORED_KEYS,
    KNOWN_KEYS,
    config_from_dict,
    load_config,
    normalize_key,
    read_yaml,
)
from megatron_stablelm.config.neox_keys import ALIASES, REFUSED_KEYS
from megatron_stablelm.config.schema import Config, warmup_steps
from megatron_stablelm.config.validation import expand_attention_config, validate_config

__all__ = [
    "ACTIVATIONS",
    "ALIASES",
    "ADAM_IMPLS",
    "ADAM_TYPES",
    "ARCHITECTURE_KEYS",
    "ATTENTION_HEAD_TYPES",
    "ATTENTION_TYPES",
    "FIELDS",
    "IGNORED_KEYS",
    "INIT_METHODS",
    "KNOWN_KEYS",
    "LR_DECAY_STYLES",
    "MLP_TYPES",
    "NORMS",
    "POS_EMBS",
    "PRECISIONS",
    "REFUSED_KEYS",
    "TOKENIZER_TYPES",
    "AdamSettings",
    "BatchLayout",
    "Config",
    "ConfigError",
    "config_from_dict",
    "expand_attention_config",
    "load_config",
    "normalize_key",
    "read_adam_block",
    "read_yaml",
    "validate_config",
    "validate_layout",
    "warmup_steps",
]
