"""RUN/train_config.json, the run's training record, and the rules a later stage follows.

The backbone stage (fresh, or `--stage all`) writes the record: the data spec, the whole TrainConfig and the
library versions. A *later* stage (policy, sae, or a resumed backbone) continues that run, so

- the data spec, seed, val_fraction and img_size come from the record (they define the train/val/test splits: a
  different seed would move validation images into training); a contradicting value is refused;
- it may change only the settings it owns (the policy's for `--stage policy`, the SAE's for `--stage sae`, the
  schedule for a resumed backbone); the backbone's settings stay as recorded;
- the record is updated only after the stage's checks have passed, and only in the fields the stage owns.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Optional

from steerprune.errors import UserError

from .config import TrainConfig
from .run import read_json, versions, write_json

__all__ = ["RECORD", "SPLIT_FIELDS", "MODEL_FIELDS", "POLICY_FIELDS", "SAE_FIELDS", "read_record", "is_continuation",
           "owned_fields", "config_for_stage", "check_against_record", "write_record", "update_record"]

RECORD = "train_config.json"
SPLIT_FIELDS = ("seed", "val_fraction", "split", "img_size")
MODEL_FIELDS = ("preset", "model_name", "model_kwargs", "checkpoint")
POLICY_FIELDS = ("policy_epochs", "policy_lr", "finetune_backbone", "finetune_lr", "target_usage", "policy_noise_end",
                 "distill_weight", "layer_targets", "temperature", "usage_weight", "layer_weight", "gated_layers")
SAE_FIELDS = ("sae_layers", "sae_expansion", "sae_k", "sae_steps", "sae_lr", "sae_batch_size", "sae_aug_passes")
_ALL = tuple(f.name for f in fields(TrainConfig))
_FLAGS = {"model_name": "--model"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _norm(v):
    return json.loads(json.dumps(v))  # tuples vs lists, ints vs floats as JSON stores them


def read_record(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / RECORD
    return read_json(path) if path.exists() else None


def is_continuation(stages: tuple[str, ...], resume: bool, record: Optional[dict]) -> bool:
    """A later stage, or a resumed backbone of a recorded run: it must follow the record."""
    return "backbone" not in stages or (resume and record is not None)


def owned_fields(stages: tuple[str, ...], resume: bool) -> set[str]:
    """TrainConfig fields that running `stages` may set; every other field must equal the record."""
    if "backbone" in stages and not resume:
        return set(_ALL)
    own: set[str] = set()
    if "backbone" in stages:  # resumed: the schedule may be extended, the model and the splits may not change
        own |= set(_ALL) - set(SPLIT_FIELDS) - set(MODEL_FIELDS)
    if "policy" in stages:
        own |= set(POLICY_FIELDS)
    if "sae" in stages:
        own |= set(SAE_FIELDS)
    return own


def _recorded_config(record: dict, run_dir: Path) -> TrainConfig:
    train = record.get("train")
    if not isinstance(train, dict) or "data" not in record:
        raise UserError(f"{Path(run_dir) / RECORD} has no 'data' and 'train' entries")
    try:
        # a record from before the sklearn split has no "split": it keeps the legacy one its splits were drawn with
        return TrainConfig(**{"split": "legacy", **{k: v for k, v in train.items() if k in _ALL}})
    except TypeError as e:
        raise UserError(f"{Path(run_dir) / RECORD} is invalid: {e}") from None


def _same_data(given: str, recorded: str) -> bool:
    """The same spec, or the same kind with paths that resolve to the same folder from here."""
    if given.strip() == recorded.strip():
        return True
    (k1, _, p1), (k2, _, p2) = given.partition(":"), recorded.partition(":")
    if k1.strip().lower() != k2.strip().lower() or not p1 or not p2:
        return False
    a, b = Path(p1).expanduser(), Path(p2).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _untrained(run_dir: Path) -> UserError:
    missing = "backbone.json" if not (Path(run_dir) / "backbone.json").exists() else RECORD
    return UserError(f"{run_dir} has no {missing}: train its backbone first (`steerprune train {run_dir} --data ...`)")


def _contradiction(run_dir: Path, what: list[str]) -> UserError:
    return UserError(f"{', '.join(what)} contradict{'s' if len(what) == 1 else ''} the run's record "
                     f"({Path(run_dir) / RECORD}): a later stage uses the recorded data, splits and backbone settings; "
                     f"drop the flag or train a new run")


def config_for_stage(run_dir: Path, stages: tuple[str, ...], resume: bool, data_spec: Optional[str],
                     preset: Optional[str], overrides: dict) -> tuple[str, TrainConfig]:
    """The data spec and TrainConfig a CLI invocation runs with. `overrides` holds the flags given (None: not given).

    Fresh backbone: the preset (default: cifar for CIFAR data, digits otherwise) with the flags; the data defaults
    to the record's, else digits. Later stage: the record with the flags it owns; any other flag must agree."""
    record = read_record(run_dir)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not is_continuation(stages, resume, record):
        spec = data_spec or (record["data"] if record and "data" in record else "digits")
        if preset is None:
            preset = "custom" if given.get("model_name") else (
                "cifar" if spec.lower().startswith(("cifar10:", "cifar100:")) else "digits")
        return spec, TrainConfig.for_preset(preset, **given)
    if record is None:
        raise _untrained(run_dir)
    recorded = _recorded_config(record, run_dir)
    bad = []
    if data_spec is not None and not _same_data(data_spec, record["data"]):
        bad.append(f"--data {data_spec} (recorded {record['data']})")
    if preset is not None and preset != recorded.preset:
        bad.append(f"--preset {preset} (recorded {recorded.preset})")
    own = owned_fields(stages, resume)
    rec = asdict(recorded)
    for k, v in given.items():
        if k not in own and _norm(v) != _norm(rec[k]):
            bad.append(f"{_flag(k)} {v} (recorded {rec[k]})")
    if bad:
        raise _contradiction(run_dir, bad)
    return data_spec or record["data"], replace(recorded, **{k: v for k, v in given.items() if k in own})


def check_against_record(run_dir: Path, data_spec: Optional[str], tcfg: TrainConfig, stages: tuple[str, ...],
                         resume: bool) -> tuple[str, Optional[dict]]:
    """The data spec to load (the record's when None) and the record; refuses a later stage that contradicts it."""
    record = read_record(run_dir)
    if not is_continuation(stages, resume, record):
        return data_spec or (record or {}).get("data") or "digits", record
    if record is None:
        raise _untrained(run_dir)
    recorded = asdict(_recorded_config(record, run_dir))
    bad = [] if data_spec is None or _same_data(data_spec, record["data"]) else [f"data {data_spec} (recorded {record['data']})"]
    own = owned_fields(stages, resume)
    bad += [f"{k} {v} (recorded {recorded[k]})" for k, v in asdict(tcfg).items()
            if k not in own and _norm(v) != _norm(recorded[k])]
    if bad:
        raise _contradiction(run_dir, bad)
    return data_spec or record["data"], record


def write_record(run_dir: Path, data_spec: str, tcfg: TrainConfig) -> None:
    """A fresh backbone's record: the data spec, the whole TrainConfig, the versions."""
    write_json(Path(run_dir) / RECORD, {"data": data_spec, "train": asdict(tcfg), "versions": versions()})


def update_record(run_dir: Path, record: dict, tcfg: TrainConfig, stages: tuple[str, ...], resume: bool) -> dict:
    """After a later stage: its own fields take the values it ran with; the data and everything else stay."""
    own = owned_fields(stages, resume)
    new = dict(record, train={**record["train"], **{k: v for k, v in asdict(tcfg).items() if k in own}})
    new.setdefault("stage_versions", {}).update({s: versions() for s in stages})
    write_json(Path(run_dir) / RECORD, new)
    return new
