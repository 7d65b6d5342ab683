"""A run directory: every weight file (safetensors) has its JSON config beside it, so any stage reloads from RUN alone.

    RUN/backbone.safetensors + backbone.json      timm name and kwargs, classes, preprocessing
    RUN/policy.safetensors   + policy.json        PolicyConfig
    RUN/sae_L{l}.safetensors + sae_L{l}.json      SAEConfig, one per layer with an SAE
    RUN/train_config.json                         TrainConfig + data spec + versions
    RUN/metrics.json                              what `steerprune train` measured
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from steerprune.errors import UserError

from .model import BackboneConfig, GatedViT, build_vit
from .policy import HeadPolicy
from .sae import TopKSAE

__all__ = ["Run", "load_run", "save_module", "load_weights", "write_json", "read_json", "versions", "sae_paths"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "timm", "numpy", "onnx", "onnxruntime", "steerprune"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages may be absent
            pass
    return out


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=float) + "\n")


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def save_module(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {path}")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file must not surface as a traceback
        raise UserError(f"cannot read {path}: {e}") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")


@dataclass
class Run:
    path: Path
    backbone: BackboneConfig
    model: GatedViT  # model.policy is None if the policy stage has not run
    saes: dict[int, TopKSAE] = field(default_factory=dict)  # block index -> SAE
    train_config: dict = field(default_factory=dict)

    @property
    def policy(self) -> Optional[HeadPolicy]:
        return self.model.policy

    @property
    def vit(self) -> torch.nn.Module:
        return self.model.vit

    def load_data(self):
        """The run's dataset with the same train/val/test splits training used (val is for choices, test for reports)."""
        from .data import load_data

        if not self.train_config:
            raise UserError(f"{self.path} has no train_config.json: cannot recover its data splits")
        t = self.train_config["train"]
        # records written before the sklearn split carry no "split": they keep the split they were trained on
        return load_data(self.train_config["data"], t["val_fraction"], t["seed"], t.get("img_size"),
                         t.get("split", "legacy"))


def load_run(path: str | Path, need: tuple[str, ...] = ("backbone",)) -> Run:
    """Reload a run for later stages. `need` lists the stages that must be present ('backbone', 'policy', 'sae')."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    if not (path / "backbone.json").exists():
        raise UserError(f"{path} has no backbone.json: run `steerprune train {path} --data ...` first")
    try:
        bcfg = BackboneConfig.load(path / "backbone.json")
    except (TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'backbone.json'} is invalid: {e}") from None
    vit = build_vit(bcfg)
    load_weights(vit, path / "backbone.safetensors")
    policy = None
    if (path / "policy.json").exists():
        policy = HeadPolicy(HeadPolicy.load_config(path / "policy.json"))
        load_weights(policy, path / "policy.safetensors")
    elif "policy" in need:
        raise UserError(f"{path} has no head policy: run `steerprune train {path} --stage policy` first")
    saes = {}
    for cfg_file in sorted(path.glob("sae_L*.json")):
        sae = TopKSAE(TopKSAE.load_config(cfg_file))
        load_weights(sae, cfg_file.with_suffix(".safetensors"))
        saes[sae.cfg.layer] = sae.eval()
    if "sae" in need and not saes:
        raise UserError(f"{path} has no SAE: run `steerprune train {path} --stage sae` first")
    train_cfg = read_json(path / "train_config.json") if (path / "train_config.json").exists() else {}
    model = GatedViT(vit, policy).eval()
    return Run(path, bcfg, model, saes, train_cfg)


def sae_paths(run_dir: Path, layer: int) -> tuple[Path, Path]:
    return run_dir / f"sae_L{layer}.safetensors", run_dir / f"sae_L{layer}.json"

