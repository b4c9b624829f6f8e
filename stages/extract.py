"""extract: embeddings of every split from the frozen backbone, cached for head experiments.

Outputs: data/embeddings/{train,val,test}.safetensors (embeddings (N, D), labels): train and val in
float16, which train_head learns from; test in float32, from which evaluate scores a feature_extract
model without running the backbone again. Depends only on what changes the embeddings, so
`-S train_head.*` experiments reuse the cache.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from transfer import cli, models, paths, storage, training
from transfer.io import tensor_stream, write_json
from transfer.params import load_params

# Float16 halves the cache the head trains from. The test split is evaluate's: its embeddings in
# float32 give exactly the model's logits (the default's 1,500 test images: max |difference| 0.0,
# where float16 gave 6.7e-4), so a frozen-backbone model is scored on cached outputs, not approximately.
EMBEDDED_SPLITS = {"train": torch.float16, "val": torch.float16, "test": torch.float32}


def extract_embeddings(*, backbone_dir: Path, prepared_dir: Path, out_dir: Path, batch_size: int,
                       device: torch.device, amp: bool, compile: bool = False) -> dict:
    """Run the frozen backbone (eval mode, inference_mode, batched, through torch.compile with
    `compile`) over each split; store the embeddings. Under torchrun each rank embeds its
    contiguous share of every split and rank 0 writes them all."""
    import torch.distributed as dist

    rank, world = training.rank_and_world()
    backbone, info = models.load_backbone(backbone_dir)
    if compile:
        backbone = torch.compile(backbone)
    stats = {}
    for split, dtype in EMBEDDED_SPLITS.items():
        tensors, meta = storage.read_split(prepared_dir, split)
        images, labels = tensors["images"], tensors["labels"]
        bounds = [len(images) * r // world for r in range(world + 1)]
        start = time.perf_counter()
        # Written batch by batch as they come: memory holds one batch, not the split's N x D embeddings.
        batches = (y.to(dtype) for y in training.predict_batches(
            backbone, images.rows(bounds[rank], bounds[rank + 1]), mean=info["mean"], std=info["std"],
            batch_size=batch_size, device=device, amp=amp, desc=f"extract {split}"))
        shares = [out_dir / f".{split}.rank{r}.tmp" for r in range(world)]
        if rank > 0:
            # Other ranks spool their share; rank 0 appends the shares in rank order after its own.
            shares[rank].parent.mkdir(parents=True, exist_ok=True)
            with open(shares[rank], "wb") as f:
                for y in batches:
                    f.write(y.view(torch.uint8).numpy().tobytes())
            dist.barrier()
        else:
            layout = {"labels": (torch.int64, tuple(labels.shape)), "embeddings": (dtype, (len(images), info["feature_dim"]))}
            try:
                with tensor_stream(paths.split_file(out_dir, split), layout,
                                   meta={"classes": meta["classes"], "arch": info["arch"], "backbone_sha256": info["sha256"]}) as put:
                    put("labels", labels)
                    for y in batches:
                        put("embeddings", y)
                    if world > 1:
                        dist.barrier()
                        for share in shares[1:]:
                            with open(share, "rb") as f:
                                while piece := f.read(1 << 24):
                                    put("embeddings", piece)
            finally:
                for share in shares[1:]:
                    share.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        stats[split] = dict(images=len(images), seconds=round(seconds, 3),
                            images_per_second=round(len(images) / seconds, 1) if seconds > 0 else None)
    return dict(device=str(device), feature_dim=info["feature_dim"], processes=world, compiled=compile, splits=stats)


def main() -> None:
    p = load_params()
    training.launch(p.runtime.nproc, "stages.extract")
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic)
    rank, _ = training.init_distributed()
    device = training.pick_device(p.runtime.device)
    try:
        stats = extract_embeddings(backbone_dir=paths.BACKBONE_DIR, prepared_dir=paths.PREPARED, out_dir=paths.EMBEDDINGS,
                                   batch_size=p.extract.batch_size, device=device, amp=p.runtime.amp,
                                   compile=training.compile_enabled(p.runtime.compile, device))
    finally:
        training.finish_distributed()
    if rank:
        return
    # Timings vary run to run: inside data/embeddings they would change the hash of an output that
    # train_head depends on, and DVC would re-run everything downstream of identical embeddings.
    write_json(paths.LOGS / "extract_timing.json", stats)
    print(f"extract: {stats}")


if __name__ == "__main__":
    cli.run("extract", main)
