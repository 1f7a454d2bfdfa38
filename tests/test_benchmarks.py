"""The GFCG benchmark's statistics and its end-to-end smoke run (tiny random networks)."""

import csv

import pytest
import torch
from scipy.stats import binomtest

from benchmarks.gfcg import Row, best_cfg_at_fd, main, mcnemar_p


@pytest.mark.parametrize(("n", "p_a", "p_b", "seed"), [(400, 0.95, 0.9, 0), (60, 0.5, 0.5, 1), (2000, 0.99, 0.98, 2)])
def test_mcnemar_p_matches_the_exact_binomial_test_on_discordant_pairs(n, p_a, p_b, seed):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, generator=generator) < p_a, torch.rand(n, generator=generator) < p_b
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    assert mcnemar_p(a, b) == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-12)
    assert mcnemar_p(a, b) == pytest.approx(mcnemar_p(b, a), rel=1e-12)


def test_mcnemar_p_is_one_without_discordant_pairs():
    verdicts = torch.tensor([True, False, True])
    assert mcnemar_p(verdicts, verdicts.clone()) == 1.0


def _row(method: str, accuracy: float, fd: float) -> Row:
    return Row(method, "w=1", accuracy, accuracy, fd, 0.9, 0.9, 50.0, 25, 1.0, correct=torch.ones(1, dtype=torch.bool))


def test_best_cfg_at_fd_takes_the_most_accurate_cfg_run_not_worse_in_fd():
    rows = [_row("CFG", 0.97, 10.0), _row("CFG", 0.99, 12.0), _row("CFG", 1.0, 30.0), _row("GFCG", 1.0, 5.0)]
    assert best_cfg_at_fd(rows, 9.0) is None
    assert best_cfg_at_fd(rows, 10.0).accuracy == 0.97
    assert best_cfg_at_fd(rows, 29.9).accuracy == 0.99
    assert best_cfg_at_fd(rows, 100.0).accuracy == 1.0


def test_smoke_run_writes_one_row_per_configuration(tmp_path):
    main(["--smoke", "--out", str(tmp_path), "--threads", "1", "--cfg-scales", "1", "1.5", "--gfcg-scales", "1",
          "--combined-lambdas", "0.5", "--variant-lambda", "1"])
    with open(tmp_path / "gfcg.csv") as handle:
        rows = list(csv.DictReader(handle))
    # CFG at 2 scales, GFCG at 1 lambda, GFCG+CFG and its previous-x0 variant at the one scale above 1
    assert [(row["method"], row["scale"]) for row in rows] == [
        ("CFG", "w=1"), ("CFG", "w=1.5"), ("GFCG", "lambda=1"), ("GFCG+CFG (lambda=0.5)", "w=1.5"),
        ("GFCG+CFG (lambda=1, previous x0)", "w=1.5"),
    ]
    assert [float(row["nfe"]) for row in rows][:2] == [3.0, 6.0]  # 3 DDIM steps: 1 and 2 forwards per step
    table = (tmp_path / "gfcg.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "of 2 ('none'" in table
    assert (tmp_path / "gfcg.png").stat().st_size > 0


def test_schedules_smoke_run_writes_the_table_the_claim_and_the_plot(tmp_path):
    from benchmarks.schedules import main as schedules_main

    schedules_main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    with open(tmp_path / "schedules.csv") as handle:
        rows = list(csv.DictReader(handle))
    nfe = {(row["method"], row["scale"]): float(row["nfe"]) for row in rows}
    assert nfe[("CFG", "w=3")] == 8 and nfe[("conditional", "w=1")] == 4  # 4 DDIM steps
    interval = next(row for row in rows if row["method"] == "interval")
    assert float(interval["nfe"]) < 8
    table = (tmp_path / "schedules.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "Claim (interval vs CFG)" in table
    assert (tmp_path / "schedules_chosen_scales.png").stat().st_size > 0


def test_attach_overhead_smoke_run_times_every_candidate(tmp_path):
    from benchmarks.attach_overhead import main as attach_overhead

    rows = attach_overhead(["--smoke", "--workdir", str(tmp_path)])
    assert [row["name"] for row in rows] == [
        "plain CFG", "attached CFG", "attached APG", "attached AG", "attached CFG+TAG",
    ]
    nfe = {row["name"]: row["nfe"] for row in rows}
    assert nfe["plain CFG"] == nfe["attached CFG"] == nfe["attached APG"] == nfe["attached CFG+TAG"] == 8
    assert nfe["attached AG"] < 8  # calibrated to switch after half of the 4 steps
    assert all(row["median"] > 0 and row["ratio"] > 0 for row in rows)


def test_gpu_throughput_smoke_run_covers_every_candidate(tmp_path):
    from benchmarks.gpu_throughput import main as throughput

    rows = throughput(["--smoke", "--workdir", str(tmp_path)])
    names = ["plain CFG", "Guided* CFG", "cfg", "apg", "ag", "tag", "tag-cfg", "nlg", "gfcg"]
    assert [row["name"] for row in rows] == names * 2  # batch 1 and 2
    nfe = {row["name"]: row["nfe"] for row in rows if row["batch"] == 2}
    assert nfe["plain CFG"] == nfe["cfg"] == nfe["apg"] == nfe["tag"] == nfe["Guided* CFG"] == 4  # 2 DDIM steps
    assert nfe["nlg"] == 4 + 2 * 2 and nfe["ag"] <= 4 and nfe["gfcg"] > 4
    assert all(row["images_per_second"] > 0 for row in rows)


def test_autoguidance_smoke_run_writes_every_configuration_and_the_claims(tmp_path):
    from benchmarks.autoguidance import main as autoguidance

    rows = autoguidance(["--smoke", "--out", str(tmp_path), "--scales", "2", "--variant-scale", "2"])
    assert [(row.method, row.scale) for row in rows] == [
        ("unguided", "w=1"), ("CFG", "w=2"), ("Autoguidance", "w=2"), ("GFCG+Autoguidance", "w=2"),
        ("GFCG+Autoguidance (additive)", "w=2"), ("GFCG+Autoguidance (exclude_target)", "w=2"),
        ("unguided (other seed)", "w=1"),
    ]
    # 3 DDIM steps: the guided rows spend one row of each network per step, CFG two of the main one
    assert [row.nfe_per_network for row in rows][:4] == [
        {"main": 3.0}, {"main": 6.0}, {"main": 3.0, "guiding": 3.0}, {"main": 3.0, "guiding": 3.0},
    ]
    table = (tmp_path / "autoguidance.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "Claim 1" in table and "Claim 2" in table
    assert (tmp_path / "autoguidance.png").stat().st_size > 0


def test_nlg_default_smoke_run_writes_every_row_the_pooled_ratios_and_the_verdict(tmp_path):
    """Two tiny seed sets on the committed weak checkpoint: the table has every row (the default clip is 0.5 scaled
    from 4x96x96 to 64 elements), the base's ratios are 1, NLG's NFE include its 20 refinement iterations, and the
    verdict on the bar is printed."""
    import csv
    import re

    from benchmarks.nlg_default import main as nlg_default

    out = tmp_path / "nlg"
    nlg_default(["--sets", "2", "--per-class", "3", "--steps", "2", "--out", str(out)])
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [row["method"].split(" (")[0].split(",")[0] for row in rows] == [
        "base", "NLG default", "NLG tau=0.0312", "NLG tau=0.0156"]
    assert float(rows[0]["pooled_ratio"]) == 1.0 and float(rows[0]["ratio_sd"]) == 0.0
    assert "tau=0.0208" in rows[1]["method"] and float(rows[1]["nfe"]) == 2 + 2 * 20
    table = out.with_suffix(".md").read_text()
    assert re.search(r"^Bar \(issue 17.*at the default: (holds|does not hold) \(", table, re.MULTILINE)
