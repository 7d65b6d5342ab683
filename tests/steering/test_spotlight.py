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
