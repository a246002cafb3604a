"""Launch tooling: SLURM node lists → DeepSpeed hostfiles, and the deepspeed/torchrun front-end.

A package so tests and ``python -m launch.launch`` can import it from the repository root; the files
also run as plain scripts (``python launch/launch.py``), which is how the sbatch template calls them.
"""
