"""`steerprune train`: run the stages in order, write every artifact with its config, and the metrics."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from steerprune.errors import UserError

from .config import TrainConfig, backbone_config_for
from .data import load_data
from .device import resolve_amp, resolve_device
from .evaluate import evaluate_backbone, evaluate_policy, evaluate_sae
from .forward import run_model
from .loops import collect_policy_inputs, init_backbone, train_backbone, train_policy, train_sae
from .metrics import accuracy
from .model import BackboneConfig
from .record import check_against_record, is_continuation, update_record, write_record
from .run import load_run, read_json, sae_paths, save_module, write_json
from .sae import SAEConfig

__all__ = ["STAGES", "run_training", "summary_table"]

STAGES = ("backbone", "policy", "sae")


def run_training(run_dir: str | Path, data_spec: str | None, tcfg: TrainConfig, stage: str = "all",
                 resume: bool = False, log=print, device="cpu") -> dict:
    """Train the requested stage(s) into run_dir and return the updated metrics.

    A later stage (policy, sae, or a resumed backbone) follows RUN/train_config.json: `data_spec` None means the
    recorded one, and a data spec, split or backbone setting that contradicts the record is refused before anything
    is written (see `record`). The record is written once the stage's inputs have passed their checks."""
    run_dir = Path(run_dir).expanduser()
    if stage not in STAGES + ("all",):
        raise UserError(f"unknown stage '{stage}': use {', '.join(STAGES)} or all")
    stages = STAGES if stage == "all" else (stage,)
    device = resolve_device(device)
    tcfg = replace(tcfg, amp=resolve_amp(tcfg.amp, device, log))  # the record keeps what ran
    data_spec, record = check_against_record(run_dir, data_spec, tcfg, stages, resume)
    torch.manual_seed(tcfg.seed)
    data = load_data(data_spec, tcfg.val_fraction, tcfg.seed, tcfg.img_size, tcfg.split)
    log(f"data {data_spec}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
        f"{data.num_classes} classes, images {data.image_shape}; device {device}")
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    timings = metrics.setdefault("seconds", {})
    continuing = is_continuation(stages, resume, record)

    if "backbone" in stages:
        t0 = time.time()
        bcfg = backbone_config_for(tcfg, data)
        vit = init_backbone(bcfg, tcfg, log=log)  # builds the model and reads the checkpoint: both may refuse
        run_dir.mkdir(parents=True, exist_ok=True)
        if not continuing:
            write_record(run_dir, data_spec, tcfg)  # before training, so an interrupted run can --resume
        vit = train_backbone(run_dir, data, tcfg, bcfg, resume=resume, log=log, vit=vit, device=device)
        save_module(vit, run_dir / "backbone.safetensors")
        bcfg.save(run_dir / "backbone.json")
        for stale in ["policy.json", "policy.safetensors", *[p.name for p in run_dir.glob("sae_L*")]]:
            (run_dir / stale).unlink(missing_ok=True)  # later stages were trained on another backbone
        metrics = {"seconds": timings, "backbone": {
            "test_acc": evaluate_backbone(vit, data.test, bcfg), "val_acc": evaluate_backbone(vit, data.val, bcfg),
            "model_name": bcfg.model_name, "params": sum(p.numel() for p in vit.parameters()),
            "epochs": tcfg.epochs}}
        timings["backbone"] = round(time.time() - t0, 1)
        write_json(run_dir / "metrics.json", metrics)
        if continuing:
            record = update_record(run_dir, record, tcfg, ("backbone",), resume)
    run = load_run(run_dir)
    _check_data_matches(run.backbone, data)
    run.model.to(device)

    if "policy" in stages:
        t0 = time.time()
        model = train_policy(run.vit, data, tcfg, run.backbone, log=log, device=device)
        if tcfg.finetune_backbone:
            save_module(model.vit, run_dir / "backbone.safetensors")
            # the saved backbone is now the jointly tuned one: report its accuracy too
            metrics.setdefault("backbone", {})["test_acc_after_policy_finetune"] = evaluate_backbone(model.vit, data.test, run.backbone)
        save_module(model.policy, run_dir / "policy.safetensors")
        model.policy.save_config(run_dir / "policy.json")
        for stale in run_dir.glob("sae_L*"):
            stale.unlink()  # SAEs read the policy-gated residual: retrain them
        metrics.pop("sae", None)
        val_pred = run_model(model, data.val.images, run.backbone).logits.argmax(-1)
        metrics["policy"] = {**evaluate_policy(model, data.test, run.backbone), "config": asdict(model.policy.cfg),
                             "val_acc": accuracy(val_pred, data.val.labels)}
        timings["policy"] = round(time.time() - t0, 1)
        write_json(run_dir / "metrics.json", metrics)
        if continuing:
            record = update_record(run_dir, record, tcfg, ("policy",), resume)
        run = load_run(run_dir, need=("policy",))
        run.model.to(device)

    if "sae" in stages:
        if run.policy is None:
            raise UserError(f"{run_dir} has no head policy: train --stage policy first")
        t0 = time.time()
        gated = run.policy.cfg.gated_layers
        layers = tcfg.sae_layers if tcfg.sae_layers is not None else gated
        if not set(layers) <= set(gated):
            raise UserError(f"SAE layers {layers} must be gated layers {gated}")
        inputs = collect_policy_inputs(run.model, data.train, run.backbone, tcfg.sae_aug_passes, tcfg.crop_pad,
                                       data.hflip, tcfg.seed + 2)  # (N, G, D)
        for stale in run_dir.glob("sae_L*"):
            stale.unlink()
        per_layer = {}
        base = run_model(run.model, data.test.images, run.backbone, keep_inputs=True)  # shared by every layer's splice check
        for layer in layers:
            cfg = SAEConfig(d_in=run.vit.embed_dim, layer=layer, expansion=tcfg.sae_expansion, k=tcfg.sae_k)
            sae = train_sae(inputs[:, gated.index(layer)], cfg, tcfg.sae_steps, tcfg.sae_lr, tcfg.sae_batch_size,
                            tcfg.seed + 3 + layer, log=log, device=device)
            weights, config = sae_paths(run_dir, layer)
            save_module(sae, weights)
            sae.save_config(config)
            per_layer[str(layer)] = evaluate_sae(run.model, sae, data.test, run.backbone, inputs[:, gated.index(layer)], base)
            log(f"SAE L{layer}: FVU {per_layer[str(layer)]['fvu']:.4f} L0 {per_layer[str(layer)]['l0']:.1f} "
                f"dead {per_layer[str(layer)]['dead_fraction']:.3f}")
        last = per_layer[str(max(layers))]
        metrics["sae"] = {"layers": per_layer, "reported_layer": max(layers), "training_vectors": len(inputs),
                          **{k: last[k] for k in ("fvu", "l0", "dead_fraction", "splice_head_agreement",
                                                  "splice_pred_agreement")}}
        timings["sae"] = round(time.time() - t0, 1)
        write_json(run_dir / "metrics.json", metrics)
        if continuing:
            update_record(run_dir, record, tcfg, ("sae",), resume)
    return metrics


def _check_data_matches(bcfg: BackboneConfig, data) -> None:
    if bcfg.num_classes != data.num_classes:
        raise UserError(f"the run's backbone has {bcfg.num_classes} classes but {data.spec} has {data.num_classes}")
    if bcfg.in_chans != data.image_shape[2]:
        raise UserError(f"the run's backbone takes {bcfg.in_chans} channels but {data.spec} has {data.image_shape[2]}")


def summary_table(metrics: dict) -> str:
    rows = [("stage", "metric", "value")]
    b, p, s = metrics.get("backbone", {}), metrics.get("policy", {}), metrics.get("sae", {})
    if b:
        rows.append(("backbone", "test acc", f"{b['test_acc']:.4f}"))
    if p:
        rows += [("policy", "test acc", f"{p['test_acc']:.4f} (full {p['full_test_acc']:.4f})"),
                 ("policy", "head usage", f"{p['head_usage']:.3f} (target {p['config']['target_usage']})"),
                 ("policy", "layer usage", " ".join(f"L{k}:{v:.2f}" for k, v in p["layer_usage"].items()))]
    for layer, m in s.get("layers", {}).items():
        rows.append((f"sae L{layer}", "FVU / L0 / dead",
                     f"{m['fvu']:.4f} / {m['l0']:.1f} / {m['dead_fraction']:.3f}"))
        rows.append((f"sae L{layer}", "splice heads / preds",
                     f"{m['splice_head_agreement']:.3f} / {m['splice_pred_agreement']:.3f}"))
    for k, v in metrics.get("seconds", {}).items():
        rows.append(("time", k, f"{v:.0f} s"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    return "\n".join(lines)
