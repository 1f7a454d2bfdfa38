"""The ``name@key=value`` syntax (``guidance.spec``) and intervals / schedules / DynamicCFG in the two CLIs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from guidance import APG, AdaptiveGuidance, DynamicCFG, GuidanceInterval, ScaleSchedule, from_config
from guidance.scorers import ClassifierScorer
from guidance.spec import parse_term, parse_value, term_config
from samples.evaluate.command import main as evaluate_main
from samples.evaluate.jobs import UsageError, build_guidance, method_config
from tests.test_evaluate import rows, tiny  # noqa: F401  (the tiny evaluation fixture)
from tests.test_generate import class_model, read_summary, run_main  # noqa: F401  (the tiny generation fixture)


def test_values_are_numbers_words_flags_and_lists():
    assert parse_value("3") == 3 and parse_value("0.28") == 0.28 and parse_value("inf") == math.inf
    assert parse_value("true") is True and parse_value("none") is None and parse_value("cosine") == "cosine"
    assert parse_value("0.28,2") == [0.28, 2] and parse_value("1,1.5,inf") == [1, 1.5, math.inf]
    with pytest.raises(ValueError, match="nan"):
        parse_value("nan")


def test_terms_nest_wrappers_left_to_right_with_the_scale_innermost():
    assert term_config("cfg@interval=0.28,2", 3.0) == {
        "name": "interval", "base": {"name": "cfg", "guidance_scale": 3.0}, "sigma_range": [0.28, 2]}
    config = term_config("apg@parallel_scale=0.5@interval=0.28,inf@ag=0.995@reduce=per-sample", 4.0)
    rule = from_config(config)
    assert isinstance(rule, AdaptiveGuidance) and rule.reduce == "per-sample" and rule.threshold == 0.995
    assert isinstance(rule.base, GuidanceInterval) and rule.base.sigma_range == (0.28, math.inf)
    apg = rule.base.base
    assert isinstance(apg, APG) and apg.parallel_scale == 0.5 and apg.guidance_scale == 4.0
    schedule = from_config(term_config("cfg@schedule=cosine", 2.5))
    assert isinstance(schedule, ScaleSchedule) and schedule.schedule == "cosine" and schedule.base.guidance_scale == 2.5
    dynamic = from_config({**term_config("dynamic-cfg@scales=1,2,4", None), "scorer": lambda c, s: c.sum((2,))})
    assert isinstance(dynamic, DynamicCFG) and dynamic.scales == (1.0, 2.0, 4.0)
    assert term_config("tag", 3.0) == {"name": "tag"}  # TAG takes no guidance_scale


@pytest.mark.parametrize(("term", "match"), [
    ("cfg@interval", "expected @KEY=VALUE"), ("cfg@=3", "expected @KEY=VALUE"), ("cfg@interval=", "expected"),
    ("nope@interval=1,2", "unknown guidance 'nope'"), ("cfg@eta=1@eta=2", "given twice"), ("cfg@base=apg", "nesting"),
])
def test_bad_terms_are_refused(term, match):
    with pytest.raises(ValueError, match=match):
        parse_term(term)


def test_evaluate_method_configs_and_json_scorer_options():
    label, config = method_config("cfg@interval=0.28,2", 3.0)
    assert label == "cfg@interval=0.28,2" and config["name"] == "interval" and config["base"]["guidance_scale"] == 3.0
    assert method_config("dynamic-cfg", 2.0)[1] == {"name": "dynamic-cfg", "guidance_scale": 2.0}
    text = 'capped={"name": "dynamic-cfg", "scales": [1, 2, "$scale"], "scorer": {"name": "classifier", "cap": 0.9}}'
    label, config = method_config(text, 3.0)
    assert label == "capped" and config["scales"] == [1, 2, 3.0]
    net = torch.nn.Linear(64, 10)
    rule = build_guidance(config, {"classifier": net})
    assert isinstance(rule._score, ClassifierScorer) and rule._score.classifier is net and rule._score.cap == 0.9
    with pytest.raises(UsageError, match="unknown guidance"):
        method_config("cfg@nope=1+nope", 3.0)


def test_generate_runs_intervals_schedules_and_dynamic_cfg(class_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    specs = ["cfg", "cfg@interval=0,inf", "cfg@interval=1000,inf", "cfg@schedule=constant", "cfg@schedule=linear"]
    code, _, err = run_main(["--model", class_model, "--guidance", *specs, "--steps", "3", "--num-images", "1",
                             "--class-label", "0", "3", "--out", str(out)], capsys)
    assert code == 0, err
    nfe = {r["method"]: float(r["nfe_per_image"]) for r in read_summary(out)}
    assert nfe == {"cfg": 6, "cfg@interval=0,inf": 6, "cfg@interval=1000,inf": 3, "cfg@schedule=constant": 6,
                   "cfg@schedule=linear": 6}
    config = {r["method"]: json.loads(r["config"]) for r in read_summary(out)}
    assert config["cfg@interval=0,inf"]["sigma_range"] == [0.0, math.inf]


@pytest.mark.parametrize(("spec", "message"), [
    ("cfg@interval=2,1", "sigma_range is inverted"), ("cfg@interval", "expected @KEY=VALUE"),
    ("cfg@schedule=exponential", "schedule must be one of"), ("dynamic-cfg", "needs classifier"),
])
def test_generate_bad_specs_give_one_line(spec, message, class_model, tmp_path, capsys):  # noqa: F811
    code, _, err = run_main(["--model", class_model, "--guidance", spec, "--steps", "2", "--out", str(tmp_path / "o")],
                            capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_evaluate_runs_interval_and_dynamic_cfg_cells(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    args = ["--model", str(tiny / "model"), "--evaluator", str(tiny / "evaluator"), "--classifier",
            str(tiny / "classifier"), "--methods", "cfg", "cfg@interval=0,inf", "dynamic-cfg", "--scales", "3",
            "-n", "4", "--steps", "3", "-o", str(out)]
    assert evaluate_main(args) == 0
    table = {r["method"]: r for r in rows(out)}
    assert table["cfg@interval=0,inf"]["nfe_per_image"] == table["cfg"]["nfe_per_image"] == 6
    assert table["cfg@interval=0,inf"]["fd"] == pytest.approx(table["cfg"]["fd"], rel=1e-6)
    assert table["dynamic-cfg"]["nfe_per_image"] == 6
    assert table["dynamic-cfg"]["config"] == {"name": "dynamic-cfg", "guidance_scale": 3.0}
