"""The merge step of a run: orbax branch checkpoints against numpy references."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import save_file

from merit_jax.conflict.artifacts import sha256_path
from merit_jax.conflict.plan import PlanSettings, build_plan, save_plan
from merit_jax.merge import streaming
from merit_jax.merge.checkpoint import (
    decoder_from_params,
    flatten,
    load_params,
    unflatten,
)
from merit_jax.merge.errors import MergeError
from merit_jax.merge.hf import merge_hf_dirs
from merit_jax.merge.run import merge_run
from merit_jax.merge.streaming import merge_checkpoints
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import abstract_decoder
from merit_jax.models.weights import hf_from_decoder

THETA0 = "a" * 64
DATA = "b" * 64
# Task token budgets; groups [[0], [1, 4], [2], [3]] give N_k = 100, 700, 300, 900.
TOKENS = [100, 200, 300, 900, 500]
GROUPS = [[0], [1, 4], [2], [3]]
GROUP_TOKENS = [100, 700, 300, 900]


def tiny_config(**changes) -> ModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=37,
        hidden_size=12,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=4,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def random_params(config: ModelConfig, seed: int) -> dict:
    """A nested dict of random float32 numpy arrays in the Decoder's parameter layout."""
    rng = np.random.default_rng(seed)
    flat = {}
    state = nnx.state(abstract_decoder(config), nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        key = tuple(str(part) for part in path)
        shape = variable.get_value().shape
        scale, offset = (0.3, 1.0) if any("norm" in part for part in key) else (0.15, 0.0)
        flat[key] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    return unflatten(flat)


def save_checkpoint(path, params) -> None:
    # The way the branch trainer writes final/.
    ocp.PyTreeCheckpointer().save(path.absolute(), args=ocp.args.PyTreeSave(params))


def make_run(root, *, config=None, num_branches=4):
    """Write plan/plan.json and branches/<k>/{final,branch.json}; return (plan path, params)."""
    config = config or tiny_config()
    settings = PlanSettings(
        partitioner="merit",
        pca_dim=2 if num_branches == 4 else 1,
        sketch_dim=None,
        calibration_size=4,
        trainable_parameter_patterns=(".*",),
        loss_convention="sum of token cross-entropy over assistant tokens",
    )
    groups = GROUPS if num_branches == 4 else [[0, 1, 4], [2, 3]]
    plan = build_plan(
        task_names=[f"task{t}" for t in range(len(TOKENS))],
        samples=[10] * len(TOKENS),
        tokens=TOKENS,
        groups=groups,
        embedding=None,
        settings=settings,
        seed=0,
        theta0_sha256=THETA0,
        data_sha256=DATA,
    )
    plan_path = save_plan(plan, root / "plan" / "plan.json")
    params = []
    for k in range(num_branches):
        branch = root / "branches" / str(k)
        params.append(random_params(config, seed=k + 1))
        save_checkpoint(branch / "final", params[-1])
        info = {
            "branch": k,
            "tokens": plan.groups[k].tokens,
            "theta0_sha256": THETA0,
            "plan_sha256": sha256_path(plan_path),
        }
        (branch / "branch.json").write_text(json.dumps(info))
    return plan_path, params


def reference(params, weights) -> dict:
    flats = [flatten(p) for p in params]
    return {
        leaf: sum(w * f[leaf].astype(np.float64) for w, f in zip(weights, flats, strict=True))
        for leaf in flats[0]
    }


def assert_close_to(merged, expected):
    flat = flatten(merged)
    assert set(flat) == set(expected)
    for leaf, value in expected.items():
        assert flat[leaf].dtype == np.float32, leaf
        np.testing.assert_allclose(flat[leaf], value, rtol=1e-6, atol=1e-7, err_msg=str(leaf))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    plan_path, params = make_run(root)
    return root, plan_path, params


def copied_run(run, tmp_path):
    root, _, params = run
    shutil.copytree(root, tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "plan" / "plan.json", params


# --------------------------------------------------------------------------- values


def test_token_weights_match_reference(run, tmp_path):
    root, plan_path, params = run
    weights = np.array(GROUP_TOKENS) / sum(GROUP_TOKENS)

    result = merge_run(plan_path, out_dir=tmp_path / "merged")

    assert result.weighting == "token"
    np.testing.assert_allclose(result.weights, weights, rtol=1e-15)
    assert_close_to(load_params(result.checkpoint_dir), reference(params, weights))


def test_uniform_weights_match_reference(run, tmp_path):
    _, plan_path, params = run

    result = merge_run(plan_path, weights="uniform", out_dir=tmp_path / "merged")

    assert result.weights == (0.25, 0.25, 0.25, 0.25)
    assert_close_to(load_params(result.checkpoint_dir), reference(params, [0.25] * 4))


def test_explicit_weights_match_reference(run, tmp_path):
    _, plan_path, params = run
    weights = [0.5, 0.0, 0.25, 0.25]

    result = merge_run(plan_path, weights=weights, out_dir=tmp_path / "merged")

    assert result.weighting == "explicit"
    assert_close_to(load_params(result.checkpoint_dir), reference(params, weights))


def test_bfloat16_output(run, tmp_path):
    _, plan_path, params = run
    weights = np.array(GROUP_TOKENS) / sum(GROUP_TOKENS)
    full = merge_run(plan_path, out_dir=tmp_path / "f32")

    half = merge_run(plan_path, dtype="bfloat16", out_dir=tmp_path / "bf16")

    assert half.dtype == "bfloat16"
    full_flat = flatten(load_params(full.checkpoint_dir))
    half_flat = flatten(load_params(half.checkpoint_dir))
    expected = reference(params, weights)
    for leaf, value in half_flat.items():
        assert value.dtype == ml_dtypes.bfloat16, leaf
        # One rounding of the float32 sum, not a bfloat16 accumulation.
        np.testing.assert_array_equal(value, full_flat[leaf].astype(ml_dtypes.bfloat16))
        np.testing.assert_allclose(value.astype(np.float64), expected[leaf], rtol=2**-8, atol=1e-6)


def test_default_output_and_merge_json(run, tmp_path):
    root, _, _ = copied_run(run, tmp_path)

    result = merge_run(root / "plan")

    assert result.out_dir == root / "merged"
    assert result.checkpoint_dir == root / "merged" / "final"
    record = json.loads((root / "merged" / "merge.json").read_text())
    assert record["method"] == "linear"
    assert record["weighting"] == "token"
    assert record["weights"] == list(result.weights)
    assert record["dtype"] == "float32"
    assert record["plan_sha256"] == sha256_path(root / "plan" / "plan.json")
    assert record["theta0_sha256"] == THETA0
    assert [b["plan_tokens"] for b in record["branches"]] == GROUP_TOKENS
    assert record["num_parameters"] == result.num_parameters
    assert sorted(p.name for p in (root / "merged").iterdir()) == ["final", "merge.json"]


def test_hf_merge_equals_orbax_merge(run, tmp_path):
    _, plan_path, params = run
    config = tiny_config()
    weights = list(np.array(GROUP_TOKENS) / sum(GROUP_TOKENS))
    hf_dirs = []
    for k, branch_params in enumerate(params):
        directory = tmp_path / f"hf{k}"
        directory.mkdir()
        save_file(
            hf_from_decoder(decoder_from_params(config, branch_params)),
            str(directory / "model.safetensors"),
        )
        (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
        hf_dirs.append(directory)

    merge_hf_dirs(hf_dirs, tmp_path / "hf_merged", weights=weights)
    result = merge_run(plan_path, out_dir=tmp_path / "merged")

    from safetensors.numpy import load_file

    hf_merged = load_file(str(tmp_path / "hf_merged" / "model.safetensors"))
    orbax_merged = hf_from_decoder(decoder_from_params(config, load_params(result.checkpoint_dir)))
    assert set(hf_merged) == set(orbax_merged)
    for key, value in orbax_merged.items():
        # Same float32 operations in the same order: bit-identical results.
        np.testing.assert_array_equal(hf_merged[key], value, err_msg=key)


def test_merge_checkpoints_without_plan(run, tmp_path):
    root, _, params = run
    checkpoints = [root / "branches" / str(k) / "final" for k in range(4)]

    result = merge_checkpoints(checkpoints, tmp_path / "out", weights=[0.1, 0.2, 0.3, 0.4])

    assert_close_to(load_params(result.checkpoint_dir), reference(params, [0.1, 0.2, 0.3, 0.4]))


def test_small_leaves_read_in_groups(run, tmp_path, monkeypatch):
    root, _, params = run
    checkpoints = [root / "branches" / str(k) / "final" for k in range(2)]
    reads = []
    original = streaming.CheckpointReader.read

    def counting_read(self, leaves):
        leaves = list(leaves)
        reads.append(len(leaves))
        return original(self, leaves)

    monkeypatch.setattr(streaming.CheckpointReader, "read", counting_read)
    monkeypatch.setattr(streaming, "GROUP_BYTES", 1000)

    result = merge_checkpoints(checkpoints, tmp_path / "out", weights=[0.5, 0.5])

    num_leaves = len(flatten(params[0]))
    assert max(reads) > 1  # norm scales (48 bytes each) share reads
    assert sum(reads) == 2 * num_leaves  # every leaf read once per checkpoint
    assert_close_to(load_params(result.checkpoint_dir), reference(params[:2], [0.5, 0.5]))


# --------------------------------------------------------------------------- checks


def test_mismatches_listed_together(run, tmp_path):
    root, plan_path, params = copied_run(run, tmp_path)
    branches = root / "branches"
    # Branch 1: a leaf is missing. Branch 2: a wider MLP (three misshapen leaves).
    # Branch 3: another theta0 and another plan.
    missing = flatten(params[1])
    del missing[("lm_head",)]
    shutil.rmtree(branches / "1" / "final")
    save_checkpoint(branches / "1" / "final", unflatten(missing))
    shutil.rmtree(branches / "2" / "final")
    save_checkpoint(branches / "2" / "final", random_params(tiny_config(intermediate_size=21), 9))
    info = json.loads((branches / "3" / "branch.json").read_text())
    info.update(theta0_sha256="c" * 64, plan_sha256="d" * 64)
    (branches / "3" / "branch.json").write_text(json.dumps(info))

    with pytest.raises(MergeError) as raised:
        merge_run(plan_path)

    problems = raised.value.problems
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "branch 1: leaf lm_head is missing" in text
    for name in ("gate_kernel", "up_kernel", "down_kernel"):
        assert f"branch 2: leaf layers.mlp.{name} has shape" in text
    assert f"trained from theta0 '{'c' * 64}'" in text
    assert f"trained under plan '{'d' * 64}'" in text
    assert not (root / "merged").exists()


def test_missing_branch_and_bad_branch_json(run, tmp_path):
    root, plan_path, _ = copied_run(run, tmp_path)
    shutil.rmtree(root / "branches" / "2")
    (root / "branches" / "0" / "branch.json").write_text(json.dumps({"branch": 3}))
    (root / "branches" / "1" / "branch.json").write_text("{not json")

    with pytest.raises(MergeError) as raised:
        merge_run(plan_path)

    text = "\n".join(raised.value.problems)
    assert "branch 0 (" in text
    assert "missing key tokens" in text
    assert "missing key theta0_sha256 or theta0_hash" in text
    assert "records branch 3, but it lies in branches/0" in text
    assert "branch 1 (" in text
    assert "not valid JSON" in text
    assert "never trained" in text
    assert "final is not an orbax checkpoint or is missing" in text


def test_hash_keys_accept_hash_spelling(run, tmp_path):
    root, plan_path, params = copied_run(run, tmp_path)
    for k in range(4):
        path = root / "branches" / str(k) / "branch.json"
        info = json.loads(path.read_text())
        info["theta0_hash"] = info.pop("theta0_sha256")
        info["plan_hash"] = info.pop("plan_sha256")
        path.write_text(json.dumps(info))

    result = merge_run(plan_path, weights="uniform")

    assert_close_to(load_params(result.checkpoint_dir), reference(params, [0.25] * 4))


def test_run_dir_must_contain_branches(tmp_path):
    plan_source = tmp_path / "elsewhere"
    plan_source.mkdir()
    make_run(tmp_path / "run", num_branches=2)
    shutil.copy(tmp_path / "run" / "plan" / "plan.json", plan_source / "plan.json")

    with pytest.raises(FileNotFoundError, match="--run DIR"):
        merge_run(plan_source / "plan.json")

    result = merge_run(plan_source / "plan.json", run_dir=tmp_path / "run", weights="uniform")
    assert result.out_dir == tmp_path / "run" / "merged"


# --------------------------------------------------------------------------- outputs


def test_refuses_to_overwrite(run, tmp_path):
    _, plan_path, params = run
    merge_run(plan_path, out_dir=tmp_path / "merged")

    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_run(plan_path, weights="uniform", out_dir=tmp_path / "merged")

    result = merge_run(plan_path, weights="uniform", out_dir=tmp_path / "merged", overwrite=True)
    assert_close_to(load_params(result.checkpoint_dir), reference(params, [0.25] * 4))
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record["weighting"] == "uniform"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_failed_merge_leaves_no_output(run, tmp_path, monkeypatch):
    _, plan_path, _ = run
    calls = []
    original = streaming.CheckpointReader.read

    def failing_read(self, leaves):
        calls.append(self.path)
        if len(calls) == 3:
            raise RuntimeError("simulated crash mid-merge")
        return original(self, leaves)

    monkeypatch.setattr(streaming.CheckpointReader, "read", failing_read)

    with pytest.raises(RuntimeError, match="simulated crash"):
        merge_run(plan_path, out_dir=tmp_path / "merged")

    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_killed_merge_leaves_only_hidden_partial(run, tmp_path):
    _, plan_path, _ = run
    out = tmp_path / "merged"
    script = textwrap.dedent(
        f"""
        import os, signal
        from merit_jax.merge import streaming
        from merit_jax.merge.run import merge_run

        original = streaming.CheckpointReader.read
        calls = []

        def read(self, leaves):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, leaves)

        streaming.CheckpointReader.read = read
        merge_run({str(plan_path)!r}, out_dir={str(out)!r})
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    process = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)

    assert process.returncode == -9, process.stderr.decode()[-2000:]
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".merged.partial-")


# --------------------------------------------------------------------------- export


def tiny_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(30)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_export_loads_in_transformers_with_same_logits(run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from merit_jax.models.export import export_hf

    _, plan_path, _ = run
    config = tiny_config()
    theta0 = export_hf(
        decoder_from_params(config, random_params(config, 0)), tiny_tokenizer(), tmp_path / "t0"
    )

    result = merge_run(
        plan_path, out_dir=tmp_path / "merged", export_hf=tmp_path / "hf", theta0=theta0
    )

    assert result.hf_dir == tmp_path / "hf"
    merged = decoder_from_params(config, load_params(result.checkpoint_dir))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    ours, _ = merged(jnp.asarray(tokens))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    )
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("w0 w5")["input_ids"] == [3, 8]


def test_bfloat16_export_files(run, tmp_path):
    from safetensors import safe_open

    from merit_jax.models.export import export_hf

    _, plan_path, params = run
    config = tiny_config()
    theta0 = export_hf(
        decoder_from_params(config, random_params(config, 0)), tiny_tokenizer(), tmp_path / "t0"
    )

    result = merge_run(
        plan_path,
        dtype="bfloat16",
        out_dir=tmp_path / "merged",
        export_hf=tmp_path / "hf",
        theta0=theta0,
    )

    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["torch_dtype"] == "bfloat16"
    merged = flatten(load_params(result.checkpoint_dir))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="np") as handle:
        embed = handle.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(embed, merged[("embed",)])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_export_rejects_theta0_of_other_shape(run, tmp_path):
    from merit_jax.models.export import export_hf

    _, plan_path, _ = run
    other = tiny_config(hidden_size=16)
    theta0 = export_hf(
        decoder_from_params(other, random_params(other, 0)), tiny_tokenizer(), tmp_path / "t0"
    )

    with pytest.raises(MergeError, match="embed has shape \\[37, 16\\]"):
        merge_run(plan_path, out_dir=tmp_path / "merged", export_hf=tmp_path / "hf", theta0=theta0)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["t0"]


def test_export_requires_theta0(run, tmp_path):
    _, plan_path, _ = run
    with pytest.raises(ValueError, match="theta0"):
        merge_run(plan_path, out_dir=tmp_path / "merged", export_hf=tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_decoder_from_params_lists_problems():
    config = tiny_config()
    flat = flatten(random_params(config, 0))
    del flat[("embed",)]
    flat[("layers", "attn", "q_kernel")] = np.zeros((2, 12, 3, 5), np.float32)
    flat[("extra",)] = np.zeros(3, np.float32)

    with pytest.raises(ValueError) as raised:
        decoder_from_params(config, unflatten(flat))

    text = str(raised.value)
    assert "3 problem(s)" in text
    assert "missing parameter embed" in text
    assert "layers.attn.q_kernel has shape [2, 12, 3, 5]" in text
    assert "unexpected parameter extra" in text


def test_decoder_from_params_round_trip():
    config = tiny_config()
    params = random_params(config, 0)
    model = decoder_from_params(config, params)
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        key = tuple(str(part) for part in path)
        np.testing.assert_array_equal(np.asarray(variable.get_value()), flatten(params)[key])
    logits, _ = model(jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, config.vocab_size)


def test_merges_branches_written_by_trainer(tmp_path):
    train_checkpoint = pytest.importorskip("merit_jax.train.checkpoint")
    root = tmp_path / "run"
    plan_path, _ = make_run(root, num_branches=2)
    params = []
    for k in range(2):
        branch = root / "branches" / str(k)
        info = json.loads((branch / "branch.json").read_text())
        shutil.rmtree(branch)
        params.append(random_params(tiny_config(), seed=10 + k))
        train_checkpoint.write_final(branch, params[-1], info)

    result = merge_run(plan_path, weights=[0.25, 0.75])

    assert_close_to(load_params(result.checkpoint_dir), reference(params, [0.25, 0.75]))
