"""GFCG (guidance/gfcg.py): spec properties (../shared/methods/gfcg.md §9), the exact Gaussian mixture with its Bayes
classifier as the guiding classifier, a tiny text-to-image pipeline, configuration and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from torch import nn

from guidance import Guidance, available_guidance, from_config, get_guidance
from guidance.base import Branch, Step
from guidance.cfg import CFG
from guidance.gfcg import GFCG, choose_reference, gfcg_combine, gfcg_scale
from guidance.spaces import from_x0, to_x0
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from tests.gmm import GaussianMixture

STEPS = 20


class BayesClassifier(nn.Module):
    """The mixture's exact Bayes classifier on clean samples, as a guiding classifier module."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.bayes_logits(x)


class CountingModel:
    """Wraps a ``model_fn``: records the rows and class labels of every call."""

    def __init__(self, model_fn) -> None:
        self.model_fn = model_fn
        self.calls: list[dict] = []

    def __call__(self, x, t, class_labels):
        out = self.model_fn(x, t, class_labels)
        self.calls.append({"x": x.clone(), "t": float(t), "labels": class_labels.clone(), "out": out.clone()})
        return out

    @property
    def rows(self) -> int:
        return sum(call["labels"].numel() for call in self.calls)


def three_class_mixture(scheduler) -> GaussianMixture:
    """Three overlapping isotropic classes on a circle of radius 0.6, std 0.5, priors 0.5/0.3/0.2 (Bayes accuracy of
    exact conditional samples ~78%)."""
    angles = torch.arange(3) * 2 * math.pi / 3
    means = 0.6 * torch.stack([angles.cos(), angles.sin()], 1).double()
    covs = 0.25 * torch.eye(2, dtype=torch.float64).expand(3, 2, 2).clone()
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]), scheduler.alphas_cumprod)


def sample(mixture, scheduler, guidance, labels, *, steps=STEPS, seed=0, model_fn=None, conditioning=None):
    scheduler.set_timesteps(steps)
    latents = torch.randn(len(labels), mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return denoise(
        model_fn=model_fn or mixture.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps,
        latents=latents * scheduler.init_noise_sigma, guidance=guidance,
        conditioning=conditioning or mixture.conditioning(labels), num_inference_steps=steps,
    )


def bayes_accuracy(mixture, samples, labels) -> float:
    return (mixture.bayes_logits(samples).argmax(1) == labels).double().mean().item()


@pytest.fixture
def scheduler():
    return DDIMScheduler(clip_sample=False)


@pytest.fixture
def mixture(scheduler):
    return three_class_mixture(scheduler)


@pytest.fixture
def classifier(mixture):
    return BayesClassifier(mixture).eval()


# -- the pure functions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["ratio", "one_minus_p", "indicator"])
def test_scale_rules_closed_form_monotone_and_bounded(rule):
    p_target = torch.linspace(1.0, 0.0, 101, dtype=torch.float64)
    probs = torch.stack([p_target, 0.7 * (1 - p_target), 0.3 * (1 - p_target)], 1)
    target = torch.zeros(101, dtype=torch.long)
    reference = choose_reference(probs, target, "exclude_target")
    assert torch.equal(reference, torch.ones(101, dtype=torch.long))
    lam, w_max = 3.0, 5.0
    w = gfcg_scale(probs, target, reference, rule, lam, w_max)
    expected = {
        "ratio": lam * 0.7 * (1 - p_target) / p_target.clamp_min(1e-300),
        "one_minus_p": lam * (1 - p_target),
        "indicator": lam * (0.7 * (1 - p_target) > p_target).double(),
    }[rule].clamp(0, w_max)
    torch.testing.assert_close(w, expected)
    assert (w.diff() >= 0).all(), "w must not decrease as the target probability falls"
    assert w.min() >= 0 and w.max() <= w_max
    assert w[-1] == (w_max if rule == "ratio" else min(lam, w_max))


def test_a_rule_added_to_scale_rules_is_accepted_by_name(monkeypatch, classifier):
    from guidance import gfcg as gfcg_module

    def squared_confusion(probs, target, reference):
        return (1 - probs.gather(1, target[:, None])[:, 0]) ** 2

    with pytest.raises(ValueError, match="scale_rule"):
        GFCG(classifier, scale_rule="squared")
    monkeypatch.setitem(gfcg_module.SCALE_RULES, "squared", squared_confusion)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    target = torch.tensor([0, 1])
    scale = gfcg_scale(probs, target, choose_reference(probs, target), "squared", 2.0, 4.0)
    torch.testing.assert_close(scale, torch.tensor([2 * 0.25, 2 * 0.04]))
    rebuilt = from_config({**GFCG(classifier, scale_rule="squared").config(), "classifier": classifier})
    assert rebuilt.scale_rule == "squared"


def test_reference_rules():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    target = torch.tensor([0, 2, 1])
    assert choose_reference(probs, target, "exclude_target").tolist() == [1, 1, 2]
    assert choose_reference(probs, target, "include_target").tolist() == [0, 2, 2]


@pytest.mark.parametrize("rule", ["ratio", "one_minus_p", "indicator"])
def test_reference_equal_to_target_gives_exactly_zero_contrast(rule):
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    target = torch.tensor([0, 2, 1])
    reference = choose_reference(probs, target, "include_target")
    w = gfcg_scale(probs, target, reference, rule, 10.0, 100.0)
    assert w[0] == 0 and w[1] == 0 and w[2] > 0
    out_c, out_ref = torch.randn(3, 4, 8, 8).half(), torch.randn(3, 4, 8, 8).half()
    out = gfcg_combine(out_c, out_ref, w).half()
    assert torch.equal(out[:2], out_c[:2])
    assert not torch.equal(out[2], out_c[2])


def test_zero_scale_combine_is_the_conditional_prediction_bitwise():
    out_c, out_ref, out_u = torch.randn(3, 4, 8, 8).half(), torch.randn(3, 4, 8, 8).half(), torch.randn(3, 4, 8, 8).half()
    zero = torch.zeros(3)
    assert torch.equal(gfcg_combine(out_c, out_ref, zero).half(), out_c)
    cfg = CFG(2.5).combine({"cond": out_c.float(), "uncond": out_u.float()}, None)
    assert torch.equal(gfcg_combine(out_c, out_ref, zero, out_u, 2.5), cfg)


# -- the module in the loop ------------------------------------------------------------------------------------------


def test_zero_confusion_scale_equals_unguided_run_bitwise(mixture, scheduler, classifier):
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = sample(mixture, scheduler, Guidance(), labels)
    off = sample(mixture, scheduler, GFCG(classifier, confusion_scale=0.0), labels)
    assert torch.equal(off.latents, plain.latents) and off.nfe == STEPS
    cfg = sample(mixture, scheduler, CFG(2.0), labels)
    off_cfg = sample(mixture, scheduler, GFCG(classifier, confusion_scale=0.0, cfg_scale=2.0), labels)
    assert torch.equal(off_cfg.latents, cfg.latents) and off_cfg.nfe == 2 * STEPS


def test_include_target_with_a_classifier_that_agrees_skips_the_reference(mixture, scheduler):
    """A classifier that always names the target: reference == target, w = 0, no reference NFE, unguided result."""

    class Agreeing(nn.Module):
        def forward(self, x):
            return torch.tensor([5.0, 0.0, 0.0]).expand(x.shape[0], 3)

    labels = torch.zeros(4, dtype=torch.long)
    gfcg = GFCG(Agreeing(), reference="include_target", confusion_scale=5.0)
    result = sample(mixture, scheduler, gfcg, labels)
    assert torch.equal(result.latents, sample(mixture, scheduler, Guidance(), labels).latents)
    assert result.nfe == STEPS
    assert all(torch.equal(h["scale"], torch.zeros(4)) and torch.equal(h["reference"], labels) for h in gfcg.history)


def test_classifier_runs_without_autograd():
    torch.manual_seed(0)
    seen_grad_mode = []

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            seen_grad_mode.append(torch.is_grad_enabled())
            return self.layer(x.flatten(1))

    net = Linear()
    gfcg = GFCG(net, scale_rule="ratio")
    cond = torch.randn(2, 1, 2, 2, requires_grad=True)
    step = make_step("epsilon", torch.randn(2, 1, 2, 2), target=torch.tensor([0, 2]), num_labels=3)
    assert gfcg.branches({}, step) == [Branch("cond")]
    request = gfcg.branches({"cond": cond}, step)[-1]
    assert request.mask.all()  # both samples get a reference: the loop's full-batch prediction is all evaluated
    ref = torch.randn(2, 1, 2, 2)
    out = gfcg.combine({"cond": cond, "ref": ref}, step)
    assert seen_grad_mode == [False]
    scale = gfcg.history[0]["scale"]
    assert not scale.requires_grad and scale.grad_fn is None and (scale > 0).all()
    out.sum().backward()
    assert net.layer.weight.grad is None and cond.grad is not None


def test_batch_of_b_equals_b_runs_of_batch_one(mixture, scheduler, classifier):
    labels = torch.tensor([0, 1, 2, 2, 1])
    gfcg = GFCG(classifier, cfg_scale=1.5)
    together = sample(mixture, scheduler, gfcg, labels, seed=3).latents
    references = torch.stack([h["reference"] for h in gfcg.history])
    scheduler.set_timesteps(STEPS)
    noise = torch.randn(len(labels), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for i, label in enumerate(labels):
        single = denoise(
            model_fn=mixture.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps, latents=noise[i : i + 1],
            guidance=gfcg, conditioning=mixture.conditioning(label[None]), num_inference_steps=STEPS,
        )
        torch.testing.assert_close(single.latents[0], together[i], rtol=1e-12, atol=1e-12)
        assert torch.equal(torch.stack([h["reference"][0] for h in gfcg.history]), references[:, i])


@pytest.mark.parametrize(
    ("cfg_scale", "classifier_input", "rows_per_step", "calls_per_step"),
    [(None, "cond", 2, 2), (2.0, "cond", 3, 2), (None, "previous", 2, 1), (2.0, "previous", 3, 1)],
)
def test_nfe_per_step_counted(mixture, scheduler, classifier, cfg_scale, classifier_input, rows_per_step, calls_per_step):
    labels = torch.tensor([0, 1, 2, 1])
    model = CountingModel(mixture.model_fn)
    gfcg = GFCG(classifier, scale_rule="ratio", cfg_scale=cfg_scale, classifier_input=classifier_input)
    result = sample(mixture, scheduler, gfcg, labels, model_fn=model)
    # "previous" has no estimate to classify at the first evaluation: no reference there
    first_step_saving = 1 if classifier_input == "previous" else 0
    expected = rows_per_step * STEPS - first_step_saving
    assert model.rows == expected * len(labels)
    assert result.nfe_per_sample == [expected] * len(labels)
    assert len(model.calls) == result.model_calls == calls_per_step * STEPS
    assert len(gfcg.history) == STEPS


def test_per_sample_reference_labels_reach_the_model(mixture, scheduler, classifier):
    """The reference call's class labels are the argmax (other than the target) of the Bayes posterior of the
    conditional x0 the model returned in the call before, computed here independently."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = CountingModel(mixture.model_fn)
    gfcg = GFCG(classifier, scale_rule="ratio", classifier_input="cond")
    sample(mixture, scheduler, gfcg, labels, model_fn=model)
    distinct = set()
    for cond_call, ref_call in zip(model.calls[0::2], model.calls[1::2]):
        assert torch.equal(cond_call["labels"], labels)
        alpha, sigma = mixture.alpha_sigma(cond_call["t"])
        x0 = (cond_call["x"] - sigma * cond_call["out"]) / alpha
        logits = mixture.bayes_logits(x0)
        logits[torch.arange(6), labels] = -float("inf")
        assert torch.equal(ref_call["labels"], logits.argmax(1))
        assert torch.equal(ref_call["x"], cond_call["x"])
        distinct.add(tuple(ref_call["labels"].tolist()))
    assert len(distinct) > 1, "references must change with the step (time-adaptive)"
    assert all(len(set(refs)) > 1 for refs in distinct), "references must differ per sample"


def make_step(prediction_type, sample, *, target, num_labels, alpha=0.6, sigma=0.8, decode=None):
    return Step(
        index=0, num_steps=10, evaluation=0, first_stage=True, timestep=torch.tensor(500), alpha=alpha, sigma=sigma,
        sample=sample, prediction_type=prediction_type, target_labels=target,
        decode=decode, num_labels=num_labels,
    )


def test_same_step_in_every_prediction_space():
    """GFCG(+CFG) on epsilon, v, x0 or flow outputs gives the same x0: the rule is affine at a fixed input."""
    torch.manual_seed(1)
    batch, num_labels = 4, 3
    clean = torch.randn(num_labels + 1, batch, 2, 3, 3, dtype=torch.float64)  # x0 per label (last: unconditional)
    target = torch.tensor([0, 1, 2, 1])
    x = torch.randn(batch, 2, 3, 3, dtype=torch.float64)

    class Pixels(nn.Module):
        def forward(self, images):
            return images.flatten(1)[:, :num_labels] * 3

    results = {}
    for prediction_type, (alpha, sigma) in {"epsilon": (0.6, 0.8), "v_prediction": (0.6, 0.8), "sample": (0.6, 0.8),
                                            "flow": (0.3, 0.7)}.items():
        step = make_step(prediction_type, x, target=target, num_labels=num_labels, alpha=alpha, sigma=sigma)
        out = lambda x0: from_x0(x0, x, alpha, sigma, prediction_type)  # noqa: E731
        gfcg = GFCG(Pixels(), scale_rule="ratio", w_max=3.0, cfg_scale=1.7)
        preds = {"cond": out(clean[target, torch.arange(batch)]), "uncond": out(clean[-1])}
        ref = gfcg.branches(preds, step)[-1]
        assert ref.mask.all()  # every sample has a reference here (the loop would fill the others with cond)
        preds["ref"] = out(clean[ref.labels, torch.arange(batch)])
        results[prediction_type] = to_x0(gfcg.combine(preds, step), x, alpha, sigma, prediction_type)
        reference, scale = gfcg.history[0]["reference"], gfcg.history[0]["scale"]
    cond, uncond, refx0 = clean[target, torch.arange(batch)], clean[-1], clean[reference, torch.arange(batch)]
    expected = uncond + 1.7 * (cond - uncond) + scale.double().view(-1, 1, 1, 1) * (cond - refx0)
    assert (scale > 0).all()
    for prediction_type, x0 in results.items():
        torch.testing.assert_close(x0, expected, rtol=1e-10, atol=1e-10, msg=prediction_type)


def test_sigma_window_limits_classifier_and_reference(mixture, scheduler, classifier):
    labels = torch.tensor([0, 1, 2])
    model = CountingModel(mixture.model_fn)
    gfcg = GFCG(classifier, scale_rule="ratio", sigma_window=(0.0, 1.0))
    sample(mixture, scheduler, gfcg, labels, model_fn=model)
    inside = [h["noise_level"] <= 1.0 for h in gfcg.history]
    assert 0 < sum(inside) < STEPS
    for h, active in zip(gfcg.history, inside):
        assert (h["reference"] >= 0).all() == active and (h["scale"] > 0).all() == active
        assert (h["reference"] == -1).all() != active and h["target_prob"].isnan().all() != active
    assert model.rows == (STEPS + sum(inside)) * len(labels)


@pytest.mark.parametrize("recompute", [True, False])
def test_heun_second_stage(recompute):
    scheduler = HeunDiscreteScheduler()
    mixture = three_class_mixture(scheduler)
    calls = []
    counting = BayesClassifier(mixture).eval()
    counting.register_forward_hook(lambda *_: calls.append(1))
    gfcg = GFCG(counting, scale_rule="ratio", recompute_at_second_stage=recompute)
    steps = 5
    result = sample(mixture, scheduler, gfcg, torch.tensor([0, 1]), steps=steps)
    evaluations = 2 * steps - 1
    assert len(gfcg.history) == evaluations and result.nfe == 2 * evaluations
    assert len(calls) == (evaluations if recompute else steps)
    if not recompute:
        stages = {h["evaluation"]: h for h in gfcg.history}
        for first, second in zip(range(0, evaluations - 1, 2), range(1, evaluations, 2)):
            assert torch.equal(stages[first]["reference"], stages[second]["reference"])
            assert torch.equal(stages[first]["scale"], stages[second]["scale"])


def test_history_resets_per_generation(mixture, scheduler, classifier):
    gfcg = GFCG(classifier)
    first = sample(mixture, scheduler, gfcg, torch.tensor([0, 1])).latents
    assert len(gfcg.history) == STEPS
    second = sample(mixture, scheduler, gfcg, torch.tensor([0, 1])).latents
    assert len(gfcg.history) == STEPS and torch.equal(first, second)


# -- the exact Gaussian mixture ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("classifier_input", ["cond", "previous"])
def test_gfcg_raises_bayes_accuracy_on_the_mixture(mixture, scheduler, classifier, classifier_input):
    labels = torch.arange(3).repeat_interleave(400)
    accuracy = {}
    for name, rule in {
        "conditional": Guidance(),
        "gfcg": GFCG(classifier, classifier_input=classifier_input),
        "cfg": CFG(1.5),
        "gfcg+cfg": GFCG(classifier, cfg_scale=1.5, classifier_input=classifier_input),
    }.items():
        accuracy[name] = bayes_accuracy(mixture, sample(mixture, scheduler, rule, labels, seed=7).latents, labels)
    # 1200 samples: binomial std of an accuracy near 0.8 is ~0.012, near 0.95 ~0.006
    assert 0.72 < accuracy["conditional"] < 0.84, accuracy  # exact sampling reproduces the mixture's overlap
    assert accuracy["gfcg"] > accuracy["conditional"] + 0.12, accuracy
    assert accuracy["gfcg+cfg"] > accuracy["cfg"] + 0.03, accuracy


# -- text-to-image -----------------------------------------------------------------------------------------------------


class TinyImageClassifier(nn.Module):
    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_labels))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.stable_diffusion import GuidedStableDiffusionPipeline
    from tests.tiny import tiny_sd_components

    pipe = GuidedStableDiffusionPipeline(**tiny_sd_components(tmp_path_factory.mktemp("sd")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


LABEL_PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a car"]


def test_tiny_text_to_image_reference_branch_gets_the_reference_prompt_embeddings(tiny_sd):
    received = []
    hook = tiny_sd.unet.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    gfcg = GFCG(TinyImageClassifier(), scale_rule="ratio", cfg_scale=3.0)
    steps = 3
    try:
        out = tiny_sd(
            ["a cat", "a car"], num_inference_steps=steps, guidance=gfcg, label_prompts=LABEL_PROMPTS,
            target_labels=[0, 2], generator=torch.Generator().manual_seed(0), output_type="pt",
        )
    finally:
        hook.remove()
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
    assert out.nfe == 3 * steps and len(received) == 2 * steps
    label_embeds = tiny_sd.encode_prompt(LABEL_PROMPTS, "cpu", 1, False)[0]
    prompt_embeds, negative = tiny_sd.encode_prompt(["a cat", "a car"], "cpu", 1, True)
    for step, history in enumerate(gfcg.history):
        assert (history["scale"] > 0).all()
        first, second = received[2 * step], received[2 * step + 1]
        torch.testing.assert_close(first, torch.cat([negative, prompt_embeds]))
        torch.testing.assert_close(second, label_embeds[history["reference"]])
        assert not (history["reference"] == torch.tensor([0, 2])).any()


def test_text_to_image_without_a_label_set_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="label_prompts="):
        tiny_sd("a cat", num_inference_steps=2, guidance=GFCG(TinyImageClassifier()), output_type="pt")


def test_text_to_image_classifier_size_must_match_the_label_set(tiny_sd):
    with pytest.raises(ValueError, match="4 logits but the pipeline's label set has 3 labels"):
        tiny_sd("a cat", num_inference_steps=2, guidance=GFCG(TinyImageClassifier(4)), label_prompts=LABEL_PROMPTS,
                target_labels=[0], output_type="pt")


class RecordingClassifier(TinyImageClassifier):
    """Records the dtype of every image batch it classifies."""

    def __init__(self) -> None:
        super().__init__()
        self.input_dtypes: list[torch.dtype] = []

    def forward(self, x):
        self.input_dtypes.append(x.dtype)
        return super().forward(x)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_decode_float32_avoids_half_precision_overflow_and_restores_the_vae(half):
    from pipelines.families import decode_float32
    from tests.tiny import tiny_vae

    vae = tiny_vae().eval().to(half)
    weights = {name: value.clone() for name, value in vae.state_dict().items()}
    reference = copy.deepcopy(vae).float()  # the same (rounded) weights, computed in float32
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 6e4  # representable in float16
    with torch.no_grad():
        pixels = decode_float32(vae, latents)
        expected = reference.decode(latents, return_dict=False)[0]
        native = vae.decode(latents.to(half), return_dict=False)[0]
    assert pixels.dtype == torch.float32 and torch.equal(pixels, expected) and torch.isfinite(pixels).all()
    if half == torch.float16:
        assert not torch.isfinite(native).all()  # what the float32 decode avoids
    assert vae.dtype == half and all(torch.equal(weights[name], value) for name, value in vae.state_dict().items())


def test_text_to_image_decodes_for_the_classifier_in_float32_with_a_half_precision_vae(tiny_sd, monkeypatch):
    vae, classifier, decode_dtypes = tiny_sd.vae, RecordingClassifier(), []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *args, **kw: decode_dtypes.append(vae.dtype) or decode(*args, **kw))
    weights = copy.deepcopy(vae.state_dict())
    vae.half()
    try:
        tiny_sd(["a cat"], num_inference_steps=2, guidance=GFCG(classifier), label_prompts=LABEL_PROMPTS,
                target_labels=[1], output_type="latent")
        assert vae.dtype == torch.float16
    finally:
        vae.float()
        vae.load_state_dict(weights)
    assert decode_dtypes == [torch.float32] * 2 and classifier.input_dtypes == [torch.float32] * 2


def test_non_finite_classifier_logits_are_refused(mixture, scheduler):
    class NaNClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan")) * self.scale

    with pytest.raises(ValueError, match="non-finite logits"):
        sample(mixture, scheduler, GFCG(NaNClassifier()), torch.tensor([0, 1]), seed=0)


# -- configuration and bad input ---------------------------------------------------------------------------------------


def test_config_round_trip_without_the_classifier(classifier):
    gfcg = GFCG(classifier, confusion_scale=1.5, scale_rule="ratio", reference="include_target", w_max=3.0,
                sigma_window=(0.1, 5.0), cfg_scale=2.0, classifier_input="previous", recompute_at_second_stage=False)
    config = gfcg.config()
    assert "classifier" not in config and config["name"] == "gfcg" and "gfcg" in available_guidance()
    text = json.dumps(config)
    rebuilt = from_config({**json.loads(text), "classifier": classifier})
    assert isinstance(rebuilt, GFCG) and rebuilt.config() == config and rebuilt.classifier is classifier
    params = {k: v for k, v in config.items() if k != "name"}
    assert get_guidance("gfcg", classifier=classifier, **params).config() == config
    assert rebuilt.required_branches == {"cond", "uncond", "ref"}
    assert GFCG(classifier).required_branches == {"cond", "ref"}
    with pytest.raises(ValueError, match="classifier="):
        from_config(text)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"classifier": None}, ValueError, "classifier="),
        ({"classifier": lambda x: x}, TypeError, "classifier must be a torch.nn.Module"),
        ({"confusion_scale": -1.0}, ValueError, r"confusion_scale must be in \[0.0, inf\]"),
        ({"scale_rule": "softmax"}, ValueError, "scale_rule must be one of 'ratio', 'one_minus_p', 'indicator'"),
        ({"reference": "random"}, ValueError, "reference must be one of"),
        ({"w_max": 0.0}, ValueError, r"w_max must be in \(0.0, inf\]"),
        ({"sigma_window": (2.0, 1.0)}, ValueError, r"sigma_window\[1\] must be in \[2.0, inf\]"),
        ({"sigma_window": 3.0}, ValueError, "sigma_window must be None or a pair"),
        ({"sigma_window": (-1.0, 1.0)}, ValueError, r"sigma_window\[0\]"),
        ({"cfg_scale": -2.0}, ValueError, "cfg_scale"),
        ({"classifier_input": "noisy"}, ValueError, "classifier_input must be one of 'cond', 'previous'"),
        ({"recompute_at_second_stage": 1}, TypeError, "recompute_at_second_stage must be a bool"),
    ],
)
def test_bad_arguments(classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        GFCG(**{"classifier": classifier, **kwargs})


def test_pipeline_name_without_classifier_is_refused():
    with pytest.raises(ValueError, match="GFCG needs classifier="):
        get_guidance("gfcg", confusion_scale=2.0)


def test_classifier_output_size_must_match_the_label_set(mixture, scheduler):
    class FourWay(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 4)

    with pytest.raises(ValueError, match="4 logits but the pipeline's label set has 3 labels"):
        sample(mixture, scheduler, GFCG(FourWay()), torch.tensor([0, 1]))


def test_target_labels_outside_the_classifier_range(mixture, scheduler, classifier):
    labels = torch.tensor([0, 1])
    conditioning = BranchConditioning(
        {"cond": {"class_labels": labels}}, label_set={"class_labels": torch.arange(3)}, target_labels=torch.tensor([0, 3])
    )
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 2\]"):
        sample(mixture, scheduler, GFCG(classifier), labels, conditioning=conditioning)


def test_missing_target_labels_and_label_set(mixture, scheduler, classifier):
    labels = torch.tensor([0, 1])
    no_targets = BranchConditioning({"cond": {"class_labels": labels}}, label_set={"class_labels": torch.arange(3)})
    with pytest.raises(ValueError, match="target label of every sample"):
        sample(mixture, scheduler, GFCG(classifier), labels, conditioning=no_targets)
    no_label_set = BranchConditioning({"cond": {"class_labels": labels}}, target_labels=labels)
    with pytest.raises(ValueError, match="'ref' needs a label set"):
        sample(mixture, scheduler, GFCG(classifier), labels, conditioning=no_label_set)


def test_classifier_must_return_logits(mixture, scheduler):
    class Flat(nn.Module):
        def forward(self, x):
            return x.sum(1)

    with pytest.raises(ValueError, match=r"logits \[B, K\]"):
        sample(mixture, scheduler, GFCG(Flat()), torch.tensor([0, 1]))
