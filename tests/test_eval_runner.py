"""evaluate_model / evaluate_models end to end on tiny models, the results files, exact match."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from merit_jax.data.task import Example, MultipleChoiceExample, MultipleChoiceTask
from merit_jax.data.testing import chatml_byte_tokenizer
from merit_jax.eval.generation import evaluate_exact_match, is_exact_match, stop_token_ids
from merit_jax.eval.held_out import held_out_losses, prepare_held_out
from merit_jax.eval.multiple_choice import evaluate_multiple_choice
from merit_jax.eval.runner import EvalSpec, evaluate_model, evaluate_models, format_markdown
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import Decoder, init_decoder
from merit_jax.models.generate import generate
from merit_jax.models.tokenizer import apply_chat_template


def tiny_model(seed: int) -> Decoder:
    config = ModelConfig(
        model_type="llama",
        vocab_size=3 + 256,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        eos_token_id=2,
    )
    model = init_decoder(config, seed=seed)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf * 8.0, state))


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_byte_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {"theta0": tiny_model(0), "merged": tiny_model(1)}


MC_TASK = MultipleChoiceTask(
    name="colors",
    source="test",
    examples=(
        MultipleChoiceExample("Sky?", ("blue", "red"), (1, 0), output_prefix="\nA: "),
        MultipleChoiceExample("Grass?", ("green", "blue", "red"), (1, 0, 0), output_prefix="\nA: "),
        MultipleChoiceExample("Snow?", ("white", "black"), (1, 1), output_prefix="\nA: "),
    ),
)
HELD_OUT = {
    "add": (Example("Add 1 and 2.", "3"), Example("Add 2 and 2.", "4")),
    "echo": (Example("Echo", "hello there", input="hello there"),),
}


def make_spec(**overrides) -> EvalSpec:
    fields = dict(
        multiple_choice=(MC_TASK,),
        held_out=HELD_OUT,
        exact_match={"add": HELD_OUT["add"]},
        num_examples=2,
        max_length=64,
        batch_tokens=256,
        held_out_batch_size=2,
        max_new_tokens=3,
        generation_batch_size=2,
    )
    fields.update(overrides)
    return EvalSpec(**fields)


def test_eval_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="no tasks"):
        EvalSpec()
    with pytest.raises(ValueError, match="num_examples=0"):
        make_spec(num_examples=0)
    with pytest.raises(ValueError, match="max_length=1 must be at least 2"):
        make_spec(max_length=1)
    with pytest.raises(ValueError, match="truncation='right'"):
        make_spec(truncation="right")
    with pytest.raises(ValueError, match="duplicate multiple-choice task names"):
        make_spec(multiple_choice=(MC_TASK, MC_TASK))
    with pytest.raises(ValueError, match="seed='1'"):
        make_spec(seed="1")


def test_chance_uses_the_evaluated_examples():
    assert make_spec().chance() == {"colors": pytest.approx((1 / 2 + 1 / 3) / 2)}
    assert make_spec(num_examples=None).chance() == {
        "colors": pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    }


def test_evaluate_model_agrees_with_parts(tokenizer, models):
    spec = make_spec()
    model = models["theta0"]
    results = evaluate_model(model, tokenizer, spec)

    direct_mc = evaluate_multiple_choice(
        model, tokenizer, [MC_TASK], num_examples=2, max_length=64, batch_tokens=256
    )["colors"]
    assert results["multiple_choice"]["colors"]["acc"] == direct_mc.acc
    assert results["multiple_choice"]["colors"]["n"] == 2
    assert results["multiple_choice"]["colors"]["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)

    data = prepare_held_out(tokenizer, HELD_OUT, seq_len=64, batch_size=2)
    direct_loss = held_out_losses(model, data)
    for name in HELD_OUT:
        assert results["held_out"][name]["loss"] == pytest.approx(direct_loss[name].loss)
    assert np.isfinite(results["held_out_pooled_loss"])
    assert 0.0 <= results["exact_match"]["add"]["exact_match"] <= 1.0
    assert results["exact_match"]["add"]["n"] == 2


def test_evaluate_models_writes_json_and_markdown(tokenizer, models, tmp_path):
    loads = []

    def load_merged() -> Decoder:
        loads.append("merged")
        return models["merged"]

    spec = make_spec()
    report = evaluate_models(
        {"theta0": models["theta0"], "merged": load_merged}, tokenizer, spec, out_dir=tmp_path
    )
    assert loads == ["merged"]
    assert list(report["models"]) == ["theta0", "merged"]

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["format"] == 1
    assert written["spec"]["multiple_choice"] == ["colors"]
    assert written["chance"]["colors"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    for name in ("theta0", "merged"):
        entry = written["models"][name]
        assert 0.0 <= entry["multiple_choice"]["colors"]["acc"] <= 1.0
        assert set(entry["held_out"]) == {"add", "echo"}
    # The two models differ, so their held-out losses differ.
    assert (
        written["models"]["theta0"]["held_out"]["add"]["loss"]
        != written["models"]["merged"]["held_out"]["add"]["loss"]
    )

    markdown = (tmp_path / "results.md").read_text()
    assert "| task | metric | chance | theta0 | merged |" in markdown
    assert "| task | theta0 | merged |" in markdown
    assert markdown.count("| colors |") == 2


def test_format_markdown_hand_report():
    report = {
        "spec": {"held_out": {"t": 1}, "exact_match": {}},
        "chance": {"mc": 0.25},
        "models": {
            "a": {
                "multiple_choice": {
                    "mc": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75, "acc_norm_stderr": None}
                },
                "held_out": {"t": {"loss": 1.23456}},
                "held_out_pooled_loss": 1.23456,
                "exact_match": {},
            }
        },
    }
    lines = format_markdown(report).splitlines()
    assert "| mc | acc | 0.250 | 0.500 ± 0.100 |" in lines
    assert "| mc | acc_norm | 0.250 | 0.750 |" in lines
    assert "| **mean** | acc | 0.250 | 0.500 |" in lines
    assert "| t | 1.2346 |" in lines
    assert "| **pooled** | 1.2346 |" in lines
    assert not any("Exact match" in line for line in lines)


def test_is_exact_match():
    assert is_exact_match(" 42\n", "42")
    assert not is_exact_match("42.", "42")
    assert not is_exact_match("Blue", "blue")


def test_exact_match_against_generate(tokenizer, models):
    model = models["theta0"]
    eos_ids = stop_token_ids(model, tokenizer)
    assert eos_ids == [2]
    prompt_ids = apply_chat_template(
        tokenizer, [{"role": "user", "content": "Add 1 and 2."}], add_generation_prompt=True
    ).token_ids
    [reply] = generate(model, [prompt_ids], max_new_tokens=3, eos_ids=eos_ids)
    predicted = tokenizer.decode(reply, skip_special_tokens=True)
    if not predicted.strip():
        pytest.skip("the random model's greedy reply is blank; no reference text to match")

    tasks = {"add": (Example("Add 1 and 2.", predicted.strip()), Example("Add 1 and 2.", "nope"))}
    result = evaluate_exact_match(model, tokenizer, tasks, max_new_tokens=3, batch_size=4)["add"]
    assert result.predictions == (predicted, predicted)
    assert result.exact_match == pytest.approx(0.5)
    assert result.n == 2
