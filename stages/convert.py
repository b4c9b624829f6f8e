"""convert: checkpoints that load on any device, verified.

Outputs (models/export/): model_fp32.safetensors, model_fp16.safetensors (optional), model.json;
metrics/convert.json: prediction parity of each export against the trained model.
The loader (transfer.models.load_model) also reads torch checkpoints saved on a GPU, onto the
CPU, and strips DataParallel's `module.` and torch.compile's `_orig_mod.` prefixes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from transfer import models, paths, storage, training
from transfer.io import read_json, save_tensors, write_json
from transfer.params import load_params

FP16_MAX = torch.finfo(torch.float16).max


def to_fp16(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Half-precision copy; tensors that would overflow float16 (e.g. BatchNorm running variances)
    stay float32 rather than turning into inf."""
    out, kept = {}, []
    for key, value in state.items():
        if value.is_floating_point() and value.abs().max() <= FP16_MAX:
            out[key] = value.half()
        else:
            out[key] = value
            if value.is_floating_point():
                kept.append(key)
    return out, kept


def convert(*, model_dir: Path, prepared_dir: Path, out_dir: Path, metrics_path: Path, fp16: bool,
            batch_size: int, max_images: int = 1024) -> dict:
    """Export the model's weights, reload each export on the CPU, and compare test predictions."""
    meta = read_json(model_dir / "model.json")
    reference = models.load_model(model_dir / "model.safetensors", meta)
    test, _ = storage.read_split(prepared_dir, "test")
    images = test["images"][:max_images]
    cpu = torch.device("cpu")

    def run(m):  # fp32 on the CPU: the parity check must not depend on autocast
        return training.predict(m, images, mean=meta["mean"], std=meta["std"], batch_size=batch_size, device=cpu, amp=False)

    ref_logits = run(reference)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    exports = {"fp32": state}
    kept_fp32 = []
    if fp16:
        exports["fp16"], kept_fp32 = to_fp16(state)
    metrics = {"images_compared": int(len(images))}
    for name, tensors in exports.items():
        path = out_dir / f"model_{name}.safetensors"
        save_tensors(path, tensors, meta={**meta, "dtype": name})
        logits = run(models.load_model(path, meta))
        agreement = float((logits.argmax(1) == ref_logits.argmax(1)).float().mean()) if len(images) else 1.0
        max_diff = float((logits - ref_logits).abs().max()) if len(images) else 0.0
        metrics[f"{name}_agreement"] = agreement
        metrics[f"{name}_max_abs_logit_diff"] = max_diff
        metrics[f"{name}_mb"] = round(path.stat().st_size / 2**20, 3)
    metrics["fp16_kept_fp32_tensors"] = len(kept_fp32)
    write_json(out_dir / "model.json", meta)
    write_json(metrics_path, metrics)
    if metrics["fp32_agreement"] < 1.0 or metrics["fp32_max_abs_logit_diff"] > 1e-4:
        raise RuntimeError(f"the fp32 export does not reproduce the model's predictions: {metrics}")
    return metrics


def main() -> None:
    p = load_params()
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic)
    try:
        metrics = convert(model_dir=paths.MODEL_DIR, prepared_dir=paths.PREPARED, out_dir=paths.EXPORT_DIR,
                          metrics_path=paths.METRICS / "convert.json", fp16=p.convert.fp16, batch_size=p.evaluate.batch_size)
    except RuntimeError as e:
        sys.exit(f"convert: {e}")
    print(f"convert: {metrics}")


if __name__ == "__main__":
    main()
