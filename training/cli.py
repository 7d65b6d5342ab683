"""`steerprune train`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerprune.errors import UserError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the ViT backbone, the head policy and the SAE(s) into RUN",
                       description="Train the ViT backbone, the AdaViT-style head policy and TopK SAE(s) into RUN.")
    p.add_argument("run", help="run directory (created if missing)")
    p.add_argument("--data", default=None, help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH (default: the run's "
                   "recorded data for a later stage, else digits)")
    p.add_argument("--preset", default=None, help="digits | cifar | cifar-gpu | custom (default: cifar for CIFAR data, digits otherwise; "
                   "cifar-gpu is a ViT-S-class model for a GPU)")
    p.add_argument("--stage", default="all", choices=["backbone", "policy", "sae", "all"])
    p.add_argument("--model", dest="model_name", help="timm ViT/DeiT name (pretrained=False), overrides the preset")
    p.add_argument("--model-kwargs", type=json.loads, default=None, help='JSON timm kwargs, e.g. \'{"depth": 4}\'')
    p.add_argument("--img-size", type=int)
    p.add_argument("--checkpoint", help="initialise the backbone from this .safetensors / .pth state dict")
    p.add_argument("--resume", action="store_true", help="continue backbone training from RUN/checkpoints")
    p.add_argument("--seed", type=int)
    p.add_argument("--val-fraction", type=float, help="share of train held out for validation (choices are made on it)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--amp", choices=["auto", "none", "bf16"],  # training.device.AMP_MODES (torch-free here)
                   help="bf16 autocast: auto = where the device has native bf16 (default of the cifar presets)")
    p.add_argument("--warmup-epochs", type=int, help="epochs of linear learning-rate warmup (cifar preset: 2)")
    p.add_argument("--label-smoothing", type=float, help="label smoothing of the backbone's loss (default 0.1)")
    p.add_argument("--randaugment", help="timm RandAugment policy for backbone training, e.g. rand-m9-mstd0.5 "
                                         "(default: off)")
    p.add_argument("--mixup", type=float, help="Mixup alpha for backbone training (default 0: off)")
    p.add_argument("--cutmix", type=float, help="CutMix alpha for backbone training (default 0: off)")
    p.add_argument("--policy-epochs", type=int)
    p.add_argument("--target-usage", type=float)
    p.add_argument("--policy-noise-end", type=float,
                   help="Gumbel noise scale at the end of policy training, annealed from 1 (0: end on eval's masks)")
    p.add_argument("--distill-weight", type=float, help="KL to the untuned backbone during policy training (0: off)")
    p.add_argument("--layer-targets", type=lambda s: [float(x) for x in s.split(",")],
                   help="comma-separated usage target per gated layer")
    p.add_argument("--layer-weight", type=float,
                   help="weight of the per-layer usage term (default 1; 0 lets the policy spread the budget freely)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--gated-layers", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--finetune-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="train the backbone jointly with the policy (default: the preset's choice)")
    p.add_argument("--policy-lr", type=float, help="policy learning rate")
    p.add_argument("--finetune-lr", type=float, help="backbone learning rate during joint tuning (default: the preset's; cifar 3e-4, else --lr / 10)")
    p.add_argument("--sae-layers", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--sae-k", type=int)
    p.add_argument("--sae-expansion", type=int)
    p.add_argument("--sae-steps", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train: auto (CUDA when available, else the CPU), cpu or cuda (default: auto)")
    p.set_defaults(func=_train)


_OVERRIDES = ("model_name", "model_kwargs", "img_size", "checkpoint", "seed", "val_fraction", "epochs", "batch_size", "lr",
              "warmup_epochs", "label_smoothing", "randaugment", "mixup", "cutmix", "amp", "policy_epochs",
              "target_usage", "policy_noise_end", "distill_weight", "layer_targets", "layer_weight", "temperature",
              "gated_layers", "finetune_backbone", "policy_lr", "finetune_lr", "sae_layers", "sae_k", "sae_expansion",
              "sae_steps")


def train_config_from_args(args):
    """(data spec, TrainConfig) of this invocation: a fresh backbone from the preset and the flags; a later stage
    from the run's record and the flags it owns (a contradicting flag is a UserError)."""
    from .pipeline import STAGES
    from .record import config_for_stage

    stages = STAGES if args.stage == "all" else (args.stage,)
    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    return config_for_stage(Path(args.run).expanduser(), stages, args.resume, args.data, args.preset, overrides)


def _train(args) -> int:
    import torch

    from .pipeline import run_training, summary_table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object")
    data_spec, tcfg = train_config_from_args(args)
    metrics = run_training(args.run, data_spec, tcfg, args.stage, args.resume, device=args.device)
    print(summary_table(metrics))
    print(f"wrote {args.run}/metrics.json")
    return 0
