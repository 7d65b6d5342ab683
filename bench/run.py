"""`steerprune bench`: offline latency of a bundle's models against their FLOP bound, with honest peers.

Variants timed in the same run, each in its own process (one ONNX Runtime session or one torch model per process,
so no two share threads or caches), with the rounds interleaved so machine drift hits every variant alike:

    full                   models/full.onnx (ONNX Runtime)
    removed:<file>         each distinct pruned model of the bundle (heads physically removed)
    masked:<file>          the gated model with the same constant mask, exported to ONNX (AdaViT-style masking,
                           heads zeroed but still computed): needs torch and the run directory
    torch-eager:full       the full timm model in PyTorch eager mode: needs torch and the run directory

Per variant and batch size: warm-up, then >= `runs` timed calls; median, p10, p90 (ms per batch and per image).
Speedup is full median / variant median at the same batch size, reported next to the FLOP bound 1 / flops_rel.
`--synthetic deit_small` does the same on a random-weight DeiT-S (224 px, 12 x 6 heads) with fixed masks.
`--device cuda` times on ONNX Runtime's CUDA provider (and PyTorch on the GPU), host arrays in and out per call.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

from steerprune.errors import UserError
from steerprune.export.manifest import load_manifest, model_paths
from steerprune.export.runtime import gpu_visible, ort_providers

from .report import finish, machine
from .timing import time_variants

__all__ = ["run_bench", "run_synthetic", "SYNTHETIC"]

# Synthetic models: timm name -> (masks as heads kept per layer, applied to every layer). Random weights.
SYNTHETIC = {"deit_small": ("deit_small_patch16_224", (4, 2, 0)),
             "deit_tiny": ("deit_tiny_patch16_224", (2, 1, 0))}


def _check_device(device: str) -> None:
    """Refuse a device this machine cannot time on, before anything is exported or spawned."""
    ort_providers(device)  # UserError for an unknown device or an onnxruntime without CUDA
    if device == "cuda" and not gpu_visible():
        raise UserError("--device cuda: no NVIDIA GPU is visible on this machine")


def _export_masked_peers(run_dir: Path, masks: dict[str, list], tmp: Path, chans_size) -> dict[str, Path]:
    """The gated model with each constant mask, exported to ONNX (heads zeroed, not removed)."""
    from steerprune.export.onnx_export import MaskedLogits, export_onnx
    from steerprune.training.model import GatedViT
    from steerprune.training.run import load_run

    run = load_run(run_dir)
    gated = GatedViT(run.vit).eval()
    return {rel: export_onnx(MaskedLogits(gated, mask), tmp / f"masked_{Path(rel).stem}.onnx", *chans_size)
            for rel, mask in masks.items()}


def run_bench(bundle_dir, out_path=None, threads: int = 2, batches: Sequence[int] = (1, 8), runs: int = 50,
              rounds: int = 3, torch_peers: bool = True, masked_peers: bool = True, warmup_s: float = 0.5,
              device: str = "cpu", log=print) -> dict:
    """Benchmark a bundle's models (and peers) on `device` and write JSON + PNG; returns the result dict."""
    _check_device(device)
    bundle_dir = Path(bundle_dir).expanduser()
    m = load_manifest(bundle_dir)
    out_path = Path(out_path) if out_path else bundle_dir / "bench" / "bench.json"
    if threads < 1 or runs < 1 or rounds < 1:
        raise UserError("threads, runs and rounds must be at least 1")
    shape = (m["input"]["channels"], m["input"]["img_size"], m["input"]["img_size"])
    notes = []
    variants = []
    for rel in model_paths(m):
        e = m["models"][rel]
        full = rel == m["full"]["model"]
        variants.append({"name": "full" if full else f"removed:{Path(rel).stem}", "kind": "onnx",
                         "path": bundle_dir / rel, "role": "full" if full else "removed", "model": rel,
                         "routes": e["routes"], "flops_rel": e["flops_rel"], "head_usage": e["head_usage"],
                         "label": "full (ONNX)" if full else f"removed {_label(e)}"})
    run_dir = Path(m["run"].get("path", "")) if isinstance(m.get("run"), dict) else None
    torch_ok = _has_torch()
    run_ok = run_dir is not None and (run_dir / "backbone.json").is_file()
    with tempfile.TemporaryDirectory(prefix="steerprune-bench-") as tmp:
        if (masked_peers or torch_peers) and not (torch_ok and run_ok):
            notes.append("torch peers skipped: " + ("torch is not installed" if not torch_ok else
                                                    f"the run directory {run_dir} is not available"))
        else:
            if masked_peers:
                pruned = {v["model"]: m["models"][v["model"]]["mask"] for v in variants if v["role"] == "removed"}
                for rel, path in _export_masked_peers(run_dir, pruned, Path(tmp), (shape[0], shape[1])).items():
                    e = m["models"][rel]
                    variants.append({"name": f"masked:{Path(rel).stem}", "kind": "onnx", "path": path, "role": "masked",
                                     "model": None, "mask_of": rel, "routes": e["routes"], "flops_rel": None,
                                     "head_usage": e["head_usage"], "label": f"masked {_label(e)}"})
            if torch_peers:
                variants.append({"name": "torch-eager:full", "kind": "torch-run", "path": run_dir, "role": "torch",
                                 "model": None, "routes": [], "flops_rel": 1.0, "head_usage": 1.0,
                                 "label": "full (PyTorch eager)"})
        log(f"benchmarking {len(variants)} variants on {device}, batches {list(batches)}, {threads} threads, "
            f">= {runs} runs each over {rounds} interleaved rounds, one process per variant per round")
        results = time_variants(variants, shape, threads, batches, runs, rounds, warmup_s, device=device, log=log)
    result = {"title": f"bundle {bundle_dir.name}", "bundle": str(bundle_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": machine(threads, device), "batches": list(batches), "runs": runs, "rounds": rounds,
              "method": "one process per variant per round, rounds interleaved with rotating order; warm-up "
                        f"{warmup_s}s then timed calls; median/p10/p90 over all rounds",
              "variants": results, "notes": notes}
    return finish(result, out_path, log)


def run_synthetic(name: str, out_path, threads: int = 2, batches: Sequence[int] = (1, 8), runs: int = 50,
                  rounds: int = 2, warmup_s: float = 0.5, device: str = "cpu", log=print) -> dict:
    """Random-weight timm model (e.g. DeiT-S) with the same kept-head count in every layer: removed vs masked."""
    if name not in SYNTHETIC:
        raise UserError(f"unknown synthetic model {name!r}: use one of {', '.join(SYNTHETIC)}")
    _check_device(device)
    import timm
    import torch

    from steerprune.export.onnx_export import MaskedLogits, check_onnx, export_onnx
    from steerprune.export.prune import manual_attention, prune_vit
    from steerprune.training.model import GatedViT, head_flops

    timm_name, keeps = SYNTHETIC[name]
    torch.manual_seed(0)
    vit = timm.create_model(timm_name, pretrained=False).eval()
    depth, H = len(vit.blocks), vit.blocks[0].attn.num_heads
    shape = (3, vit.patch_embed.img_size[0], vit.patch_embed.img_size[1])
    gated = GatedViT(vit).eval()
    variants, notes = [], [f"random weights ({timm_name}, pretrained=False); masks keep heads 0..k-1 in every layer"]
    with tempfile.TemporaryDirectory(prefix="steerprune-synth-") as tmp:
        tmp = Path(tmp)
        full = export_onnx(manual_attention(vit), tmp / "full.onnx", 3, shape[1])
        variants.append({"name": "full", "kind": "onnx", "path": full, "role": "full", "flops_rel": 1.0,
                         "head_usage": 1.0, "label": f"full {H}/{H} (ONNX)"})
        for k in keeps:
            mask = [[1] * k + [0] * (H - k) for _ in range(depth)]
            path = export_onnx(prune_vit(vit, mask), tmp / f"keep{k}.onnx", 3, shape[1])
            parity = check_onnx(path, MaskedLogits(gated, mask), 3, shape[1], batches=(2,))
            log(f"{timm_name} keep {k}/{H}: ONNX vs gated torch max |diff| {parity.max_abs['2']:.1e}")
            variants.append({"name": f"removed:keep{k}", "kind": "onnx", "path": path, "role": "removed",
                             "flops_rel": head_flops(vit, mask)["rel"], "head_usage": k / H, "parity": parity.max_abs,
                             "label": f"removed {k}/{H} heads"})
        k = sorted(keeps)[len(keeps) // 2]
        mask = [[1] * k + [0] * (H - k) for _ in range(depth)]
        variants.append({"name": f"masked:keep{k}", "kind": "onnx", "role": "masked", "flops_rel": None,
                         "path": export_onnx(MaskedLogits(gated, mask), tmp / f"masked{k}.onnx", 3, shape[1]),
                         "head_usage": k / H, "label": f"masked {k}/{H} heads"})
        variants.append({"name": "torch-eager:full", "kind": "torch-timm", "path": timm_name, "role": "torch",
                         "flops_rel": 1.0, "head_usage": 1.0, "label": "full (PyTorch eager)"})
        log(f"benchmarking {len(variants)} variants of {timm_name} on {device}, batches {list(batches)}, "
            f"{threads} threads")
        results = time_variants(variants, shape, threads, batches, runs, rounds, warmup_s, device=device, log=log)
    result = {"title": f"synthetic {timm_name}", "synthetic": timm_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": machine(threads, device), "batches": list(batches), "runs": runs, "rounds": rounds,
              "method": "one process per variant per round, rounds interleaved with rotating order",
              "variants": results, "notes": notes}
    return finish(result, Path(out_path), log)


def _label(entry: dict) -> str:
    kept = sum(map(sum, entry["mask"]))
    total = sum(len(r) for r in entry["mask"])
    routes = ",".join(entry["routes"][:3]) + ("..." if len(entry["routes"]) > 3 else "")
    return f"{kept}/{total} [{routes}]"


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
