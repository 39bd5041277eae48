"""Partitions of the condition space into K disjoint groups, one per student (multi-student distillation).

MSD (Song et al., ICML 2025) splits the conditions into K disjoint, equal-size groups and trains one
student per group. Class-conditional teachers (ImageNet-64 FID, DM only, K = 4): consecutive blocks of
class ids 2.37, k-means on class embeddings 2.39, random 2.45, so ``sequential`` is the default.

- :func:`sequential_partition`: consecutive blocks ``[0..n/K), [n/K..2n/K), ...``;
- :func:`random_partition`: a seeded permutation cut into blocks;
- :func:`kmeans_partition`: *balanced* k-means on class embeddings (each cluster holds ``n/K`` classes,
  up to one: the paper's groups are equal-size), assignments solved exactly as a min-cost matching;
- :class:`PCAPartition`: text prompts. The paper splits pooled text-encoder embeddings into K equal
  "quadrants" without saying along which directions [paper: unstated; this choice is ours]. We cut along
  the top principal components of the pooled embeddings of the training prompts, recursively: level ``d``
  of a binary tree splits each node along principal component ``d`` at the quantile that gives its two
  children their share of students (the median for even shares). K = 4 gives the four quadrants of the
  (PC1, PC2) plane with balanced thresholds; a new prompt is routed by the same tree, so training and
  sampling agree.

Sizes differ by at most one when K does not divide the number of classes (the first groups are larger).
Nothing here imports training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import UserError

PARTITION_KINDS = ("sequential", "kmeans", "random")


def balanced_sizes(n: int, k: int) -> list[int]:
    """``k`` group sizes summing to ``n`` that differ by at most one (the larger ones first)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _blocks(order: Sequence[int], k: int) -> list[list[int]]:
    """``order`` cut into ``k`` consecutive balanced blocks, each sorted."""
    groups, start = [], 0
    for size in balanced_sizes(len(order), k):
        groups.append(sorted(int(c) for c in order[start:start + size]))
        start += size
    return groups


def _check_k(num_classes: int, k: int) -> None:
    if k < 1:
        raise UserError(f"msd.num_students must be >= 1, got {k}")
    if k > num_classes:
        raise UserError(f"msd.num_students={k} is larger than the teacher's {num_classes} classes: every student "
                        "needs at least one class")


def sequential_partition(num_classes: int, k: int) -> list[list[int]]:
    """Consecutive blocks of class ids (the paper's best partition, FID 2.37 on ImageNet-64 at K = 4)."""
    _check_k(num_classes, k)
    return _blocks(list(range(num_classes)), k)


def random_partition(num_classes: int, k: int, seed: int = 0) -> list[list[int]]:
    """A permutation of the class ids seeded by ``seed``, cut into ``k`` balanced blocks."""
    _check_k(num_classes, k)
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return canonical(_blocks(perm, k))


def kmeans_partition(embeddings: Tensor | np.ndarray, k: int, seed: int = 0, iters: int = 100) -> list[list[int]]:
    """Balanced k-means on class embeddings ``[num_classes, D]``: ``k`` clusters of balanced sizes.

    Lloyd iterations from a k-means++ start (seeded); the assignment step is an exact min-cost matching
    (``scipy.optimize.linear_sum_assignment``) of classes to cluster *slots*, each centroid repeated as
    many times as its group's size, so every cluster gets its share of classes. Stops when the assignment
    no longer changes.
    """
    from scipy.optimize import linear_sum_assignment

    x = np.asarray(torch.as_tensor(embeddings).detach().cpu().double())
    n = x.shape[0]
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ~ squared distance
        d2 = np.min([((x - c) ** 2).sum(1) for c in centroids], axis=0)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centroids.append(x[rng.choice(n, p=p)])
    centres = np.stack(centroids)
    slot_owner = np.repeat(np.arange(k), balanced_sizes(n, k))  # slot j belongs to cluster slot_owner[j]
    assign = None
    for _ in range(iters):
        dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # [n, k] squared distances
        cost = dist[:, slot_owner]  # [n, n]: class x slot
        rows, cols = linear_sum_assignment(cost)
        new = np.empty(n, dtype=int)
        new[rows] = slot_owner[cols]
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centres = np.stack([x[assign == j].mean(0) for j in range(k)])
    return canonical([[int(c) for c in np.nonzero(assign == j)[0]] for j in range(k)])


def canonical(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Groups sorted inside and ordered by their smallest label (student 0 holds class 0)."""
    return sorted(([int(c) for c in sorted(g)] for g in groups), key=lambda g: g[0] if g else math.inf)


def class_partition(num_classes: int, k: int, kind: str = "sequential", seed: int = 0,
                    embeddings: Optional[Tensor] = None) -> list[list[int]]:
    """The ``k`` groups of class labels of partition ``kind`` (see the module docstring).

    ``embeddings`` (``[num_classes, D]``) are needed by ``kmeans`` only. Bad input is a :class:`UserError`.
    """
    if kind not in PARTITION_KINDS:
        raise UserError(f"unknown msd.partition {kind!r}; choose {', '.join(PARTITION_KINDS)}")
    _check_k(num_classes, k)
    if kind == "sequential":
        groups = sequential_partition(num_classes, k)
    elif kind == "random":
        groups = random_partition(num_classes, k, seed)
    else:
        if embeddings is None:
            raise UserError("msd.partition=kmeans needs class embeddings (the teacher has no class-embedding table)")
        if len(embeddings) < num_classes:
            raise UserError(f"msd.partition=kmeans got {len(embeddings)} class embeddings for {num_classes} classes")
        groups = kmeans_partition(embeddings[:num_classes], k, seed)
    check_partition(groups, num_classes)
    return groups


def check_partition(groups: Sequence[Sequence[int]], num_classes: int) -> None:
    """Raise :class:`UserError` unless ``groups`` are non-empty, disjoint and cover ``0..num_classes-1``."""
    flat = [int(c) for g in groups for c in g]
    if any(len(g) == 0 for g in groups):
        raise UserError(f"every student needs at least one class; got groups {list(map(list, groups))}")
    if len(flat) != len(set(flat)):
        raise UserError("msd partition groups overlap")
    if sorted(flat) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(flat))
        raise UserError(f"msd partition must cover classes 0..{num_classes - 1} exactly (missing {missing[:5]}, "
                        f"outside {sorted(set(flat) - set(range(num_classes)))[:5]})")


def format_partition(groups: Sequence[Sequence[int]], names: Optional[Sequence[str]] = None) -> str:
    """A printable table: which classes (or prompt-cluster sizes and examples) go to which student."""
    lines = ["student | conditions", "---|---"]
    for k, g in enumerate(groups):
        shown = ", ".join(names[c] if names else str(c) for c in g)
        lines.append(f"{k} | {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Text prompts: balanced splits along the top principal components of pooled embeddings
def pooled_text_embedding(cond: Any) -> Tensor:
    """One vector per prompt of a :class:`~diffdistill.denoiser.TextCond`: its ``pooled`` output when the
    teacher has one (SDXL's second text encoder), else the mean of the encoder's token states
    ``embeds [B, L, D] -> [B, D]`` (SD 1.5's TextCond carries no pooled vector)."""
    if getattr(cond, "pooled", None) is not None:
        return cond.pooled.float()
    return cond.embeds.float().mean(dim=1)


@dataclass
class PCAPartition:
    """A binary tree of balanced cuts along principal components (see the module docstring).

    Attributes:
        mean: ``[D]`` mean of the fitting embeddings.
        components: ``[depth, D]`` principal directions (unit rows), most variance first.
        tree: nested ``{"axis": d, "threshold": t, "left": node, "right": node}``, leaves ``{"student": k}``.
        num_students: K.
    """

    mean: Tensor
    components: Tensor
    tree: dict
    num_students: int

    @classmethod
    def fit(cls, embeddings: Tensor, k: int) -> "PCAPartition":
        """Fit the tree on ``embeddings [N, D]`` (pooled prompts); leaves get ``N/k`` points each, up to ties."""
        x = torch.as_tensor(embeddings).detach().double().cpu()
        if x.ndim != 2 or len(x) < k:
            raise UserError(f"a text partition into {k} groups needs at least {k} prompts, got {len(x)}")
        if k < 1:
            raise UserError(f"msd.num_students must be >= 1, got {k}")
        mean = x.mean(0)
        depth = max(1, math.ceil(math.log2(k)))
        # principal directions: right singular vectors of the centred data
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vh[: min(depth, vh.shape[0])]
        proj = (x - mean) @ comps.T  # [N, depth]
        next_id = [0]

        def build(idx: Tensor, n_students: int, level: int) -> dict:
            if n_students == 1:
                node = {"student": next_id[0]}
                next_id[0] += 1
                return node
            axis = level % comps.shape[0]
            left_share = math.ceil(n_students / 2)
            values = proj[idx, axis].sort().values
            cut = round(len(values) * left_share / n_students)  # points that go left
            cut = min(max(cut, 1), len(values) - 1) if len(values) > 1 else 0
            threshold = float((values[cut - 1] + values[cut]) / 2) if 0 < cut < len(values) else float(values[0])
            go_left = proj[idx, axis] < threshold
            return {"axis": axis, "threshold": threshold,
                    "left": build(idx[go_left], left_share, level + 1),
                    "right": build(idx[~go_left], n_students - left_share, level + 1)}

        tree = build(torch.arange(len(x)), k, 0)
        return cls(mean.float(), comps.float(), tree, k)

    def route(self, embeddings: Tensor) -> Tensor:
        """The student of each pooled embedding ``[B, D] -> LongTensor[B]``."""
        x = torch.as_tensor(embeddings).detach().float().cpu()
        proj = (x - self.mean) @ self.components.T
        out = torch.empty(len(x), dtype=torch.long)

        def walk(node: dict, idx: Tensor) -> None:
            if "student" in node:
                out[idx] = node["student"]
                return
            left = proj[idx, node["axis"]] < node["threshold"]
            walk(node["left"], idx[left])
            walk(node["right"], idx[~left])

        walk(self.tree, torch.arange(len(x)))
        return out

    def to_json(self) -> dict:
        return {"type": "text_pca", "num_students": self.num_students, "mean": self.mean.tolist(),
                "components": self.components.tolist(), "tree": self.tree}

    @classmethod
    def from_json(cls, data: dict) -> "PCAPartition":
        if data.get("type") != "text_pca":
            raise UserError(f"not a text_pca partition: {data.get('type')!r}")
        return cls(torch.tensor(data["mean"]), torch.tensor(data["components"]), data["tree"],
                   int(data["num_students"]))


__all__ = ["PARTITION_KINDS", "balanced_sizes", "sequential_partition", "random_partition", "kmeans_partition",
           "class_partition", "check_partition", "canonical", "format_partition", "pooled_text_embedding",
           "PCAPartition"]
