"""The spotlight section reads a finished report: its numbers are the route's own, the paper's row only for bowl."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from steerprune.steering.render import spotlight_lines
from steerprune.steering.spotlight import PAPER_FIGURES, spotlight
from steerprune.training.metrics import binomial_ci

REPORT = Path(__file__).resolve().parents[2] / "examples" / "cifar10" / "steering" / "report.json"


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


def test_spotlight_takes_the_routes_own_figures(report):
    r = next(x for x in report["routes"] if x["name"] == "cat")
    sp = spotlight(report, "cat")
    assert sp["steered"]["head_usage"] == r["head_usage"] and sp["steered"]["acc"] == r["acc"]
    assert sp["unsteered"]["acc"] == r["baseline"]["acc"] and sp["unsteered"]["head_usage"] == r["baseline"]["head_usage"]
    assert sp["steered"]["latents"] == r["latents"] and sp["paired_vs_unsteered"] == r["paired_vs_baseline"]
    assert sp["shows_paper_phenomenon"] == (r["acc"] > r["baseline"]["acc"] and r["head_usage"] < r["baseline"]["head_usage"])
    assert sp["paper"] is None  # the paper has no figure for cat
    lf = next(x for x in report["label_free_routes"] if x["name"] == "cat")
    assert sp["label_free"]["acc"] == lf["acc"]
    assert sp["label_free"]["acc_ci95"] == pytest.approx(list(binomial_ci(round(lf["acc"] * r["n"]), r["n"])))
    for layer, ids in sp["label_free"]["latents_in_common"].items():
        assert set(ids) == set(r["latents"][layer]) & set(lf["latents"][layer])
    assert sp["self_reference"]["L5"]["precision_at_k"] == report["zero_shot"]["layers"]["L5"]["per_class"]["cat"]["precision_at_k"]


def test_spotlight_of_an_absent_route_is_none(report):
    assert spotlight(report, "bowl") is None


def test_bowl_gets_the_papers_row(report):
    rep = copy.deepcopy(report)
    for part in ("routes", "label_free_routes"):
        for r in rep[part]:
            if r["name"] == "cat":
                r["name"] = "bowl"
    sp = spotlight(rep, "bowl")
    assert sp["paper"] == PAPER_FIGURES["bowl"]
    text = "\n".join(spotlight_lines(sp))
    assert "## Spotlight: bowl" in text and "0.72 -> 0.33" in text and "76.0% -> 82.0%" in text
    assert f"{sp['steered']['head_usage']:.3f}" in text and "McNemar p" in text


C100 = REPORT.parents[2] / "cifar100"


def test_cifar100_reports_hold_together():
    """The committed CIFAR-100 reports: 100 class routes with the real bowl beside the paper, 20 superclass routes
    that partition the classes, and summaries (global mask included) that follow from their own rows."""
    rep = json.loads((C100 / "steering" / "report.json").read_text())
    groups = json.loads((C100 / "steering_groups" / "report.json").read_text())
    names = rep["class_names"]
    assert len(names) == 100 and [r["name"] for r in rep["routes"]] == names
    assert all(r["n"] == 100 and r["n_off_route"] == 500 for r in rep["routes"])
    bowl = next(x for x in rep["routes"] if x["name"] == "bowl")
    sp = next(x for x in rep["spotlight"] if x["name"] == "bowl")
    assert sp == spotlight(rep, "bowl") and sp["paper"] == PAPER_FIGURES["bowl"]
    assert sp["steered"]["head_usage"] == bowl["head_usage"] and sp["unsteered"]["acc"] == bowl["baseline"]["acc"]
    s = rep["summary"]
    assert s["mean_usage_after"] == pytest.approx(sum(r["head_usage"] for r in rep["routes"]) / 100, abs=1e-3)
    assert s["mean_acc_after"] == pytest.approx(sum(r["acc"] for r in rep["routes"]) / 100, abs=1e-4)
    g = s["global_mask"]["steered"]
    assert g["acc_diff"] == pytest.approx(g["routes_acc"] - g["acc"]) and g["head_usage"] >= g["routes_mean_usage"]
    covered = sorted(c for r in groups["routes"] for c in r["classes"])
    assert len(groups["routes"]) == 20 and covered == list(range(100))
    assert all(len(r["classes"]) == 5 and r["n"] == 500 for r in groups["routes"])
