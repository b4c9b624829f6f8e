"""convert: checkpoints that load on any device, verified.

Outputs (models/export/): model_fp32.safetensors, model_fp16.safetensors (optional), model.onnx and
model.torchscript.pt (optional; uint8 images in, logits divided by the temperature out), model.json
(with the preprocessing, the temperature evaluate fitted (models/calibration.json), and the model's
provenance: git revision, the upstream stages' params and output hashes from dvc.lock, the weights' sha256);
metrics/convert.json: prediction parity of each export against the trained model.
The loader (transfer.models.load_model) also reads torch checkpoints saved on a GPU, onto the
CPU, and strips DataParallel's `module.` and torch.compile's `_orig_mod.` prefixes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from transfer import calibration, cli, export, models, paths, preprocess, storage, training
from transfer.io import read_json, save_tensors, sha256_file, write_json
from transfer.params import load_params

FP16_MAX = torch.finfo(torch.float16).max
# Test images each export is compared on: a class-balanced sample. Every comparison pass (five) is a
# model run over it, which at the first 1,024 was most of convert's time. On the default the largest
# differences were 0.049 (fp16) and 1.44e-5 (ONNX) over these 256, against 0.071 and 1.48e-5 over
# 1,024: a smaller sample sees somewhat smaller maxima, well inside both bounds.
PARITY_IMAGES = 256


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


def convert(*, model_dir: Path, prepared_dir: Path, calibration_path: Path, out_dir: Path, metrics_path: Path,
            fp16: bool, onnx: bool, torchscript: bool, tolerance: float, fp16_tolerance: float, batch_size: int,
            max_images: int = PARITY_IMAGES, project: Path = paths.PROJECT) -> dict:
    """Export the model (weights in fp32 and fp16, ONNX, TorchScript), load each export back on the CPU
    the way a user would, and compare its test-split predictions with the trained model's. An export
    that disagrees (the fp16 copy by more than fp16_tolerance, the others by more than tolerance) fails
    the stage with the numbers, and the gated exports are deleted. The ONNX and TorchScript graphs
    divide the logits by the temperature in calibration_path, and are compared with the model's logits
    divided by it; the weights files hold the model as trained, and model.json the temperature."""
    meta = read_json(model_dir / "model.json")
    spec = preprocess.Spec.from_dict(meta.get("preprocess"), where=str(model_dir / "model.json"))
    # The model learnt on prepare's pixels: a deployment must get the same ones, so the two records must agree.
    prepared = read_json(prepared_dir / "preprocess.json")
    got, want = ({k: d.get(k) for k in preprocess.PIXEL_KEYS} for d in (prepared, spec.pixels()))
    if got != want:
        raise export.ExportError(f"{prepared_dir} was decoded with {got}, but the model's backbone expects {want}; "
                                 "one of them is stale: run `dvc repro`")
    if [list(spec.mean), list(spec.std)] != [meta["mean"], meta["std"]]:
        raise export.ExportError(f"{model_dir / 'model.json'}: mean/std {meta['mean']}/{meta['std']} differ from its "
                                 f"preprocessing record's {list(spec.mean)}/{list(spec.std)}; run `dvc repro`")
    test, data_meta = storage.read_split(prepared_dir, "test")
    storage.check_classes(folder=prepared_dir, data_meta=data_meta, model_classes=meta["classes"],
                          model_file=model_dir / "model.json",
                          fix="re-run extract, train_head and finetune on this data (dvc repro convert)")
    fitted = calibration.read_temperature(calibration_path, model_dir / "model.safetensors")
    meta = {**meta, "preprocess": export.preprocess_entry(spec), "temperature": fitted["temperature"],
            "calibration": {k: v for k, v in fitted.items() if k != "model_sha256"}}
    reference = models.load_model(model_dir / "model.safetensors", meta)
    # A class-balanced sample, the same every run: every class's logits are compared.
    sample = training.balanced_subset(test["labels"], max_images)
    images = test["images"][:] if sample is None else test["images"][sample]
    cpu = torch.device("cpu")
    # Parity needs no large batches: at 512 (evaluate's) Lite0's fp32 activations and onnxruntime's
    # arena took convert to 5.8 GB peak; at 64, about as fast.
    batch_size = min(batch_size, 64)

    def run(m):  # fp32 on the CPU: the parity check must not depend on autocast
        return training.predict(m, images, mean=meta["mean"], std=meta["std"], batch_size=batch_size, device=cpu, amp=False)

    def logits_of(forward) -> np.ndarray:  # an export's logits over the same images, batch by batch
        out = [forward(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, ref.shape[1]), dtype=np.float32)

    ref = run(reference).numpy()
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    exports = {"fp32": state}
    kept_fp32 = []
    if fp16:
        exports["fp16"], kept_fp32 = to_fp16(state)
    metrics = {"images_compared": int(len(images))}
    # The float16 copy's bound scales with the logits: rounding each weight by up to 2^-11 of itself moves
    # a logit in proportion to its size (a head trained at train_head.lr 0.02 had logits up to 41.3 and
    # moved by 0.253, 0.6% of that; the default's moved by 0.07-0.106).
    scale = max(1.0, float(np.abs(ref).max())) if len(ref) else 1.0
    metrics["max_abs_logit"] = round(scale, 4)
    bounds = {"tolerance": tolerance, "fp16_tolerance": fp16_tolerance * scale}
    # export -> (parity, its file, the param that bounds it): a gated export that is off fails the stage
    checks = {}
    for name, tensors in exports.items():
        path = out_dir / f"model_{name}.safetensors"
        save_tensors(path, tensors, meta={**meta, "dtype": name})
        key = "fp16_tolerance" if name == "fp16" else "tolerance"
        result = export.parity(ref, run(models.load_model(path, meta)).numpy(), bounds[key])
        metrics[f"{name}_agreement"] = result["agreement"]
        metrics[f"{name}_max_abs_logit_diff"] = result["max_abs_logit_diff"]
        metrics[f"{name}_mb"] = round(path.stat().st_size / 2**20, 3)
        if name == "fp16":
            checks["fp16"] = (result, path, key)
    metrics["fp16_kept_fp32_tensors"] = len(kept_fp32)
    if metrics["fp32_agreement"] < 1.0 or metrics["fp32_max_abs_logit_diff"] > 1e-4:
        raise export.ExportError(f"the fp32 export does not reproduce the model's predictions: {metrics}")

    t = fitted["temperature"]
    net = export.deployable(reference, meta["mean"], meta["std"], temperature=t)
    # What the graphs must give: the model's logits divided by T, in float32 as the graphs divide.
    calibrated = ref / np.float32(t) if t != 1.0 else ref
    if onnx:
        path = out_dir / export.ONNX_FILE
        export.export_onnx(net, path, meta["image_size"])
        session = export.onnx_session(path, device="cpu")
        result = export.parity(calibrated, logits_of(lambda b: export.onnx_logits(session, b.numpy())), tolerance)
        checks["onnx"] = (result, path, "tolerance")
    if torchscript:
        path = out_dir / export.TORCHSCRIPT_FILE
        export.export_torchscript(net, path, meta["image_size"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, see transfer.export
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            result = export.parity(calibrated, logits_of(lambda b: loaded(b).numpy()), tolerance)
        checks["torchscript"] = (result, path, "tolerance")
    for name, (result, _, _) in checks.items():
        metrics.update({f"{name}_{k}": v for k, v in result.items()})
    if onnx:  # (not TorchScript's size: it varies with the names PyTorch gives traced classes)
        metrics["onnx_mb"] = round((out_dir / export.ONNX_FILE).stat().st_size / 2**20, 3)
    write_json(metrics_path, metrics)
    # `not <=`: a NaN difference (an export that overflowed) fails too
    bad = {name: (result, key) for name, (result, _, key) in checks.items()
           if not result["max_abs_logit_diff"] <= bounds[key] or result["real_disagreements"]}
    if bad:
        for _, path, _ in checks.values():
            path.unlink(missing_ok=True)  # an export that does not reproduce the model must not be deployed
        raise export.ExportError(
            "; ".join(f"the {name} export does not reproduce the model on {len(images)} test images: top-1 agreement "
                      f"{r['agreement']:.4f}, max |logit difference| {r['max_abs_logit_diff']:.3g} > convert.{key} "
                      + (f"{fp16_tolerance:g} x the largest |logit| {scale:.3g}" if key == "fp16_tolerance" else f"{bounds[key]:g}")
                      for name, (r, key) in bad.items())
            + (". A larger convert.fp16_tolerance allows more" if "fp16" in bad else "")
            + (". Report it with the arch and torch/onnx versions" if set(bad) - {"fp16"} else "")
            + ", or turn that export off (convert.fp16 / convert.onnx / convert.torchscript)")
    meta["provenance"] = export.provenance(lock_path=project / paths.DVC_LOCK, project=project,
                                           weights_sha256=sha256_file(out_dir / "model_fp32.safetensors"))
    write_json(out_dir / "model.json", meta)
    return metrics


def main() -> None:
    p = load_params()
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic)
    metrics = convert(model_dir=paths.MODEL_DIR, prepared_dir=paths.PREPARED, calibration_path=paths.CALIBRATION,
                      out_dir=paths.EXPORT_DIR,
                      metrics_path=paths.METRICS / "convert.json", fp16=p.convert.fp16, onnx=p.convert.onnx,
                      torchscript=p.convert.torchscript, tolerance=p.convert.tolerance,
                      fp16_tolerance=p.convert.fp16_tolerance, batch_size=p.evaluate.batch_size)
    print(f"convert: {metrics}")


if __name__ == "__main__":
    cli.run("convert", main)
