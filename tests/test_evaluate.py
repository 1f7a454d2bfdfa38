"""``guidance-evaluate`` end to end on tiny random models: 1 process vs 2 processes, resume after a crash, the
Inception (TorchScript) path, text-to-image with a folder reference, and bad input (exit status 2)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from pipelines import GuidedClassConditionalPipeline, GuidedStableDiffusionPipeline
from samples.evaluate import shards
from samples.digits.nets import DigitClassifier, DigitEvaluator, save_network
from samples.evaluate.command import FAIL_AFTER_ENV, main
from samples.evaluate.jobs import batch_coupled, default_methods, method_config, plan_cells
from samples.metrics.features import InceptionExtractor, build_extractor, to_uint8
from tests.tiny import tiny_sd_components

REPO = Path(__file__).resolve().parents[1]
N = 10
COMMON = ["--methods", "cfg", "apg", "--scales", "1", "3", "-n", str(N), "--steps", "3", "--shard-size", "4"]
STABLE_KEYS = ("method", "scale", "num_samples", "fd", "precision", "recall", "class_accuracy", "saturation",
               "clipped_fraction", "nfe_per_image", "extractor", "cell")


class _StandInInception(torch.nn.Module):
    """Same call signature as inception-2015-12-05.pt: ``model(img, return_features=True)`` -> [B, F] (F = 2048 for
    the real one; 64 here, so that the Frechet distance's eigendecompositions stay cheap)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 64)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.shape[1] != 3 or img.dtype != torch.float32:
            raise ValueError("expects float32 RGB")
        if bool(img.min() < 0) or bool(img.max() > 255):
            raise ValueError("expects values in [0, 255]")
        pooled = torch.nn.functional.adaptive_avg_pool2d(img / 128 - 1, 1).flatten(1)
        features = torch.tanh(self.proj(pooled))
        return features if return_features else features[:, :10]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random class-conditional digits-shaped pipeline, two random evaluation networks, a stand-in Inception."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, num_class_embeds=11, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    GuidedClassConditionalPipeline(DDIMScheduler(clip_sample=False), unet=unet, null_class_label=10).save_pretrained(
        root / "model"
    )
    save_network(DigitEvaluator(width=8, feature_dim=16), root / "evaluator")
    save_network(DigitEvaluator(width=8, feature_dim=16), root / "evaluator2")
    save_network(DigitClassifier(width=8), root / "classifier")
    torch.jit.script(_StandInInception()).save(str(root / "inception.pt"))
    return root


def cli_args(tiny: Path, out: Path, batch: int = 4) -> list[str]:
    return ["--model", str(tiny / "model"), "--evaluator", str(tiny / "evaluator"), *COMMON,
            "--batch-size", str(batch), "-o", str(out)]


def rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def cell_images(out: Path) -> dict[str, np.ndarray]:
    images = {}
    for row in rows(out):
        samples, _ = shards.read_cell(out, shards.plan(row["cell"], N, 4))
        images[row["cell"]] = samples["images"]
    return images


@pytest.fixture(scope="module")
def single_run(tiny: Path) -> Path:
    out = tiny / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each process of the 2-process run
    try:
        assert main(cli_args(tiny, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_single_run_writes_table_plots_grids(single_run: Path) -> None:
    table = rows(single_run)
    assert [(r["method"], r["scale"]) for r in table] == [("cfg", 1.0), ("cfg", 3.0), ("apg", 1.0), ("apg", 3.0)]
    assert {r["nfe_per_image"] for r in table} == {3.0, 6.0}  # w = 1 evaluates the conditional branch only
    assert all(r["num_samples"] == N and r["extractor"].startswith("fd-digits/") for r in table)
    names = {p.name for p in single_run.iterdir()}
    assert {"results.csv", "fd_vs_scale.png", "precision_recall.png", "saturation_vs_scale.png", "grid_cfg.png",
            "grid_apg.png"} <= names
    header = (single_run / "results.csv").read_text().splitlines()[0]
    assert header.startswith("method,scale,num_samples,fd,precision,recall,class_accuracy,saturation")
    meta = json.loads((single_run / "results.json").read_text())
    assert meta["saturation"]["kind"] == "clipped-fraction" and meta["reference"]["num_images"] == 360


def test_two_processes_give_the_single_process_results(tiny: Path, single_run: Path) -> None:
    """torchrun with 2 CPU processes (and another batch size) -> the same images and metrics as 1 process."""
    out = tiny / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "samples.evaluate", *cli_args(tiny, out, batch=3)]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["settings"]["processes"] == 2
    one, two = rows(single_run), rows(out)
    assert [{k: r[k] for k in STABLE_KEYS} for r in one] == [{k: r[k] for k in STABLE_KEYS} for r in two]
    images_one, images_two = cell_images(single_run), cell_images(out)
    assert all(np.array_equal(images_one[key], images_two[key]) for key in images_one)


def test_resume_after_a_crash_completes_without_loss_or_duplicates(tiny: Path, single_run: Path, monkeypatch) -> None:
    out = tiny / "crashed"
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RuntimeError, match="test hook"):
        main(cli_args(tiny, out))
    finished = sorted(out.rglob("shard-*.npz"))
    assert len(finished) == 3
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in finished}
    monkeypatch.delenv(FAIL_AFTER_ENV)
    assert main([*cli_args(tiny, out), "--dry-run"]) == 0  # reports the pending work, generates nothing
    assert sorted(out.rglob("shard-*.npz")) == finished

    assert main(cli_args(tiny, out)) == 0
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == before[p] for p in finished)  # not recomputed
    assert len(list(out.rglob("shard-*.npz"))) == 4 * 3 and not list(out.rglob("*.tmp"))
    for key, images in cell_images(out).items():  # read_cell checks indices 0..N-1 exactly once
        assert len(images) == N and np.array_equal(images, cell_images(single_run)[key])
    assert [r["fd"] for r in rows(out)] == [r["fd"] for r in rows(single_run)]


def test_methods_with_supplied_arguments_gfcg_and_linear_ag(tiny: Path, tmp_path: Path) -> None:
    """GFCG gets the guidance classifier; LinearAG gets coefficients fitted per cell (once: a re-run reuses them)."""
    out = tmp_path / "out"
    args = ["--model", str(tiny / "model"), "--evaluator", str(tiny / "evaluator"), "--classifier",
            str(tiny / "classifier"), "--methods", "gfcg", "linear-ag", "--scales", "1", "3", "-n", "6", "--steps",
            "4", "-o", str(out)]
    assert main(args) == 0
    table = {(r["method"], r["scale"]): r for r in rows(out)}
    assert table["linear-ag", 1.0]["config"] == {"name": "cfg", "guidance_scale": 1.0}  # nothing to estimate at w=1
    assert table["linear-ag", 3.0]["nfe_per_image"] < 8  # estimated unconditional evaluations are not spent
    assert table["gfcg", 3.0]["config"]["name"] == "gfcg"
    meta = json.loads((out / "results.json").read_text())
    assert meta["supplied_arguments"]["classifier"].startswith("digits-classifier/")
    fitted = out / table["linear-ag", 3.0]["cell"] / "linear_ag_coefficients.safetensors"
    stamp = fitted.stat().st_mtime_ns
    assert main([*args, "-n", "8"]) == 0  # more samples (the last -n counts): new shards, the same coefficients
    assert fitted.stat().st_mtime_ns == stamp and rows(out)[0]["num_samples"] == 8


def test_autoguidance_and_gfcg_on_top_of_it_get_the_guiding_model(tiny: Path, tmp_path: Path, capsys) -> None:
    """--guiding-model supplies Autoguidance's model (nested in GFCG by gfcg+autoguidance); none for another model
    without it is one error line."""
    out = tmp_path / "out"
    args = ["--model", str(tiny / "model"), "--evaluator", str(tiny / "evaluator"), "--classifier",
            str(tiny / "classifier"), "--methods", "autoguidance", "gfcg+autoguidance", "--scales", "2", "-n", "6",
            "--steps", "3", "-o", str(out)]
    assert main([*args, "--guiding-model", str(tiny / "model")]) == 0
    table = {r["method"]: r for r in rows(out)}
    assert table["autoguidance"]["nfe_per_image"] == table["gfcg+autoguidance"]["nfe_per_image"] == 2 * 3
    nested = table["gfcg+autoguidance"]["config"]
    assert nested["name"] == "gfcg" and nested["autoguidance"]["name"] == "autoguidance"
    assert nested["confusion_scale"] == nested["autoguidance"]["guidance_scale"] == 2.0  # each rule's strength
    meta = json.loads((out / "results.json").read_text())
    assert meta["supplied_arguments"]["model"].startswith(str(tiny / "model"))
    assert main([*args, "-o", str(tmp_path / "other")]) == 2
    assert "--guiding-model" in capsys.readouterr().err


def test_inception_extractor_calls_the_torchscript_module_like_stylegan(tiny: Path, monkeypatch) -> None:
    gray = to_uint8(torch.rand(4, 1, 8, 8) * 2 - 1)
    extractor = InceptionExtractor(tiny / "inception.pt")
    assert extractor.id.startswith("inception-v3/") and len(extractor.id) == len("inception-v3/") + 12
    expected = torch.jit.load(str(tiny / "inception.pt"))(gray.repeat(1, 3, 1, 1).float(), return_features=True)
    assert np.allclose(extractor.extract(gray, batch_size=3), expected.detach().double().numpy(), atol=1e-6)
    monkeypatch.setenv("GUIDANCE_INCEPTION_WEIGHTS", str(tiny / "inception.pt"))
    assert build_extractor("auto", (3, 32, 32)).id == extractor.id  # env var -> Inception, any image size
    monkeypatch.delenv("GUIDANCE_INCEPTION_WEIGHTS")
    with pytest.raises(ValueError, match="--inception-weights"):
        build_extractor("auto", (3, 32, 32))
    with pytest.raises(ValueError, match="nothing is downloaded"):
        InceptionExtractor(tiny / "missing.pt")


def test_text_to_image_with_a_reference_folder_and_inception(tiny: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "sd"
    GuidedStableDiffusionPipeline(**tiny_sd_components(tmp_path)).save_pretrained(model)
    (tmp_path / "prompts.csv").write_text("id,prompt\n0,a red square\n1,a blue circle\n")
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(real / f"{k}.png")
    args = ["--model", str(model), "--prompts", str(tmp_path / "prompts.csv"), "--methods", "cfg", "--scales", "1",
            "3", "-n", "4", "--steps", "2", "--inception-weights", str(tiny / "inception.pt"), "-o",
            str(tmp_path / "out")]
    assert main(args) == 2 and "needs --reference" in capsys.readouterr().err
    assert main([*args, "--reference", str(real), "--save-reference", str(tmp_path / "ref.npz")]) == 0
    table = rows(tmp_path / "out")
    assert all(r["extractor"].startswith("inception-v3/") and r["class_accuracy"] is None for r in table)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["saturation"] <= 1 for r in table)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["saturation"]["kind"] == "hsv"
    # the saved statistics reproduce the folder's Frechet distances (the shards are reused: nothing regenerated)
    assert main([*args, "--reference", str(tmp_path / "ref.npz")]) == 0
    assert [r["fd"] for r in rows(tmp_path / "out")] == pytest.approx([r["fd"] for r in table], rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-n", "1"], "--num-samples must be >= 2"),
        (["--methods", "nope"], "unknown guidance 'nope'"),
        (["--methods", "tag"], "has no guidance scale"),
        (["--methods", 'x={"name": "cfg", "guidance_scale": -1}'], "guidance_scale must be in"),
        (["--reference", "/no/such/file.npz"], "no such file"),
        (["--prompts", "p.txt"], "class-conditional model"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    assert main([*cli_args(tiny, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("guidance-evaluate: error:") and message in err and "\n" not in err


def test_mixing_extractors_is_refused(tiny: Path, single_run: Path, tmp_path: Path, capsys) -> None:
    other = cli_args(tiny, single_run)
    other[other.index("--evaluator") + 1] = str(tiny / "evaluator2")  # other weights -> another fd-digits id
    assert main(other) == 2 and "never merged" in capsys.readouterr().err
    assert main([*cli_args(tiny, single_run), "--inception-weights", str(tiny / "inception.pt")]) == 2
    capsys.readouterr()
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=np.zeros(16), sigma=np.eye(16), extractor=np.array("inception-v3/0123456789ab"))
    assert main([*cli_args(tiny, tmp_path / "out"), "--reference", str(reference)]) == 2
    assert "never compared" in capsys.readouterr().err


# ---------------------------------------------------------------- reliability (issue 12)


def test_damaged_shards_are_reported_moved_aside_and_regenerated(tiny: Path, single_run: Path, tmp_path: Path,
                                                                 capsys) -> None:
    """One shard with overwritten bytes, one truncated: one line each, moved aside, regenerated; same metrics."""
    out = tmp_path / "damaged"
    shutil.copytree(single_run, out)
    (out / "results.json").unlink()
    overwritten, truncated = sorted(out.rglob("shard-*.npz"))[1:3]
    data = bytearray(overwritten.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    overwritten.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    for path in (overwritten, truncated):
        with pytest.raises(shards.DamagedShardError, match=re.escape(path.name)):
            shards.read_shard(out, shards.Shard(path.parent.name, *map(int, path.stem.split("-")[1:])))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the single run
    try:
        assert main(cli_args(tiny, out)) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capsys.readouterr().err.splitlines() if "damaged shard" in line]
    assert len(lines) == 2 and all(line.startswith("guidance-evaluate: damaged shard:") for line in lines)
    assert {p.name for p in out.rglob("*.damaged")} == {overwritten.name + ".damaged", truncated.name + ".damaged"}
    assert overwritten.is_file() and truncated.is_file()  # generated again
    assert [{k: r[k] for k in STABLE_KEYS} for r in rows(out)] == [{k: r[k] for k in STABLE_KEYS}
                                                                    for r in rows(single_run)]
    images, reference = cell_images(out), cell_images(single_run)
    assert all(np.array_equal(images[key], reference[key]) for key in reference)


def test_uncreatable_output_is_one_line_before_any_model_loads(tiny: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    import samples.evaluate.command as evaluate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(evaluate, "load_pipeline", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for output in (blocker, blocker / "sub"):
        assert main(cli_args(tiny, output)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("guidance-evaluate: error: --out ") and str(output) in err and "\n" not in err


def test_non_finite_images_are_never_scored(tiny: Path, tmp_path: Path, capsys) -> None:
    """A model that outputs NaN: one error line, exit 2, no shard written and no results."""
    model = tmp_path / "nan-model"
    pipe = GuidedClassConditionalPipeline.from_pretrained(tiny / "model")
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save_pretrained(model)
    out = tmp_path / "out"
    args = ["--model", str(model), "--evaluator", str(tiny / "evaluator"), "--methods", "cfg", "--scales", "3",
            "-n", "4", "--steps", "2", "--batch-size", "2", "-o", str(out)]
    assert main(args) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "guidance-evaluate" in line]
    assert len(lines) == 1 and lines[0].startswith("guidance-evaluate: error: cfg w=3") and "non-finite" in lines[0]
    assert not list(out.rglob("shard-*.npz")) and not (out / "results.json").exists()


def test_batch_coupled_configs_are_keyed_by_batch_size() -> None:
    coupled = ['ag-all={"name": "ag", "base": {"name": "cfg", "guidance_scale": "$scale"}, "reduce": "all"}',
               'mixed=[{"name": "nlg"}, {"name": "ag", "base": "cfg", "reduce": "all"}]']
    independent = ["ag", "linear-ag", "nlg+cfg", 'ag-own={"name": "ag", "base": "cfg", "reduce": "per-sample"}']
    keys = {batch: {cell.method: cell.key for cell in plan_cells([*coupled, *independent], [3.0], {}, {}, batch)}
            for batch in (1, 4)}
    for spec in coupled:
        label = spec.partition("=")[0]
        assert batch_coupled(method_config(spec, 3.0)[1]) and keys[1][label] != keys[4][label]
    for spec in independent:
        label = spec.partition("=")[0]
        assert not batch_coupled(method_config(spec, 3.0)[1]) and keys[1][label] == keys[4][label]


def test_every_default_method_gives_the_same_images_and_nfe_at_batch_1_and_4(tmp_path: Path) -> None:
    """guidance-evaluate on the embedded digits model, every registered method at its defaults (the default
    --methods), batch size 1 vs 4: identical images and NFE per image, in cells with the same keys."""
    common = ["--scales", "3", "-n", "4", "--steps", "4", "--shard-size", "4"]
    runs = {}
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        assert main([*common, "--batch-size", str(batch), "-o", str(out)]) == 0
        runs[batch] = out
    one, four = rows(runs[1]), rows(runs[4])
    # the 8 paper rules + interval, schedule, dynamic-cfg, autoguidance and gfcg+autoguidance
    assert [r["method"] for r in one] == default_methods() and len(one) == 13
    assert [r["cell"] for r in one] == [r["cell"] for r in four]
    for a, b in zip(one, four):
        assert a["nfe_per_image"] == b["nfe_per_image"], a["method"]
        first, second = (shards.read_cell(out, shards.plan(a["cell"], 4, 4))[0] for out in (runs[1], runs[4]))
        assert np.array_equal(first["images"], second["images"]), a["method"]
        assert np.array_equal(first["nfe"], second["nfe"]), a["method"]
