"""Packaging and everyday use: a lean core install, one-line messages for missing extras, quiet start-ups of both
CLIs, plain-log progress and ``--quiet``, the public API, the name-clash check, and wrapped, titled grids."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import guidance
from samples.digits import data as digits_data
from samples.evaluate import command as evaluate
from samples.generate import command as generate
from samples.extras import MissingExtraError
from samples.generate.grid import HEADER, MAX_WIDTH, cell_size, grid_layout, labelled_grid

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "scikit-learn", "matplotlib")


def _run(code_or_module: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess, without the test session's verbosity settings (conftest.py sets them)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    environment.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, *code_or_module], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=environment, check=False)


# ------------------------------------------------------------------------------------------------- dependencies


def test_core_dependencies_hold_none_of_the_heavy_packages_and_test_pulls_the_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]]
    assert not set(names) & set(HEAVY)
    assert {"torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow", "tqdm"} <= set(names)
    extras = project["optional-dependencies"]
    assert extras["eval"] == ["matplotlib"] and extras["train"] == ["scikit-learn"]
    assert "diffusion-guidance[eval,train]" in extras["test"] and "scipy" in extras["test"]


def test_the_tools_are_installed_by_job_and_the_digits_trainer_is_not():
    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = set(find_packages(str(REPO), include=include))
    assert {"samples.generate", "samples.evaluate", "samples.metrics", "samples.digits"} <= packages
    assert (REPO / "scripts" / "train_digits.py").is_file() and not any(p.startswith("scripts") for p in packages)


def test_shipped_heldout_split_is_the_scikit_learn_split():
    images, labels = digits_data.load_heldout()
    split = digits_data.load_digits_split()
    assert torch.equal(images, split.test_images) and torch.equal(labels, split.test_labels)
    assert digits_data.HELDOUT_FILE.stat().st_size < 50_000


def test_missing_extras_give_one_line_with_the_pip_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code = evaluate.main(["--guidance", "cfg", "--scale", "2", "-n", "4", "--steps", "1", "-o", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("guidance-evaluate: error: ") and "pip install 'diffusion-guidance[eval]'" in err
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'diffusion-guidance\[train\]'"):
        digits_data.load_digits_split()


def test_evaluate_on_the_embedded_model_runs_without_scikit_learn(tmp_path):
    out = tmp_path / "eval"
    script = ("import sys; sys.modules['sklearn'] = None; from samples.evaluate.command import main; "
              f"sys.exit(main(['--guidance', 'cfg', '--scale', '2', '-n', '4', '--steps', '1', '-o', {str(out)!r}, "
              "'--quiet']))")
    result = _run(["-c", script])
    assert result.returncode == 0, result.stderr
    assert "digits held-out split (360)" in (out / "results.json").read_text()


# -------------------------------------------------------------------------------------------------- start-ups


def test_both_clis_start_without_any_warning_and_log_plain_progress(tmp_path):
    """stderr of a real start-up (imports, model loading, sampling) of each tool holds nothing, so no warning."""
    gen = _run(["-m", "samples.generate", "--guidance", "cfg", "--steps", "1", "--num-images", "1",
                "--out", str(tmp_path / "g")])
    ev = _run(["-m", "samples.evaluate", "--guidance", "cfg", "--scale", "2", "-n", "4", "--steps", "1",
               "--dry-run", "-o", str(tmp_path / "e")])
    for result in (gen, ev):
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
        assert "\r" not in result.stdout  # no progress bars in a log
    assert "sampling: 1/1 methods (cfg)" in gen.stdout  # plain progress lines instead


def test_quiet_prints_no_progress(tmp_path, capsys):
    args = ["--guidance", "cfg", "--steps", "1", "--num-images", "1", "--out", str(tmp_path / "g")]
    assert generate.main(args) == 0
    loud = capsys.readouterr().out
    assert generate.main([*args, "--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert "sampling: 1/1" in loud and "sampling:" not in quiet and "model " not in quiet
    assert "cfg " in quiet and "wrote " in quiet  # the results stay


# ------------------------------------------------------------------------------------------------- public API


def _readme_imports(module: str) -> set[str]:
    """Names the README imports ``from module import ...`` in its Python blocks."""
    names: set[str] = set()
    for block in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == module:
                names.update(alias.name for alias in node.names)
    return names


def test_guidance_all_holds_what_the_readme_uses_and_nothing_internal():
    exported = set(guidance.__all__)
    assert _readme_imports("guidance") <= exported
    assert {"calibrate_threshold", "fit_linear_ag", "LinearAGCoefficients"} <= exported
    for name in exported:
        assert not name.startswith("_") and getattr(guidance, name).__module__.startswith("guidance.")
    assert len(guidance.__all__) == len(exported)


def test_a_foreign_guidance_package_is_refused_at_import_with_a_clear_error(tmp_path):
    (tmp_path / "guidance").mkdir()
    (tmp_path / "guidance" / "__init__.py").write_text("models = None  # another distribution's guidance\n")
    result = _run(["-c", "import samples.cli"], cwd=tmp_path)  # the cwd comes first on sys.path
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: 'import guidance' found ") and "not diffusion-guidance's" in last
    assert str(tmp_path / "guidance") in last


# ------------------------------------------------------------------------------------------------------ grids


def test_long_rows_wrap_into_bands_under_a_title():
    """10 classes x 10 images: one 4000-pixel strip unwrapped; wrapped, every image sits where the layout says."""
    torch.manual_seed(0)
    rows = [(f"m{i}", torch.rand(100, 1, 8, 8)) for i in range(2)]
    columns = [str(c) for c in range(10)]
    long = labelled_grid(rows, columns, 10, max_width=None)
    grid = labelled_grid(rows, columns, 10, title="digits, DDIMScheduler, 30 steps, scale 3")
    assert long.width > 4000 and grid.width <= MAX_WIDTH < long.width
    layout = grid_layout([label for label, _ in rows], 8, 10, len(columns), title=True, max_width=MAX_WIDTH)
    assert layout.per_line == 2 and grid.size == layout.size(2, 10)  # 5 bands of 2 column blocks
    pixels = np.asarray(grid.convert("L"))
    side = cell_size(8)
    for row, (_, images) in enumerate(rows):
        for k in (0, 25, 99):  # first block, a block in the middle band, the last block
            x, y = layout.cell_origin(row, k // 10, k % 10)
            expected = (images[k, 0] * 255).round().to(torch.uint8).numpy()
            assert (pixels[y : y + side : side // 8, x : x + side : side // 8] == expected).all()
    untitled = labelled_grid(rows, columns, 10)
    assert untitled.height == grid.height - HEADER and (pixels[:HEADER] < 128).any()  # the title line, drawn


def test_accuracy_is_shown_as_measured():
    assert generate.accuracy_text(39 / 40, 40) == "97.5% (39/40)"
    assert generate.accuracy_text(1.0, 40) == "100.0% (40/40)"
