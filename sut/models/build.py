"""A model from a state dict: built on the meta device (no memory touched), then
given the weights. Shared by the loaders (sut/loading) and by models built over a
dense base (MoME)."""
from __future__ import annotations

import torch

from wallperf.sut.models.llama import rope_inv_freq


def build_model(model_cls: type, cfg, sd: dict, dtype: torch.dtype, device="cpu", consume: bool = False):
    """`model_cls(cfg)` with `sd`'s weights (HF names) in `dtype` on `device`.
    `consume=True` empties `sd` as it goes, so each checkpoint tensor is freed once
    fused (Q/K/V, gate/up) instead of living beside its copy until the end."""
    with torch.device("meta"):
        model = model_cls(cfg)
    model.load_hf_state_dict(sd if consume else dict(sd), dtype)
    # The RoPE table is a buffer, built on meta with the module: compute it for real.
    model.inv_freq = rope_inv_freq(cfg)
    return model.to(device).eval()
