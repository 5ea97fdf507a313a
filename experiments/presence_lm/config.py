"""The grid's settings: noise kinds, schedules, seeds and :class:`LMConfig`."""

from __future__ import annotations

from dataclasses import dataclass


NOISE_KINDS = ("jumbled", "code", "duplicates")
SCHEDULES = ("two_stage", "negative", "positive")
CORPUS_SEED = 4321
SCORER_SEED = 300


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 1000
    seq_len: int = 32
    width: int = 64
    heads: int = 2
    blocks: int = 1
    ffn: int = 128
    n_train: int = 2000
    batch_size: int = 32
    steps: int = 300
    lr: float = 2e-3
    num_microbatches: int = 4
    switch: float = 0.3
    si_layers: tuple = ("tok_emb",)
    relative_eps: bool = True
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    seeds: tuple = (0, 1, 2)
    fractions: tuple = (0.1, 0.3)
    kinds: tuple = NOISE_KINDS
    schedules: tuple = SCHEDULES
    keeps: tuple = (0.7, 0.9)
    batching: str = "shuffled"
    corner_steps: int = 1000
    corner_seeds: tuple = (0, 1, 2, 3)
    quick: bool = False

    @classmethod
    def quick_config(cls):
        return cls(n_train=128, steps=4, seeds=(0,), fractions=(0.3,), kinds=("jumbled",), schedules=("two_stage",),
                   keeps=(0.7,), finetune_steps=4, quick=True)


EARLY = (20, 120)
