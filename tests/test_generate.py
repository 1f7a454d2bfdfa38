"""The main job ``guidance-generate``: default run, grid contents, other models, and one-line errors (exit 2)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from guidance import CFG, available_guidance
from pipelines import GuidedClassConditionalPipeline, GuidedStableDiffusionPipeline
from samples.generate import command as generate
from samples.generate.grid import HEADER, GridLayout, cell_size
from samples.loading import SCHEDULERS, load_pipeline, looks_like_path, set_scheduler
from tests.tiny import tiny_sd_components

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random class-conditional UNet2DModel pipeline (10 classes + null label 10, 8x8x1), saved."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=11,
    )
    folder = tmp_path_factory.mktemp("class_model")
    GuidedClassConditionalPipeline(DDPMScheduler(clip_sample=False), unet=unet, null_class_label=10).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Stable Diffusion pipeline, saved."""
    folder = tmp_path_factory.mktemp("sd_model")
    GuidedStableDiffusionPipeline(**tiny_sd_components(folder / "parts")).save_pretrained(folder / "pipe")
    return str(folder / "pipe")


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = generate.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_registered_method_gets_a_row_and_a_summary_line(class_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_main(
        ["--model", class_model, "--steps", "3", "--num-images", "1", "--class-label", "0", "3", "--scale", "3",
         "--out", str(out)],
        capsys,
    )
    assert code == 0
    methods = generate.default_methods()
    rows = read_summary(out)
    assert [r["method"] for r in rows] == methods and methods[0] == "cfg"
    by_name = {r["method"]: r for r in rows}
    assert float(by_name["cfg"]["nfe_per_image"]) == 2 * 3  # uncond + cond at each of 3 steps
    if "tag" in by_name:
        assert float(by_name["tag"]["nfe_per_image"]) == 3  # conditional sampling, no extra evaluations
    if "linear-ag" in by_name:  # coefficients fitted on the fly: step 1's unconditional evaluation is estimated
        assert float(by_name["linear-ag"]["nfe_per_image"]) <= 2 * 3 - 1
        assert "fitted on the fly" in by_name["linear-ag"]["note"]
    ran = [r for r in rows if r["nfe_per_image"] != "-"]
    skipped = [r for r in rows if r["nfe_per_image"] == "-"]
    assert all(r["note"].startswith("skipped:") for r in skipped)
    if "gfcg" in by_name:  # no classifier ships with an arbitrary model
        assert by_name["gfcg"] in skipped
    if "autoguidance" in by_name:  # nor a guiding model
        assert by_name["autoguidance"] in skipped and "model=" in by_name["autoguidance"]["note"]
    assert all(r["accuracy"] == "-" for r in rows)  # no evaluation network for an arbitrary model
    text = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in text[2:]] == methods
    for name in methods:  # the printed table is the saved one
        assert any(line.startswith(name + " ") for line in stdout.splitlines())
    assert "total" in stdout

    grid = Image.open(out / "grid.png")
    cells = GridLayout(cell_size(8), per_column=1, label_width=0, title_height=HEADER).size(rows=len(ran), columns=2)
    assert grid.size[1] == cells[1] and grid.size[0] > cells[0]  # one row per method that ran, labels, a title


def test_grid_cells_are_the_pipeline_images_for_the_same_seeds(class_model, tmp_path, capsys):
    """Row 0 of the grid (CFG at --scale) equals a direct pipeline call with per-image seeds seed + k."""
    out = tmp_path / "out"
    args = ["--model", class_model, "--guidance", "cfg", "--steps", "3", "--num-images", "2", "--class-label", "1",
            "7", "--scale", "3", "--seed", "5", "--out", str(out)]
    assert run_main(args, capsys)[0] == 0
    pipe = GuidedClassConditionalPipeline.from_pretrained(class_model)
    generators = [torch.Generator().manual_seed(5 + k) for k in range(4)]
    expected = pipe([1, 1, 7, 7], guidance=CFG(3.0), num_inference_steps=3, generator=generators, output_type="pt").images
    expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()

    grid = np.asarray(Image.open(out / "grid.png").convert("L"))
    side = cell_size(8)
    factor = side // 8
    layout = GridLayout(side, 2, grid.shape[1] - GridLayout(side, 2, 0).size(1, 2)[0], title_height=HEADER)
    for k in range(4):
        x, y = layout.cell_origin(0, k // 2, k % 2)
        cell = grid[y : y + side, x : x + side]
        assert (cell[::factor, ::factor] == expected[k]).all()  # nearest-neighbour: every block is one pixel
        assert (cell == np.kron(expected[k], np.ones((factor, factor), dtype=np.uint8))).all()


def test_text_to_image_model_with_prompts(sd_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_main(
        ["--model", sd_model, "--prompt", "a red square", "a blue circle", "--negative-prompt", "blurry",
         "--guidance", "cfg", "apg", "--steps", "2", "--scheduler", "euler", "--out", str(out)],
        capsys,
    )
    assert code == 0
    rows = read_summary(out)
    assert [r["method"] for r in rows] == ["cfg", "apg"]
    assert [float(r["nfe_per_image"]) for r in rows] == [4, 4]
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == GridLayout(cell_size(32), 1, 0, title_height=HEADER).size(rows=2, columns=2)[1]


def test_scheduler_names_build_diffusers_schedulers_from_the_model_config(class_model):
    pipe = load_pipeline(class_model)
    for name, (cls, overrides) in SCHEDULERS.items():
        if name == "flow-euler":
            continue
        set_scheduler(pipe, name)
        assert type(pipe.scheduler) is cls
        assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.beta_schedule == "linear"
        assert not pipe.scheduler.config.get("clip_sample", False)  # the model's own setting is kept
        for key, value in overrides.items():
            assert pipe.scheduler.config[key] == value


def test_second_order_scheduler_counts_both_evaluations(class_model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", class_model, "--guidance", "cfg", "--steps", "2", "--num-images", "1", "--class-label", "2",
            "--scheduler", "heun", "--out", str(out)]
    assert run_main(args, capsys)[0] == 0
    assert float(read_summary(out)[0]["nfe_per_image"]) == 2 * 3  # Heun: 2 evaluations per step, 1 on the last


def test_hub_ids_and_paths_are_told_apart():
    assert not looks_like_path("stabilityai/stable-diffusion-2-1")
    assert not looks_like_path("gpt2")
    for path in ("./model", "/abs/model", "a/b/c", "~/model", "model_index.json"):
        assert looks_like_path(path)


def bad_argument_cases(class_model: str, sd_model: str, tmp: Path) -> dict[str, list[str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    return {
        "unknown guidance": ["--guidance", "no-such-method"],
        "unknown guidance in a composition": ["--model", class_model, "--guidance", "cfg+nope"],
        "two combine rules": ["--model", class_model, "--guidance", "cfg+apg"],
        "unknown scheduler": ["--scheduler", "no-such-sampler"],
        "flow scheduler on a VP model": ["--model", class_model, "--scheduler", "flow-euler"],
        "missing model path": ["--model", str(tmp / "missing" / "model")],
        "folder without model_index.json": ["--model", str(tmp / "empty")],
        "hub id offline": ["--model", "nobody-here/no-such-model"],
        "prompt to a class-conditional model": ["--model", class_model, "--prompt", "a cat"],
        "negative prompt to a class-conditional model": ["--model", class_model, "--negative-prompt", "a cat"],
        "class label too large": ["--model", class_model, "--class-label", "10"],
        "negative class label": ["--model", class_model, "--class-label", "-1"],
        "class label to a text-to-image model": ["--model", sd_model, "--prompt", "x", "--class-label", "1"],
        "text-to-image model without a prompt": ["--model", sd_model],
        "zero steps": ["--steps", "0"],
        "negative steps": ["--steps", "-2"],
        "zero images": ["--num-images", "0"],
        "bad dtype": ["--dtype", "float8"],
        "bad device": ["--device", "no-such-device"],
    }


CASES = list(bad_argument_cases("m", "s", Path("/tmp")))


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_give_one_line_and_exit_2(case, class_model, sd_model, tmp_path, capsys):
    args = bad_argument_cases(class_model, sd_model, tmp_path)[case] + ["--out", str(tmp_path / "out")]
    code, _, err = run_main(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("guidance-generate: error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif("gfcg" not in available_guidance(), reason="GFCG not registered")
def test_gfcg_by_name_without_classifier_is_an_error(class_model, tmp_path, capsys):
    code, _, err = run_main(["--model", class_model, "--guidance", "gfcg", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "classifier" in err


def test_guiding_model_option_runs_autoguidance_and_gfcg_on_top_of_it(class_model, tmp_path, capsys):
    """--guiding-model gives Autoguidance its guiding model (here a second copy of the model: 2 NFE per step)."""
    out = tmp_path / "out"
    args = ["--model", class_model, "--guiding-model", class_model, "--guidance", "autoguidance", "--scale", "3",
            "--steps", "3", "--num-images", "1", "--class-label", "0", "--out", str(out)]
    assert run_main(args, capsys)[0] == 0
    (row,) = read_summary(out)
    assert row["method"] == "autoguidance" and float(row["nfe_per_image"]) == 2 * 3
    assert f"guiding model {class_model}" in row["note"]
    assert json.loads(row["config"]) == {"name": "autoguidance", "guidance_scale": 3.0, "prediction_type": "epsilon"}


@pytest.mark.skipif(not generate.EMBEDDED_MODEL.is_dir(), reason="embedded digits model not trained yet")
def test_default_run_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_main(["--steps", "3", "--num-images", "1", "--out", str(out)], capsys)
    assert code == 0
    rows = read_summary(out)
    assert [r["method"] for r in rows] == generate.default_methods()
    assert "autoguidance" in available_guidance() and "gfcg+autoguidance" in generate.default_methods()
    for row in rows:  # the embedded model ships GFCG's classifier and a guiding model: nothing is skipped
        assert row["nfe_per_image"] != "-", row
        assert 0 <= float(row["accuracy"]) <= 1
    assert (out / "grid.png").is_file()


def test_module_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "samples.generate", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: guidance-generate" in result.stdout
    for name in available_guidance():
        assert name in result.stdout
