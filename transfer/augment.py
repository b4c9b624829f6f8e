"""Training-time augmentation of uint8 (B, C, H, W) batches: per image, on the batch's device, seeded."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(batch: torch.Tensor, *, pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (after zero padding) and horizontal flip on a uint8 batch, on its device."""
    b, _, h, w = batch.shape
    if pad:
        padded = F.pad(batch, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
        rows = (oy[:, None] + torch.arange(h, device=batch.device))[:, None, :, None]  # (B,1,H,1)
        cols = (ox[:, None] + torch.arange(w, device=batch.device))[:, None, None, :]  # (B,1,1,W)
        bidx = torch.arange(b, device=batch.device)[:, None, None, None]
        cidx = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
        batch = padded[bidx, cidx, rows, cols]
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(batch.device)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch
