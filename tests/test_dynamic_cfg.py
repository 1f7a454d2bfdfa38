"""DynamicCFG and its scorers (issue 15).

References: plain CFG runs at fixed scales, CFG written out in the test, the mixture's exact Bayes classifier, a tiny
random CLIP model's own ``logits_per_image``, and single-sample runs for batch independence.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from transformers import CLIPConfig, CLIPModel

from guidance import CFG, DynamicCFG, GuidanceInterval, from_config, get_guidance
from guidance.base import Step
from guidance.scorers import ClassifierScorer, CLIPScorer, WeightedScorer
from pipelines.loop import denoise
from tests.test_gfcg import BayesClassifier, CountingModel, sample, three_class_mixture
from tests.test_gfcg import classifier, mixture, scheduler  # noqa: F401  (fixtures)
from tests.tiny import tiny_tokenizer

STEPS = 10
SCALES = (1.0, 2.0, 3.5, 5.0)
LABELS = torch.tensor([0, 1, 2, 1, 0])


def prefer(index: int):
    """A scorer that always prefers candidate ``index`` (every other candidate scores lower)."""

    def scorer(candidates, step):
        scores = torch.zeros(candidates.shape[:2], dtype=torch.float64)
        scores[index] = 1.0
        return scores

    return scorer


def make_step(x, alpha=0.6, target=None, decode=None):
    return Step(index=0, num_steps=STEPS, evaluation=0, first_stage=True, timestep=torch.tensor(500), alpha=alpha,
                sigma=math.sqrt(1 - alpha**2), sample=x, prediction_type="epsilon", target_labels=target, decode=decode)


# -- equal to CFG where it must be ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "scale"), [(-1, SCALES[-1]), (0, SCALES[0]), (2, SCALES[2])])
def test_a_scorer_preferring_one_candidate_equals_cfg_at_its_scale_bit_for_bit(mixture, scheduler, index, scale):
    cfg_model, dyn_model = CountingModel(mixture.model_fn), CountingModel(mixture.model_fn)
    cfg = sample(mixture, scheduler, CFG(scale), LABELS, steps=STEPS, model_fn=cfg_model)
    rule = DynamicCFG(SCALES, scorer=prefer(index))
    dynamic = sample(mixture, scheduler, rule, LABELS, steps=STEPS, model_fn=dyn_model)
    assert torch.equal(dynamic.latents, cfg.latents)
    assert torch.equal(rule.chosen_scales, torch.full((STEPS, len(LABELS)), scale, dtype=torch.float64))


def test_nfe_equals_cfg_whatever_is_chosen(mixture, scheduler, classifier):
    cfg_model, dyn_model = CountingModel(mixture.model_fn), CountingModel(mixture.model_fn)
    cfg = sample(mixture, scheduler, CFG(3.0), LABELS, steps=STEPS, model_fn=cfg_model)
    rule = DynamicCFG(SCALES, {"name": "classifier", "cap": 0.95}, classifier)
    dynamic = sample(mixture, scheduler, rule, LABELS, steps=STEPS, model_fn=dyn_model)
    assert dynamic.nfe_per_sample == cfg.nfe_per_sample == [2 * STEPS] * len(LABELS)
    assert dyn_model.rows == cfg_model.rows and len(dyn_model.calls) == len(cfg_model.calls) == STEPS
    assert len(set(rule.chosen_scales.flatten().tolist())) > 1  # the classifier does choose different scales


def test_each_sample_gets_the_cfg_output_of_its_own_best_candidate():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    preds = {"cond": torch.randn_like(x), "uncond": torch.randn_like(x)}
    wanted = torch.tensor([3, 0, 2, 1])

    def scorer(candidates, step):
        scores = -torch.ones(candidates.shape[:2], dtype=torch.float64)
        scores[wanted, torch.arange(4)] = 2.0
        return scores

    rule = DynamicCFG(SCALES, scorer=scorer)
    out = rule.combine(preds, make_step(x))
    for b, k in enumerate(wanted.tolist()):
        w = SCALES[k]
        assert torch.equal(out[b], preds["uncond"][b] + w * (preds["cond"][b] - preds["uncond"][b]))
    assert torch.equal(rule.history[0]["choice"], wanted)


def test_candidates_are_the_cfg_denoised_estimates_and_ties_pick_the_smaller_scale():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    preds = {"cond": torch.randn_like(x), "uncond": torch.randn_like(x)}
    step = make_step(x, alpha=0.8)
    seen = []
    rule = DynamicCFG(SCALES, scorer=lambda c, s: seen.append(c) or torch.zeros(c.shape[:2]))
    out = rule.combine(preds, step)
    (candidates,) = seen
    assert candidates.shape == (len(SCALES), 3, 1, 4, 4)
    alpha, sigma = 0.8, 0.6
    for k, w in enumerate(SCALES):  # x0 of CFG in epsilon space, by the closed-form VP conversion
        eps = preds["uncond"] + w * (preds["cond"] - preds["uncond"])
        torch.testing.assert_close(candidates[k], (x - sigma * eps) / alpha, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, preds["uncond"] + SCALES[0] * (preds["cond"] - preds["uncond"]))


# -- per-sample independence ---------------------------------------------------------------------------------------


def test_choices_of_a_sample_do_not_depend_on_its_batch_mates(mixture, scheduler, classifier):
    rule = DynamicCFG(SCALES, classifier=classifier)
    together = sample(mixture, scheduler, rule, LABELS, steps=STEPS, seed=4).latents
    chosen = rule.chosen_scales
    scheduler.set_timesteps(STEPS)
    noise = torch.randn(len(LABELS), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for i, label in enumerate(LABELS):
        single = denoise(
            model_fn=mixture.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps, latents=noise[i : i + 1],
            guidance=rule, conditioning=mixture.conditioning(label[None]), num_inference_steps=STEPS,
        )
        torch.testing.assert_close(single.latents[0], together[i], rtol=1e-12, atol=1e-12)
        assert torch.equal(rule.chosen_scales[:, 0], chosen[:, i])


def test_permuting_the_batch_permutes_the_choices_exactly(classifier):
    x = torch.randn(6, 2, dtype=torch.float64)
    preds = {"cond": torch.randn_like(x), "uncond": torch.randn_like(x)}
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    rule = DynamicCFG(SCALES, classifier=classifier)
    out = rule.combine(preds, make_step(x, target=target))
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    permuted = rule.combine({k: v[perm] for k, v in preds.items()}, make_step(x[perm], target=target[perm]))
    assert torch.equal(permuted, out[perm])
    assert torch.equal(rule.history[1]["choice"], rule.history[0]["choice"][perm])


# -- the scorers ---------------------------------------------------------------------------------------------------


def test_classifier_scorer_is_the_log_probability_of_the_target_class(mixture, classifier):
    candidates = torch.randn(3, 4, 2, dtype=torch.float64)
    target = torch.tensor([2, 0, 1, 2])
    scores = ClassifierScorer(classifier)(candidates, make_step(candidates[0], target=target))
    for k in range(3):
        logits = mixture.bayes_logits(candidates[k])
        expected = logits[torch.arange(4), target] - torch.logsumexp(logits, dim=1)
        torch.testing.assert_close(scores[k], expected, rtol=1e-12, atol=1e-12)
        capped = ClassifierScorer(classifier, cap=0.5)(candidates, make_step(candidates[0], target=target))
        torch.testing.assert_close(capped[k], expected.clamp(max=math.log(0.5)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"cap must be in \(0.0, 1.0\]"):
        ClassifierScorer(classifier, cap=0.0)


def test_classifier_scorer_chooses_the_candidate_with_the_highest_target_probability(mixture, scheduler, classifier):
    rule = DynamicCFG(SCALES, classifier=classifier)
    sample(mixture, scheduler, rule, LABELS, steps=STEPS)
    for record in rule.history:
        assert torch.equal(record["choice"], record["scores"].argmax(0))
        assert torch.equal(record["scale"], torch.tensor(SCALES, dtype=torch.float64)[record["choice"]])


def test_guided_by_target_log_probability_it_is_at_least_as_accurate_as_the_weakest_cfg(mixture, scheduler, classifier):
    """On the mixture, choosing the scale by the Bayes classifier's target probability raises Bayes accuracy over
    unguided sampling (an outcome check of the shipped scorer, not of the mechanics)."""
    labels = torch.arange(3).repeat_interleave(40)
    accuracy = {}
    for name, rule in (("cond", CFG(1.0)), ("dynamic", DynamicCFG(SCALES, classifier=classifier))):
        out = sample(mixture, scheduler, rule, labels, steps=STEPS).latents
        accuracy[name] = (mixture.bayes_logits(out).argmax(1) == labels).double().mean().item()
    assert accuracy["dynamic"] > accuracy["cond"]


def test_weighted_scorer_is_the_weighted_sum():
    candidates = torch.randn(2, 3, 5)
    step = make_step(candidates[0])
    first = lambda c, s: c.sum(-1)  # noqa: E731
    second = lambda c, s: c.pow(2).mean(-1)  # noqa: E731
    scores = WeightedScorer([(0.5, first), (-2.0, second)])(candidates, step)
    torch.testing.assert_close(scores, 0.5 * first(candidates, step).double() - 2.0 * second(candidates, step).double())
    with pytest.raises(ValueError, match="at least one"):
        WeightedScorer([])
    with pytest.raises(ValueError, match=r"terms\[0\] weight"):
        WeightedScorer([(math.inf, first)])
    with pytest.raises(ValueError, match=r"terms\[1\] must be a pair"):
        WeightedScorer([(1.0, first), (1.0, "second")])


def tiny_clip(image_size: int = 16) -> CLIPModel:
    torch.manual_seed(7)
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def test_clip_scorer_is_the_cosine_of_clip_embeddings(tmp_path):
    model, tokenizer = tiny_clip(), tiny_tokenizer(tmp_path / "tok")
    prompts = ["a red square", "a blue circle", "a cat"]
    pixels = torch.rand(2, 3, 3, 16, 16) * 2 - 1  # [K, B, C, H, W] in [-1, 1]
    step = make_step(pixels[0])
    scores = CLIPScorer(model, tokenizer, prompts)(pixels, step)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        for k in range(2):
            out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=((pixels[k] + 1) / 2 - mean) / std)
            expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
            torch.testing.assert_close(scores[k], expected, rtol=1e-5, atol=1e-6)
    resized = CLIPScorer(model, tokenizer, "a cat")(torch.rand(2, 3, 3, 32, 32) * 2 - 1, make_step(pixels[0]))
    assert resized.shape == (2, 3) and torch.isfinite(resized).all()
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        CLIPScorer(model, tokenizer, prompts[:2])(pixels, step)


def test_clip_scorer_drives_dynamic_cfg_on_a_tiny_text_to_image_pipeline(tmp_path):
    from pipelines.stable_diffusion import GuidedStableDiffusionPipeline
    from tests.tiny import tiny_sd_components

    pipe = GuidedStableDiffusionPipeline(**tiny_sd_components(tmp_path / "sd"))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a car"]
    scorer = CLIPScorer(tiny_clip(32), tiny_tokenizer(tmp_path / "clip"), prompts)
    rule = DynamicCFG((1.0, 4.0, 7.5), scorer=scorer)
    steps = 3
    out = pipe(prompts, num_inference_steps=steps, guidance=rule, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    cfg = pipe(prompts, num_inference_steps=steps, guidance=CFG(7.5), generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.nfe == cfg.nfe == 2 * steps and torch.isfinite(out.images).all()
    assert rule.chosen_scales.shape == (steps, 2) and set(rule.chosen_scales.flatten().tolist()) <= {1.0, 4.0, 7.5}


# -- the embedded digits model -------------------------------------------------------------------------------------


def test_classifier_scorer_on_the_embedded_digits_model():
    from pipelines import GuidedClassConditionalPipeline
    from samples.digits.nets import EMBEDDED_MODEL, load_classifier

    if not EMBEDDED_MODEL.is_dir():
        pytest.skip("embedded digits model not trained")
    pipe = GuidedClassConditionalPipeline.from_pretrained(EMBEDDED_MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rule = DynamicCFG((1.0, 2.0, 3.0), classifier=load_classifier())
    labels = [3, 8, 1]
    generators = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    out = pipe(labels, guidance=rule, num_inference_steps=4, generator=generators, output_type="latent")
    assert out.nfe == 8 and rule.chosen_scales.shape == (4, 3)
    chosen = rule.chosen_scales.clone()
    alone = pipe([8], guidance=rule, num_inference_steps=4, generator=[torch.Generator().manual_seed(11)],
                 output_type="latent")
    assert torch.equal(rule.chosen_scales[:, 0], chosen[:, 1])
    torch.testing.assert_close(alone.images[0], out.images[1], rtol=1e-5, atol=1e-5)


# -- bad input, names, configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scales", "match"), [((), "non-empty"), ([], "non-empty"), ((2.0, 1.0), "strictly increasing"),
                                               ((1.0, 1.0), "strictly increasing"), ((-1.0, 2.0), r"scales\[0\]"),
                                               ((1.0, math.nan), r"scales\[1\]"), ("1,2", "sequence")])
def test_bad_scale_lists_are_refused(scales, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicCFG(scales, scorer=prefer(0))


def test_bad_scorers_and_scores_are_refused(mixture, scheduler, classifier):
    with pytest.raises(ValueError, match="needs classifier="):
        DynamicCFG(SCALES)
    with pytest.raises(ValueError, match="scorer must be a callable"):
        DynamicCFG(SCALES, scorer="aesthetic")
    with pytest.raises(ValueError, match="contradicts the largest candidate"):
        DynamicCFG(SCALES, scorer=prefer(0), guidance_scale=3.0)
    bad = {
        "shape": (lambda c, s: torch.zeros(c.shape[1], c.shape[0]), r"shape \[K, B\] = \[4, 5\]"),
        "flat": (lambda c, s: torch.zeros(c.shape[0] * c.shape[1]), r"shape \[K, B\]"),
        "nan": (lambda c, s: torch.full(c.shape[:2], math.nan), "non-finite"),
        "inf": (lambda c, s: torch.full(c.shape[:2], -math.inf), "non-finite"),
        "list": (lambda c, s: [[0.0] * c.shape[1]] * c.shape[0], r"shape \[K, B\]"),
    }
    for scorer, match in bad.values():
        with pytest.raises(ValueError, match=match):
            sample(mixture, scheduler, DynamicCFG(SCALES, scorer=scorer), LABELS, steps=2)


def test_default_candidates_span_one_to_the_guidance_scale_and_by_name(classifier):
    rule = get_guidance("dynamic-cfg", guidance_scale=3.0, classifier=classifier)
    assert rule.scales == (1.0, 1.5, 2.0, 2.5, 3.0) and rule.guidance_scale == 3.0
    assert DynamicCFG(scorer=prefer(0), guidance_scale=1.0).scales == (1.0,)
    with pytest.raises(ValueError, match="guidance_scale"):
        DynamicCFG(scorer=prefer(0), guidance_scale=0.5)


def test_only_scale_one_is_conditional_sampling(mixture, scheduler):
    conditional = sample(mixture, scheduler, CFG(1.0), LABELS, steps=STEPS)
    rule = DynamicCFG((1.0,), scorer=prefer(0))
    out = sample(mixture, scheduler, rule, LABELS, steps=STEPS)
    assert torch.equal(out.latents, conditional.latents) and out.nfe == STEPS
    assert torch.equal(rule.chosen_scales, torch.ones(STEPS, len(LABELS), dtype=torch.float64))


def test_config_round_trip_and_history_reset(mixture, scheduler, classifier):
    rule = DynamicCFG(SCALES, classifier=classifier)
    config = rule.config()
    assert "classifier" not in config and json.loads(json.dumps(config)) == config
    rebuilt = from_config({**json.loads(json.dumps(config)), "classifier": classifier})
    assert rebuilt.config() == config
    a = sample(mixture, scheduler, rule, LABELS, steps=STEPS)
    b = sample(mixture, scheduler, rebuilt, LABELS, steps=STEPS)
    assert torch.equal(a.latents, b.latents) and torch.equal(rule.chosen_scales, rebuilt.chosen_scales)
    sample(mixture, scheduler, rule, LABELS[:2], steps=3)
    assert rule.chosen_scales.shape == (3, 2)  # reset at every generation
    callable_rule = DynamicCFG(SCALES, scorer=prefer(1))
    assert from_config(callable_rule.config()).scorer is callable_rule.scorer


def test_heun_chooses_at_every_evaluation_and_composes_with_an_interval():
    scheduler = HeunDiscreteScheduler()
    mixture = three_class_mixture(scheduler)
    classifier = BayesClassifier(mixture).eval()
    steps = 4
    rule = DynamicCFG(SCALES, classifier=classifier)
    out = sample(mixture, scheduler, rule, LABELS, steps=steps)
    assert [r["step"] for r in rule.history] == [0, 0, 1, 1, 2, 2, 3] and out.nfe == 2 * 7
    limited = GuidanceInterval(DynamicCFG(SCALES, classifier=classifier), (0.0, float(scheduler.sigmas[3])))
    out = sample(mixture, scheduler, limited, LABELS, steps=steps)
    assert len(limited.base.history) == 4 and out.nfe == 7 + 4  # evaluations 3..6 are inside
