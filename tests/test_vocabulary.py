"""One vocabulary: both CLIs' shared flags and aliases, the one resolver of guidance strings in Python (composition
strings, ``LABEL=JSON``, ``$scale``), by-name errors of rules that need inputs, rule equality, and one word per concept
(the rules' renamed ``eta`` arguments, with their deprecated alias)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import guidance
from guidance import (
    APG,
    CFG,
    GFCG,
    NLG,
    TAG,
    TAGCFG,
    AdaptiveGuidance,
    ComposedGuidance,
    from_config,
    get_guidance,
    resolve_guidance,
)
from samples.evaluate import command as evaluate
from samples.generate import command as generate

SHARED = {"--guidance": "guidance", "--scale": "scale", "--steps": "steps", "--scheduler": "scheduler",
          "--seed": "seed", "--out": "out", "--quiet": "quiet"}
ALIASES = {"--methods": "--guidance", "--scales": "--scale", "--output": "--out", "-o": "--out", "-q": "--quiet"}


def _options(parser) -> dict[str, str]:
    """Every option string of a parser -> its destination."""
    return {option: action.dest for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("tool", [generate, evaluate], ids=["generate", "evaluate"])
def test_both_clis_take_the_shared_flags_and_their_aliases(tool):
    options = _options(tool.build_parser())
    for flag, dest in SHARED.items():
        assert options.get(flag) == dest, flag
    for alias, flag in ALIASES.items():
        assert options.get(alias) == options[flag], alias


@pytest.mark.parametrize("tool", [generate, evaluate], ids=["generate", "evaluate"])
def test_old_and_new_spellings_parse_alike(tool, tmp_path):
    scale = ["--scale", "2", "4"] if tool is evaluate else ["--scale", "2"]
    old = ["--scales", "2", "4"] if tool is evaluate else ["--scales", "2"]
    parse = tool.build_parser().parse_args
    new_args = parse(["--guidance", "cfg", "nlg+apg", *scale, "--steps", "7", "--scheduler", "euler", "--seed", "3",
                      "--out", str(tmp_path), "--quiet"])
    old_args = parse(["--methods", "cfg", "nlg+apg", *old, "--steps", "7", "--scheduler", "euler", "--seed", "3",
                      "-o", str(tmp_path), "-q"])
    assert vars(new_args) == vars(old_args)
    assert new_args.guidance == ["cfg", "nlg+apg"] and new_args.steps == 7 and new_args.seed == 3
    assert new_args.scale == ([2.0, 4.0] if tool is evaluate else 2.0) and new_args.quiet


# ------------------------------------------------------------------------------------------------ the resolver


def test_composition_string_is_the_list_of_its_modules():
    expected = ComposedGuidance([NLG(), APG(4.0), TAG()])
    assert resolve_guidance("nlg+apg+tag", guidance_scale=4) == expected
    assert get_guidance("nlg+apg+tag", guidance_scale=4) == expected
    assert resolve_guidance(["nlg", "apg+tag"], guidance_scale=4) == expected  # nested compositions flatten
    assert resolve_guidance("nlg+apg+tag").config() == ComposedGuidance([NLG(), APG(), TAG()]).config()
    # each keyword goes to the modules that take it; one that none takes is refused by name
    assert get_guidance("nlg+tag", tangential_scale=1.3) == ComposedGuidance([NLG(), TAG(tangential_scale=1.3)])
    with pytest.raises(ValueError, match="no module takes 'threshold'"):
        get_guidance("nlg+tag", threshold=0.9)


def test_label_json_and_scale_placeholder():
    spec = 'strong={"name": "apg", "guidance_scale": "$scale", "parallel_scale": 0.5}'
    assert resolve_guidance(spec, guidance_scale=9) == APG(9.0, parallel_scale=0.5)
    assert get_guidance('x=[{"name": "nlg"}, {"name": "cfg", "guidance_scale": 2}]') == ComposedGuidance([NLG(), CFG(2)])
    assert guidance.registry.parse_guidance(spec, 9)[0] == "strong"
    with pytest.raises(ValueError, match=r"\$scale"):
        resolve_guidance(spec)
    with pytest.raises(ValueError, match="invalid JSON"):
        resolve_guidance('bad={"name": ')


def test_spec_terms_are_read_by_the_same_resolver():
    from guidance.spec import term_config

    rule = resolve_guidance("nlg+cfg@interval=0.28,2", guidance_scale=3)
    assert rule == ComposedGuidance([NLG(), from_config(term_config("cfg@interval=0.28,2", 3))])
    assert rule.modules[1].base == CFG(3)


def test_config_round_trip_of_a_composition_string():
    rule = resolve_guidance("nlg+apg+tag", guidance_scale=5)
    assert from_config(json.dumps(rule.config())) == rule
    assert resolve_guidance(json.dumps(rule.config())) == rule


def test_unknown_names_and_arguments_are_value_errors_naming_them():
    with pytest.raises(ValueError, match="unknown guidance 'nope'.*available: cfg"):
        resolve_guidance("apg+nope")
    with pytest.raises(ValueError, match="'tag' takes no argument 'guidance_scale'"):
        get_guidance("tag", guidance_scale=3)
    with pytest.raises(ValueError, match="'cfg' takes no argument 'scale'"):
        from_config({"name": "cfg", "scale": 3})


def test_linear_ag_by_name_fails_with_what_to_pass():
    for attempt in (lambda: get_guidance("linear-ag"), lambda: resolve_guidance("linear-ag"),
                    lambda: from_config({"name": "linear-ag"}), lambda: resolve_guidance("nlg+linear-ag")):
        with pytest.raises(ValueError, match="'linear-ag' needs coefficients=, model_id=, scheduler=.*fit_linear_ag"):
            attempt()


def test_gfcg_by_name_fails_with_what_to_pass():
    for attempt in (lambda: get_guidance("gfcg"), lambda: resolve_guidance("gfcg"),
                    lambda: from_config({"name": "gfcg", "confusion_scale": 2})):
        with pytest.raises(ValueError, match="GFCG needs classifier=: a torch.nn.Module"):
            attempt()
    net = torch.nn.Linear(64, 10)
    rule = resolve_guidance("gfcg", guidance_scale=1.5, inputs={"classifier": net})  # supplied inputs fill the gap
    assert isinstance(rule, GFCG) and rule.classifier is net and rule.confusion_scale == 1.5


def test_attach_reads_guidance_strings_with_the_same_resolver(tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines import attach
    from tests.tiny import tiny_sd_components

    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path))
    with attach(pipe, "nlg+apg+tag") as attachment:
        assert attachment.guidance == ComposedGuidance([NLG(), APG(), TAG()])
    with attach(pipe, 'soft={"name": "apg", "guidance_scale": 4, "parallel_scale": 0.5}') as attachment:
        assert attachment.guidance == APG(4, parallel_scale=0.5)
    with pytest.raises(ValueError, match="'linear-ag' needs coefficients="):
        attach(pipe, "linear-ag")


# --------------------------------------------------------------------------------------------------- equality


def test_rules_compare_equal_when_their_configs_are_equal():
    assert APG(3) == APG(3) and APG(3) == APG(3.0) and hash(APG(3)) == hash(APG(3.0))
    assert APG(3) != APG(4) and APG(3) != CFG(3) and CFG(3) != "cfg"
    assert AdaptiveGuidance(APG(5), threshold=0.99) == AdaptiveGuidance("apg", guidance_scale=5, threshold=0.99)
    assert TAG(window=(900, 100)) == from_config(json.loads(json.dumps(TAG(window=(900, 100)).config())))
    assert len({APG(3), APG(3.0), CFG(3), CFG(3)}) == 2
    net = torch.nn.Linear(64, 10)
    assert GFCG(net) == GFCG(net) and GFCG(net) != GFCG(torch.nn.Linear(64, 10))  # networks compare by identity
    assert hash(GFCG(net)) == hash(GFCG(net))



def test_gfcg_lambda_has_its_own_name_and_the_old_keyword_still_works():
    """``guidance_scale`` is CFG's w everywhere; GFCG's lambda is ``confusion_scale`` (old keyword: a warning)."""
    net = torch.nn.Linear(64, 10)
    with pytest.warns(FutureWarning, match="confusion_scale"):
        old = GFCG(net, guidance_scale=1.5)
    assert old == GFCG(net, confusion_scale=1.5) and old.confusion_scale == 1.5
    assert "guidance_scale" not in old.config() and old.config()["confusion_scale"] == 1.5
    with pytest.warns(FutureWarning):
        rebuilt = from_config({"name": "gfcg", "guidance_scale": 0.5, "classifier": net})
    assert rebuilt.confusion_scale == 0.5
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"guidance_scale must be in \[0.0, inf\]"):
        GFCG(net, guidance_scale=-1.0)  # the error names the keyword as passed
    with pytest.raises(ValueError, match="not both"):
        GFCG(net, confusion_scale=1.0, guidance_scale=1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        GFCG(net, confusion_scal=1.0)
    # the tools' scale is each rule's strength: lambda for GFCG, w for the Autoguidance nested in it
    nested = resolve_guidance("gfcg+autoguidance", guidance_scale=3.0, inputs={"classifier": net, "model": net})
    assert nested.confusion_scale == 3.0 and nested.autoguidance.guidance_scale == 3.0 and nested.cfg_scale is None


def test_guidance_scale_means_only_the_cfg_like_w():
    """A rule whose strength is not a CFG-like w names it otherwise and takes no ``guidance_scale`` (so the word
    keeps one meaning across the library); every declared strength is a real constructor argument."""
    from guidance.registry import available_guidance, constructor_parameters, guidance_class

    for name in available_guidance():
        cls = guidance_class(name)
        params = constructor_parameters(cls)
        if cls.scale_argument != "guidance_scale":
            assert cls.scale_argument in params and "guidance_scale" not in params, name
        assert set(cls.renamed.values()) <= set(params) and not set(cls.renamed) & set(params), name


# ------------------------------------------------------------------------------------- one word per concept: eta

#: each rule's own name for what its paper calls eta (and a value other than its default)
RENAMED_ETA = [(APG, "parallel_scale", 0.5), (TAG, "tangential_scale", 1.3), (TAGCFG, "tangential_weight", 2.0)]


@pytest.mark.parametrize(("cls", "new", "value"), RENAMED_ETA, ids=[cls.__name__ for cls, _, _ in RENAMED_ETA])
def test_eta_is_a_deprecated_alias_of_each_rules_own_name(cls, new, value):
    with pytest.warns(FutureWarning, match=rf"{cls.__name__}\(eta=\) is deprecated: it is {new}="):
        old = cls(eta=value)
    current = cls(**{new: value})
    assert old == current and getattr(old, new) == value
    assert old.config() == current.config() and old.config()[new] == value and "eta" not in old.config()
    with pytest.warns(FutureWarning, match=new):  # a config written before the rename still builds the same rule
        assert from_config({"name": cls.name, "eta": value}) == current
    with pytest.warns(FutureWarning, match=new):
        assert resolve_guidance(json.dumps({"name": cls.name, "eta": value})) == current
    with pytest.raises(ValueError, match="not both"):
        cls(**{new: value, "eta": value})
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls(etta=value)


@pytest.mark.parametrize(("cls", "new"), [(TAG, "tangential_scale"), (TAGCFG, "tangential_weight")])
def test_range_errors_name_the_argument_as_it_was_passed(cls, new):
    with pytest.raises(ValueError, match=rf"^{new} must be in"):
        cls(**{new: -1.0})
    with pytest.raises(ValueError, match=r"^eta must be in"), pytest.warns(FutureWarning):
        cls(eta=-1.0)


def test_no_registered_rule_takes_an_argument_named_eta():
    """Diffusers' scheduler eta (``pipe(..., eta=0)``) is the only eta left: every rule names what its factor scales."""
    from guidance.registry import _REGISTRY

    assert {"apg", "tag", "tag-cfg"} <= set(_REGISTRY)
    offenders = {name: cls.__name__ for name, cls in _REGISTRY.items()
                 if "eta" in inspect.signature(cls.__init__).parameters}
    assert offenders == {}
    assert {cls.__name__ for cls in _REGISTRY.values() if "eta" in cls.renamed} == {"APG", "TAG", "TAGCFG"}


def test_an_old_keyword_reaches_its_rule_in_a_composed_name():
    """``get_guidance("nlg+tag", eta=1.3)`` gives TAG's old keyword to TAG (with the warning), as for a single name."""
    with pytest.warns(FutureWarning, match="tangential_scale"):
        rule = get_guidance("nlg+tag", eta=1.3)
    assert rule == ComposedGuidance([NLG(), TAG(tangential_scale=1.3)])
    with pytest.raises(ValueError, match="no module takes 'eta'"):
        get_guidance("nlg+cfg", eta=1.3)
