"""The `lrp` method plugin: parameters, formats (eager, TorchScript, ONNX), extras and errors."""
from __future__ import annotations

import pytest
import torch

from xaicli.errors import UsageError
from xaicli.lrp import LRP, Settings, composite
from xaicli.model import Model
from xaicli.params import resolve
from xaicli.registry import create_registry


@pytest.fixture(scope="module")
def method():
    return create_registry().method("lrp")


@pytest.fixture(scope="module")
def models(digits) -> dict[str, Model]:
    """The digits CNN loaded from each format by the real loaders (ONNX: onnxruntime + converted graph)."""
    registry = create_registry()
    eager = Model("digits", digits.spec, torch.device("cpu"), module=digits.module)
    load = lambda path: registry.loader_for(str(path)).load(str(path), torch.device("cpu"))  # noqa: E731
    return {"eager": eager, "torchscript": load(digits.torchscript), "onnx": load(digits.onnx)}


def explain(method, model: Model, x: torch.Tensor, target: torch.Tensor, **given):
    return method.explain(model, x, target, None, **resolve(method.params, given))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).flatten(1).abs().amax(1) / b.flatten(1).abs().amax(1)).max().item()


def test_declares_graph_needs_and_parameters(method) -> None:
    assert method.needs == "graph"
    params = {p.name: p for p in method.params}
    assert params["composite"].default == "auto"  # AttnLRP with attention, else EpsilonPlusFlat
    assert set(params["composite"].choices) == {"auto", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1",
                                                "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox", "AttnLRP", "CPLRP"}
    assert (params["epsilon"].default, params["gamma"].default) == (1e-6, 0.25)
    assert {"low", "high", "rules_by_type", "rules_by_name", "record_layers"} <= set(params)


@pytest.mark.parametrize("comp", ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"])
def test_same_heatmap_from_eager_torchscript_and_onnx(method, models, digits, comp: str) -> None:
    x, target = digits.x[:8], digits.y[:8]
    heatmaps = {fmt: explain(method, model, x, target, composite=comp).relevance for fmt, model in models.items()}
    assert heatmaps["eager"].abs().amax() > 0
    assert relative(heatmaps["torchscript"], heatmaps["eager"]) <= 1e-4
    assert relative(heatmaps["onnx"], heatmaps["eager"]) <= 1e-4


def test_batched_result_equals_one_by_one(method, models, digits) -> None:
    x, target = digits.x[:6], digits.y[:6]
    together = explain(method, models["eager"], x, target, composite="EpsilonGammaBox").relevance
    alone = torch.cat([explain(method, models["eager"], x[i:i + 1], target[i:i + 1],
                               composite="EpsilonGammaBox").relevance for i in range(2)])
    torch.testing.assert_close(together[:2], alone, rtol=1e-5, atol=1e-6)


def test_default_box_is_the_pixel_range_through_the_input_spec(method, models, digits) -> None:
    x, target = digits.x[:4], digits.y[:4]
    got = explain(method, models["eager"], x, target, composite="EpsilonGammaBox").relevance
    mean, std = digits.spec.mean[0], digits.spec.std[0]
    settings = Settings(low=(-mean / std,), high=((1 - mean) / std,))
    want = LRP(models["eager"].graph(), composite("EpsilonGammaBox", settings))(x, target).relevance
    torch.testing.assert_close(got, want)
    other = explain(method, models["eager"], x, target, composite="EpsilonGammaBox", low=-3.0, high=3.0).relevance
    assert relative(other, got) > 1e-3


def test_record_layers_give_per_input_extras(method, models, digits) -> None:
    x, target = digits.x[:3], digits.y[:3]
    result = explain(method, models["onnx"], x, target, record_layers=["0", "10"])
    assert set(result.extras) == {"relevance:0", "relevance:10"}
    assert result.extras["relevance:0"].shape == (3, 16, 32, 32)
    assert result.extras["relevance:10"].shape == (3, 64, 8, 8)


def test_rules_by_type_in_mapping_and_command_line_form(method, models, digits) -> None:
    x, target = digits.x[:3], digits.y[:3]
    base = explain(method, models["eager"], x, target).relevance
    mapping = explain(method, models["eager"], x, target, rules_by_type={"conv": "epsilon:0.01"}).relevance
    text = explain(method, models["eager"], x, target, rules_by_type="conv=epsilon:0.01").relevance
    torch.testing.assert_close(mapping, text)
    assert relative(mapping, base) > 1e-3


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"record_layers": ["1O"]}, "record_layers: no layer '1O' in the model"),
        ({"rules_by_name": {"O": "flat"}}, "rules_by_name: no layer 'O' in the model"),
        ({"rules_by_type": {"conv": "gama"}}, "unknown rule 'gama' (did you mean 'gamma'?)"),
        ({"rules_by_type": {"maxpool": "z_plus"}}, "rule 'z_plus' does not apply to maxpool layers; allowed: gradient"),
        ({"rules_by_type": "conv gamma"}, "expected KEY=RULE pairs"),
        ({"composite": "EpsilonGammaBox", "low": 2.0, "high": 1.0}, "z_box needs low < high"),
        ({"composite": "EpsilonGammaBox", "low": [-1.0, -2.0]}, "one value or one per input channel (1); got 2"),
    ],
)
def test_errors_name_the_problem(method, models, digits, given: dict, message: str) -> None:
    with pytest.raises(UsageError) as info:
        explain(method, models["eager"], digits.x[:2], digits.y[:2], **given)
    assert message in str(info.value)
