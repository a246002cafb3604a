"""Training: DeepSpeed engine over the megatron-core model, schedules, checkpoints, the loop.

Entry points: :class:`megatron_stablelm.training.loop.Trainer` / :func:`megatron_stablelm.training.loop.run`
(and ``train.py`` at the repository root).
"""
