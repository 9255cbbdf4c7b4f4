"""scikit-learn's handwritten digits as token sequences for two tasks of one model.

Each 8x8 image has 17 gray levels (0..16), so its 64 pixels are 64 tokens.
Both tasks are next-token prediction over one vocabulary, Show-o style:

- ``t2i`` (generation): ``[BOS_T2I, label, p0 .. p63]``; the logits at
  positions 1..64 predict the pixels.
- ``mmu`` (understanding): ``[BOS_MMU, p0 .. p63, QUERY]``; the logits at the
  query position predict the label.

Both sequences are 66 tokens long with exactly 64 image tokens, so mixed
batches have one shape and every row of a task has the same capacity under
an image-only route mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

PIXEL_LEVELS = 17
NUM_CLASSES = 10
LABEL_OFFSET = PIXEL_LEVELS
BOS_T2I = LABEL_OFFSET + NUM_CLASSES
BOS_MMU = BOS_T2I + 1
QUERY = BOS_MMU + 1
VOCAB_SIZE = QUERY + 1
IMAGE_TOKENS = 64
SEQ_LEN = IMAGE_TOKENS + 2
TASKS = ("t2i", "mmu")
IGNORE = -100  # F.cross_entropy's default ignore_index

# Where the image tokens sit in each task's sequence.
IMAGE_START = {"t2i": 2, "mmu": 1}


@dataclass(frozen=True)
class Digits:
    """Flattened images ``(N, 64)`` with values in 0..16 and labels ``(N,)``, split into train and test."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """Token ids, next-token targets (``IGNORE`` where nothing is predicted), task names and route mask."""

    tokens: torch.Tensor
    targets: torch.Tensor
    tasks: list[str]
    route_mask: torch.Tensor


def load(seed: int, test_size: int = 297) -> Digits:
    """All 1797 digits, split into train and test by a permutation drawn from ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.reshape(len(bunch.images), IMAGE_TOKENS).astype(np.int64))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return Digits(images[train], labels[train], images[test], labels[test])


def sequences(task: str, images: torch.Tensor, labels: torch.Tensor) -> Batch:
    """One task's sequences for ``images`` (N, 64) and ``labels`` (N,)."""
    n = len(labels)
    tokens = torch.empty(n, SEQ_LEN, dtype=torch.long)
    targets = torch.full((n, SEQ_LEN), IGNORE, dtype=torch.long)
    start = IMAGE_START[task]
    tokens[:, start : start + IMAGE_TOKENS] = images
    if task == "t2i":
        tokens[:, 0] = BOS_T2I
        tokens[:, 1] = LABEL_OFFSET + labels
        targets[:, 1 : SEQ_LEN - 1] = tokens[:, 2:]
    elif task == "mmu":
        tokens[:, 0] = BOS_MMU
        tokens[:, -1] = QUERY
        targets[:, -1] = LABEL_OFFSET + labels
    else:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    route_mask = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
    route_mask[:, start : start + IMAGE_TOKENS] = True
    return Batch(tokens, targets, [task] * n, route_mask)


def concat(batches: list[Batch]) -> Batch:
    return Batch(
        torch.cat([b.tokens for b in batches]),
        torch.cat([b.targets for b in batches]),
        [t for b in batches for t in b.tasks],
        torch.cat([b.route_mask for b in batches]),
    )


def mixed_batches(digits: Digits, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless training batches, half ``t2i`` and half ``mmu`` in shuffled row order.

    Each task samples its own images, so a digit is not seen by both tasks
    in the same step. The same ``seed`` gives the same stream of batches.
    """
    if batch_size < 4 or batch_size % 2:
        # Each task group must keep more than one row: a size-1 group is a new call structure to capture.
        raise ValueError(f"batch_size must be even and >= 4, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    n = len(digits.train_labels)
    half = batch_size // 2
    while True:
        parts = []
        for task in TASKS:
            rows = torch.randint(0, n, (half,), generator=generator)
            parts.append(sequences(task, digits.train_images[rows], digits.train_labels[rows]))
        batch = concat(parts)
        order = torch.randperm(batch_size, generator=generator)
        yield Batch(batch.tokens[order], batch.targets[order], [batch.tasks[i] for i in order], batch.route_mask[order])
