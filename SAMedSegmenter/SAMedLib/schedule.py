"""SAMed's learning-rate schedule: linear warm-up, then polynomial decay to zero."""
from __future__ import annotations

__all__ = ["learning_rate"]


def learning_rate(iteration: int, base_lr: float, total: int, warmup: int, power: float = 0.9) -> float:
    """Learning rate for 0-based ``iteration`` of ``total``.

    Warm-up: base_lr * (iteration + 1) / warmup. Then base_lr * (1 - progress) ** power, where progress
    runs from 0 at the end of warm-up to 1 at ``total``.
    """
    if total < 1 or not 0 <= warmup < total:
        raise ValueError(f"need 0 <= warmup < total, got warmup={warmup}, total={total}")
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    progress = (iteration - warmup) / (total - warmup)
    return base_lr * max(0.0, 1.0 - progress) ** power
