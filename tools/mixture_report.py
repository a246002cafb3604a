"""Print the training data mixture of a config: per source its tokens, share of the data, weight
(share of training), planned tokens and epochs.

    python tools/mixture_report.py configs/stablelm-2-1_6b.yml configs/data/stablelm-2-1_6b.yml \
        [--dp-size 512] [--data-root DIR] [--override k=v ...]

Every missing shard is listed first, all at once, each with the ``tools/preprocess_data.py`` recipe
command that makes it (and the tool exits 2). Only the shards' ``.idx`` files are read (no index is
built). ``--dp-size`` defaults to what
``train_batch_size`` implies (else 1); a source above ``mixture_epochs_warning`` epochs is flagged.
``--data-root DIR`` resolves the config's relative shard prefixes (``data/<source>/<subset>`` in
``configs/data/``) against DIR instead of the working directory.
Bad input (config, missing or malformed shard) prints one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args, positive_int
from megatron_stablelm.config import ConfigError, load_config
from megatron_stablelm.data import DataError, ShardError, mixture_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--dp-size", type=positive_int, default=None)
    p.add_argument("--data-root", default=None, help="resolve relative shard prefixes against this directory")
    args = parse_config_args(p, argv)
    try:
        cfg = load_config(args.configs, overrides_from(args), report_ignored=False)
        from megatron_stablelm.data.mixture import planned_dp_size, with_data_root

        if args.data_root is not None:
            cfg = with_data_root(cfg, args.data_root)
        from megatron_stablelm.data.recipes import check_shards_present

        check_shards_present(cfg)
        dp = planned_dp_size(cfg, args.dp_size)
        print(mixture_report(cfg, dp_size=dp))
    except (ConfigError, DataError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
