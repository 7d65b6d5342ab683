"""Compare the head policies of two runs on the same splits: accuracy, NLL and head usage on val and test, the
full (all heads) model beside each, and the images only one of them gets right (McNemar's discordant pairs).

    python benchmarks/compare_policies.py runs/cifar10_lr1e-4 runs/cifar10 --out benchmarks/results/policy_compare_cifar10.json

Both runs must share the dataset and split (same data spec, seed and val fraction), as runs trained from one
backbone checkpoint do.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> int:
    import torch

    from steerprune.training.metrics import mcnemar_p
    from steerprune.training.run import load_run
    from steerprune.training.forward import run_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    report, correct = {"runs": [args.run_a, args.run_b], "splits": {}}, {}
    labels = {}
    for name in (args.run_a, args.run_b):
        run = load_run(name, need=("backbone", "policy"))
        data = run.load_data()
        gated = run.model.policy.cfg.gated_layers
        for split in ("val", "test"):
            s = getattr(data, split)
            if split in labels and not np.array_equal(labels[split], s.labels):
                print(f"{name}: its {split} split differs from {args.run_a}'s; the runs are not comparable", file=sys.stderr)
                return 2
            labels[split] = s.labels
            out = run_model(run.model, s.images, run.backbone)
            full = run_model(run.model, s.images, run.backbone, head_mask=torch.ones(run.model.depth, run.model.num_heads))
            y = torch.as_tensor(s.labels)
            logits = torch.as_tensor(out.logits).float()
            hit = (logits.argmax(-1) == y).numpy()
            correct[(name, split)] = hit
            report["splits"].setdefault(split, {})[name] = {
                "policy_acc": float(hit.mean()),
                "policy_nll": float(-logits.log_softmax(-1)[torch.arange(len(y)), y].mean()),
                "head_usage": float(torch.as_tensor(out.masks)[:, gated].float().mean()),
                "full_acc": float((torch.as_tensor(full.logits).argmax(-1) == y).float().mean()),
            }
    for split in ("val", "test"):
        a, b = correct[(args.run_a, split)], correct[(args.run_b, split)]
        only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
        report["splits"][split]["discordant"] = {"only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)}
        for name in (args.run_a, args.run_b):
            r = report["splits"][split][name]
            print(f"{split:4s} {name}: policy acc {r['policy_acc']:.4f} NLL {r['policy_nll']:.4f} usage {r['head_usage']:.3f}; "
                  f"full acc {r['full_acc']:.4f}")
        print(f"{split:4s} right only under {args.run_a}: {only_a}, only under {args.run_b}: {only_b} "
              f"(McNemar p {report['splits'][split]['discordant']['mcnemar_p']:.2g})")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
