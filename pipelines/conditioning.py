"""Per-branch conditioning for the one batched forward.

A pipeline describes each branch (``cond``, ``uncond``) by the keyword arguments its network takes, batch-first for
the B samples, and optionally a *label set*: keyword tensors with one row per label that replace the ``cond``
branch's entries of the same name in labelled reference branches (``ref``, GFCG): the class ids of a
class-conditional model, or the text embeddings (and pooled embeddings) of label prompts. Everything else a labelled
row needs (SDXL's time ids, ControlNet residuals) is the ``cond`` row's own.

:meth:`BranchConditioning.gather` concatenates the rows of the requested branches in request order, so one network
call serves all of them. Keyword trees are gathered leaf by leaf: dicts (SDXL's ``added_cond_kwargs``), lists and
tuples (ControlNet's residuals), tensors (indexed by row), and :class:`Shared` leaves that every row shares (a scalar
timestep, ``cross_attention_kwargs``), which are passed to the network as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guidance.base import Branch

Kwargs = Mapping[str, Any]


@dataclass(frozen=True)
class Shared:
    """A keyword value every row shares (not batch-first): passed to the network unchanged."""

    value: Any


def batch_tree(tree: Any, rows: int, shared_names: Sequence[str] = ()) -> Any:
    """``tree`` with every leaf that is not a batch-first tensor of ``rows`` rows wrapped in :class:`Shared`.

    ``shared_names`` are top-level keys that are never batch-first whatever their shape (Flux's 2-D ``img_ids`` and
    ``txt_ids``, whose first dim is a sequence length).
    """
    if isinstance(tree, Mapping):
        return {
            key: Shared(value) if key in shared_names else batch_tree(value, rows) for key, value in tree.items()
        }
    if isinstance(tree, (list, tuple)) and tree and all(isinstance(v, torch.Tensor) for v in tree):
        return type(tree)(batch_tree(value, rows) for value in tree)
    if isinstance(tree, torch.Tensor) and tree.ndim > 0 and tree.shape[0] == rows:
        return tree
    return Shared(tree)


def take(tree: Any, index: torch.Tensor | slice) -> Any:
    """The rows ``index`` (indices, or a slice: views, no copy) of every batch-first leaf of ``tree`` (shared
    leaves unchanged)."""
    if isinstance(tree, Mapping):
        return {key: take(value, index) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(take(value, index) for value in tree)
    if isinstance(tree, Shared):
        return tree
    return tree[index if isinstance(index, slice) else index.to(tree.device)]


def overlay(base: Any, overrides: Any) -> Any:
    """``base`` with the leaves of ``overrides`` put in place (dicts merged key by key)."""
    if isinstance(base, Mapping) and isinstance(overrides, Mapping):
        return {**base, **{key: overlay(base.get(key), value) for key, value in overrides.items()}}
    return overrides


def unwrap(tree: Any) -> Any:
    """``tree`` with its shared leaves unwrapped (no copy)."""
    if isinstance(tree, Mapping):
        return {key: unwrap(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(unwrap(value) for value in tree)
    return tree.value if isinstance(tree, Shared) else tree


def concat(trees: Sequence[Any]) -> Any:
    """Row-wise concatenation of keyword trees of the same structure; shared leaves are unwrapped."""
    if len(trees) == 1:
        return unwrap(trees[0])
    first = trees[0]
    if isinstance(first, Mapping):
        return {key: concat([tree[key] for tree in trees]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat([tree[i] for tree in trees]) for i in range(len(first)))
    if isinstance(first, Shared):
        return first.value
    return torch.cat(list(trees))


def tree_rows(tree: Any) -> int:
    """The row count of the first batch-first leaf of ``tree``."""
    leaf: Any = tree
    while isinstance(leaf, (Mapping, list, tuple)):
        leaf = next(iter(leaf.values())) if isinstance(leaf, Mapping) else leaf[0]
    return int(leaf.shape[0])


class BranchConditioning:
    """Network keyword arguments per branch (see the module docstring).

    Args:
        branches: branch name -> keyword tree with B rows in each batch-first leaf.
        label_set: keyword tensors with one row per label, overlaid on the ``cond`` rows of labelled branches;
            ``None`` if the pipeline has none.
        target_labels: the label id of each sample's own condition (class-conditional, or a text-to-image label set).
    """

    def __init__(
        self,
        branches: Mapping[str, Kwargs],
        label_set: Kwargs | None = None,
        target_labels: torch.Tensor | None = None,
    ) -> None:
        self.branches = dict(branches)
        self.label_set = label_set
        self.target_labels = target_labels

    @property
    def num_labels(self) -> int:
        """Number of labels in the label set (0 without one)."""
        return 0 if self.label_set is None else tree_rows(self.label_set)

    def has_branch(self, name: str) -> bool:
        """Whether ``name`` can be evaluated: a named branch, or ``ref`` when a label set exists."""
        return name in self.branches or (name == "ref" and self.label_set is not None)

    def kwargs_for(self, branch: Branch, rows: torch.Tensor) -> Kwargs:
        """Keyword tree for ``rows`` of ``branch``."""
        if branch.labels is not None:
            if self.label_set is None:
                raise ValueError(f"branch {branch.name!r} asks for labels but this pipeline has no label set")
            labels = branch.labels.long()
            if labels.numel() != rows.numel():
                raise ValueError(f"branch {branch.name!r}: {labels.numel()} labels for {rows.numel()} rows")
            if labels.numel() and not ((labels >= 0) & (labels < self.num_labels)).all():  # one host read
                raise ValueError(
                    f"branch {branch.name!r}: labels must be in [0, {self.num_labels - 1}], got {labels.tolist()}"
                )
            return overlay(take(self.branches["cond"], rows), take(self.label_set, labels))
        if branch.keywords not in self.branches:
            raise ValueError(f"this pipeline cannot evaluate the branch {branch.keywords!r}")
        return take(self.branches[branch.keywords], rows)

    def gather(self, branches: Sequence[Branch], rows: Sequence[torch.Tensor]) -> Kwargs:
        """Concatenated keyword arguments for ``branches`` (each restricted to its ``rows``), in order."""
        return concat([self.kwargs_for(branch, index) for branch, index in zip(branches, rows)])
