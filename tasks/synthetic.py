"""``synthetic``: points from a mixture of well-separated clusters on the unit sphere.

Item i is ``x_i = normalise(μ_k + σ_c·z)`` for a cluster centre μ_k (uniform on the sphere
S^{d-1}) and z ~ N(0, I); its m fixed views are ``normalise(x_i + σ_v·z')``. Labels are the
cluster ids. The encoder is a small MLP. Finite views, so every exact metric applies.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from negbench import Encoder, EvalData, FiniteViewTask, make_encoder, Param, register_task


@register_task("synthetic")
class SyntheticTask(FiniteViewTask):
    description = "Mixture of well-separated clusters on a sphere; m fixed noisy views; MLP."
    params = {
        "num_items": Param(512, "number of items N", low=4),
        "input_dim": Param(32, "ambient dimension of the points", low=2),
        "clusters": Param(8, "number of clusters (the labels)", low=1),
        "views": Param(2, "fixed views per item (m)", low=2),
        "cluster_spread": Param(0.25, "σ_c: spread of points around their centre", low=0.0),
        "view_noise": Param(0.1, "σ_v: noise of a view around its point", low=0.0),
        "hidden": Param(64, "width of the MLP", low=1),
        "dim": Param(32, "embedding dimension", low=1),
    }
    test_params = {"num_items": 24, "input_dim": 8, "clusters": 3, "hidden": 16, "dim": 8}

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(self.clusters, self.input_dim, generator=gen), dim=1)
        labels = torch.arange(self.num_items) % self.clusters
        labels = labels[torch.randperm(self.num_items, generator=gen)]
        noise = torch.randn(self.num_items, self.input_dim, generator=gen)
        points = F.normalize(centres[labels] + self.cluster_spread * noise, dim=1)
        view_noise = torch.randn(self.num_items, self.views, self.input_dim, generator=gen)
        self._set_views(F.normalize(points[:, None, :] + self.view_noise * view_noise, dim=2))
        # fixed half/half probe split of the clean points
        order = torch.randperm(self.num_items, generator=gen)
        half = self.num_items // 2
        self.evaluation = EvalData(
            points[order[:half]], labels[order[:half]], points[order[half:]], labels[order[half:]]
        )

    def make_encoder(self) -> Encoder:
        return make_encoder("mlp", in_dim=self.input_dim, hidden=self.hidden, dim=self.dim)

    def describe(self) -> dict:
        return {**super().describe(), "probe_split": "half of the clean points (seeded), half test"}
