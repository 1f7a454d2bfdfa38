"""Per-branch conditioning for the one batched forward.

A pipeline describes each branch (``cond``, ``uncond``) by the keyword tensors its network takes, batch-first for
the B samples, and optionally a *label set*: the same keywords with one row per label, for labelled reference
branches (``ref``, GFCG). :meth:`BranchConditioning.gather` concatenates the rows of the requested branches in
request order, so one network call serves all of them. Nested dicts (SDXL's ``added_cond_kwargs``) are gathered
leaf by leaf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from guidance.base import Branch

Kwargs = Mapping[str, Any]


def _take(tree: Any, index: torch.Tensor) -> Any:
    if isinstance(tree, Mapping):
        return {key: _take(value, index) for key, value in tree.items()}
    return tree[index.to(tree.device)]


def _concat(trees: Sequence[Any]) -> Any:
    first = trees[0]
    if isinstance(first, Mapping):
        return {key: _concat([tree[key] for tree in trees]) for key in first}
    return torch.cat(list(trees))


class BranchConditioning:
    """Network keyword arguments per branch (see the module docstring).

    Args:
        branches: branch name -> keyword tensors with B rows each.
        label_set: keyword tensors with one row per label, for labelled branches; ``None`` if the pipeline has none.
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
        if self.label_set is None:
            return 0
        leaf: Any = self.label_set
        while isinstance(leaf, Mapping):
            leaf = next(iter(leaf.values()))
        return int(leaf.shape[0])

    def has_branch(self, name: str) -> bool:
        """Whether ``name`` can be evaluated: a named branch, or ``ref`` when a label set exists."""
        return name in self.branches or (name == "ref" and self.label_set is not None)

    def kwargs_for(self, branch: Branch, rows: torch.Tensor) -> Kwargs:
        """Keyword tensors for ``rows`` of ``branch``."""
        if branch.labels is not None:
            if self.label_set is None:
                raise ValueError(f"branch {branch.name!r} asks for labels but this pipeline has no label set")
            labels = branch.labels.long()
            if labels.numel() != rows.numel():
                raise ValueError(f"branch {branch.name!r}: {labels.numel()} labels for {rows.numel()} rows")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ValueError(
                    f"branch {branch.name!r}: labels must be in [0, {self.num_labels - 1}], got {labels.tolist()}"
                )
            return _take(self.label_set, labels)
        if branch.name not in self.branches:
            raise ValueError(f"this pipeline cannot evaluate the branch {branch.name!r}")
        return _take(self.branches[branch.name], rows)

    def gather(self, branches: Sequence[Branch], rows: Sequence[torch.Tensor]) -> Kwargs:
        """Concatenated keyword tensors for ``branches`` (each restricted to its ``rows``), in order."""
        return _concat([self.kwargs_for(branch, index) for branch, index in zip(branches, rows)])
