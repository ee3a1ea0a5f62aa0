"""J-stage selection and P-patch mean pooling of hidden states (design section 4), in plain numpy.

Every backend pools the same way because every backend takes its pooling from here: the torch and
ONNX backends multiply their hidden states by `pooling_matrix` where the states are made (inside torch,
inside the ONNX graph), and `pool_stages` is the direct numpy definition the tests compare them with.

Exact definition, for a model of L transformer blocks and a sequence of n tokens:

- Hidden state index i (0 <= i <= L) is what transformers returns as `hidden_states[i]` with
  `output_hidden_states=True`: 0 is the token embeddings, i is the output of block i, and L is the
  output of the last block *after* the final norm (the input of the LM head; the same vector
  llama.cpp calls the output embedding).
- Stage j (0 <= j < J) ends layer group j of J evenly spaced groups: `stage_layers(L, J)[j] =
  floor((j + 1) * L / J)`; the group holds the blocks after the previous stage's index up to it. The
  last stage is always index L. J may exceed L (a round's J is set for the whole federation): then
  some groups hold no block, and only the L stages of `filled_stages` end a group of their own, each
  at a different block; packets carry features for those stages only.
- Patch p (0 <= p < P) of a sequence of n tokens covers tokens [start_p, end_p) with
  `start_p = floor(p * n / P)` and `end_p = max(floor((p + 1) * n / P), start_p + 1)`: the P patches
  are equal and disjoint when P divides n, differ by at most one token otherwise, and when n < P a
  token is repeated in adjacent patches so that no patch is empty.
- A patch's feature is the float32 mean of its tokens' hidden states, `[J, P, width]` per sequence;
  the packet carries it as int8 in blocks of 32 with a float16 scale each.
"""

from __future__ import annotations

import numpy as np

__all__ = ["filled_stages", "patch_bounds", "pool_stages", "pooling_matrix", "stage_layers"]


def stage_layers(num_layers: int, stages: int) -> tuple[int, ...]:
    """Hidden-state indices (into the L + 1 `hidden_states`) at the ends of J even layer groups."""
    if stages < 1 or num_layers < 1:
        raise ValueError(f"J={stages} stages of a model of {num_layers} layers: both must be >= 1")
    return tuple((j + 1) * num_layers // stages for j in range(stages))


def filled_stages(num_layers: int, stages: int) -> tuple[int, ...]:
    """The stages whose layer group holds at least one block: all J when J <= L, else L of them."""
    ends = (0, *stage_layers(num_layers, stages))
    return tuple(j for j in range(stages) if ends[j + 1] > ends[j])


def patch_bounds(length: int, patches: int) -> np.ndarray:
    """[P, 2] start/end (exclusive) of each patch of a sequence of `length` tokens (see module doc)."""
    if length < 1 or patches < 1:
        raise ValueError(f"need length >= 1 and P >= 1, got length={length}, P={patches}")
    p = np.arange(patches, dtype=np.int64)
    starts = p * length // patches
    ends = np.maximum((p + 1) * length // patches, starts + 1)
    return np.stack([starts, ends], axis=1)


def pooling_matrix(lengths: np.ndarray | list[int], patches: int, width: int | None = None) -> np.ndarray:
    """[B, P, T] float32 weights with `features[b] = matrix[b] @ hidden[b]` for each stage.

    Row p of sequence b holds 1/len(patch) on the tokens of patch p and 0 elsewhere, including the
    padding beyond `lengths[b]`. T is `width` (the padded batch length) or the longest length.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.max()) if width is None else width
    matrix = np.zeros((len(lengths), patches, total), dtype=np.float32)
    for b, n in enumerate(lengths):
        for p, (start, end) in enumerate(patch_bounds(int(n), patches)):
            matrix[b, p, start:end] = 1.0 / (end - start)
    return matrix


def pool_stages(hidden: np.ndarray, patches: int) -> np.ndarray:
    """[J, P, W] float32 patch means of one sequence's stage hidden states `hidden` [J, n, W]."""
    bounds = patch_bounds(hidden.shape[1], patches)
    states = hidden.astype(np.float32, copy=False)
    return np.stack([states[:, start:end].mean(axis=1) for start, end in bounds], axis=1)
