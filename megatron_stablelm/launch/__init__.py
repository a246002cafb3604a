"""Launching ``train.py`` on one machine, over ssh/MPI or inside SLURM: ``python -m megatron_stablelm.launch``.

Why a package: the launch settings are config keys like any other, so the launcher is part of the
project and imports :mod:`megatron_stablelm.config` directly. Modules: ``hostfile`` (SLURM node
lists, DeepSpeed hostfiles, include/exclude), ``request`` (the launcher-independent resolution:
GPUs, job directory, environment), one module per launcher (``deepspeed_runner``, ``slurm``,
``torchrun``) building its command, ``plan`` (the launcher table, ``build_plan``), ``job`` (job
directory and running the command) and ``__main__`` (the command line). Nothing is imported here,
so ``python -m megatron_stablelm.launch.hostfile`` runs without loading the rest.
"""
