"""The data partition of decentralized experts: the emoji training images clustered in emoji-CLIP feature space.

As in DDM (§3), images are clustered finely first (k-means to many centroids), then the fine centroids are merged
into K coarse ones (k-means over the fine centroids, each weighted by the images it holds) and every image joins
its nearest coarse centroid. DDM clusters DINOv2 features into 1,024 centroids; here emoji-CLIP's image embeddings
(unit norm, 384-d) into 64, a stated deviation: our data set has 3,392 training images. `random` partitions are the
control the paper compares against (random shards of equal size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffroute.errors import InputError
from diffroute.utils.io import atomic_write_json, read_json

MAX_CLUSTERS = 64


@dataclass
class Partition:
    """Which cluster each training image belongs to. `rows` are the data set's rows (training images only, in data
    order) and `labels[i]` the cluster of `rows[i]`; `centroids` [K, d] assign new images (`assign`)."""

    k: int
    rows: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    method: str = "kmeans"  # kmeans | random
    seed: int = 0

    def members(self, cluster: int) -> np.ndarray:
        """The data rows of one cluster (refused with a message when there is no such cluster)."""
        check_cluster(cluster, self.k)
        return self.rows[self.labels == cluster]

    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.k).tolist()

    def assign(self, features: np.ndarray) -> np.ndarray:
        """The nearest centroid of each feature row (held-out images get labels this way)."""
        return nearest(features, self.centroids)

    def fingerprint(self) -> str:
        """Names this partition in every run trained on it, so experts of different partitions never mix."""
        h = hashlib.sha256(self.rows.astype(np.int64).tobytes() + self.labels.astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(
            path,
            {
                "k": self.k,
                "method": self.method,
                "seed": self.seed,
                "fingerprint": self.fingerprint(),
                "sizes": self.sizes(),
                "rows": self.rows.tolist(),
                "labels": self.labels.tolist(),
                "centroids": self.centroids.tolist(),
            },
        )

    @classmethod
    def load(cls, path: str | Path, n_images: int | None = None) -> Partition:
        """A saved partition, checked field by field (an untrusted file): a clear error, never a wrong split."""
        path = Path(path)
        if path.is_dir():
            path = path / "partition.json"
        raw = read_json(path, "partition", max_bytes=16 * 2**20)
        try:
            k, rows, labels = int(raw["k"]), np.asarray(raw["rows"]), np.asarray(raw["labels"])
            centroids = np.asarray(raw["centroids"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} is not a partition (needs k, rows, labels, centroids): {e}") from e
        if not 2 <= k <= MAX_CLUSTERS:
            raise InputError(f"{path}: k must be from 2 to {MAX_CLUSTERS}; got {k}.")
        if rows.ndim != 1 or rows.shape != labels.shape or rows.dtype.kind != "i" or labels.dtype.kind != "i":
            raise InputError(f"{path}: rows and labels must be integer lists of equal length.")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise InputError(f"{path}: labels must lie in 0..{k - 1}.")
        if n_images is not None and rows.size and (rows.min() < 0 or rows.max() >= n_images):
            raise InputError(f"{path}: rows must index the {n_images} images of the data set.")
        if len(np.unique(rows)) != len(rows):
            raise InputError(f"{path}: a data row appears twice.")
        if centroids.ndim != 2 or centroids.shape[0] != k or not np.isfinite(centroids).all():
            raise InputError(f"{path}: centroids must be a finite [k, d] array.")
        if "fingerprint" in raw and raw["fingerprint"] != cls(k, rows, labels, centroids).fingerprint():
            raise InputError(f"{path}: its fingerprint does not match its rows and labels (edited by hand?).")
        return cls(k, rows, labels, centroids, str(raw.get("method", "kmeans")), int(raw.get("seed", 0)))


def check_cluster(cluster, k: int) -> None:
    if isinstance(cluster, bool) or not isinstance(cluster, (int, np.integer)) or not 0 <= cluster < k:
        raise InputError(
            f"cluster must be an integer from 0 to {k - 1} (the partition has {k} clusters); got {cluster}."
        )


@torch.no_grad()
def image_features(images: np.ndarray, batch: int = 512) -> np.ndarray:
    """emoji-CLIP image embeddings (unit norm) of uint8 [N, H, W, 3] images."""
    from diffroute.metrics.emoji_clip import load_emoji_clip

    clip = load_emoji_clip()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return torch.cat([clip.image_embeds(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each row."""
    return torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(centroids).double()).argmin(1).numpy()


def kmeans(x: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None, iters: int = 50) -> np.ndarray:
    """Centroids [k, d] of weighted k-means (k-means++ start, Lloyd iterations). scipy's kmeans2 has no sample
    weights, which the merge of fine centroids needs (a centroid stands for its images), hence these few lines."""
    rng = np.random.default_rng(seed)
    w = np.ones(len(x)) if weights is None else weights.astype(np.float64)
    centroids = [x[rng.choice(len(x), p=w / w.sum())]]
    for _ in range(k - 1):
        d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(np.stack(centroids)).double())
        d = d.min(1).values.numpy() ** 2 * w
        centroids.append(x[rng.choice(len(x), p=d / d.sum())])
    c = np.stack(centroids).astype(np.float64)
    for _ in range(iters):
        assign = nearest(x, c)
        for j in range(k):
            m = assign == j
            if m.any():
                c[j] = (x[m] * w[m, None]).sum(0) / w[m].sum()
    return c.astype(np.float32)


def make_partition(
    k: int, method: str = "kmeans", fine: int = 64, seed: int = 0, data: dict | None = None
) -> Partition:
    """Cluster the emoji training images (never the held-out ones) into `k` clusters."""
    from diffroute.data import emoji as emoji_data

    if not 2 <= k <= MAX_CLUSTERS:
        raise InputError(f"K must be from 2 to {MAX_CLUSTERS}; got {k}.")
    if method not in ("kmeans", "random"):
        raise InputError(f"the partition method is kmeans or random; got {method!r}.")
    data = data if data is not None else emoji_data.load()
    rows = np.flatnonzero(~data["held_out"])
    feats = image_features(data["images"][rows])
    if method == "random":  # equal shards in a seeded random order: the paper's control
        labels = np.empty(len(rows), dtype=np.int64)
        labels[np.random.default_rng(seed).permutation(len(rows))] = np.arange(len(rows)) % k
        centroids = np.stack([feats[labels == j].mean(0) for j in range(k)])
        return Partition(k, rows, labels, centroids.astype(np.float32), method, seed)
    fine_c = kmeans(feats, max(fine, k), seed)
    fine_assign = nearest(feats, fine_c)
    counts = np.bincount(fine_assign, minlength=len(fine_c))
    used = counts > 0
    coarse = kmeans(fine_c[used], k, seed, weights=counts[used])
    labels = nearest(feats, coarse)
    # each coarse centroid becomes the mean of its images, so `assign` agrees with the training labels
    centroids = np.stack([feats[labels == j].mean(0) if (labels == j).any() else coarse[j] for j in range(k)])
    return Partition(k, rows, labels.astype(np.int64), centroids.astype(np.float32), method, seed)


def cluster_grid(partition: Partition, images: np.ndarray, per_cluster: int = 16, scale: int = 2):
    """One row per cluster: `per_cluster` of its images, evenly spread over its members (a PIL image)."""
    from diffroute.utils.imageio import grid, to_pil

    rows = []
    for j in range(partition.k):
        members = partition.members(j)
        pick = members[np.linspace(0, len(members) - 1, min(per_cluster, len(members))).astype(int)]
        rows.append(to_pil(images[pick] / 255.0))
    labels = [f"{j}: {n}" for j, n in enumerate(partition.sizes())]
    return grid(rows, labels=labels, scale=scale)
