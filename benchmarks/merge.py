"""Benchmark merging K float32 SmolLM2-135M checkpoints: merit-jax against mergekit.

Setup (not timed): K Hugging Face model directories (config.json, tokenizer,
one float32 ``model.safetensors``) of SmolLM2-135M's shape. With ``--source
gguf`` (the default), model k is the real SmolLM2-135M-Instruct from the cached
GGUF plus a random perturbation of 1% of each tensor's standard deviation.
``--source random`` uses random weights and a word-level tokenizer. The same K
models are also written as orbax parameter checkpoints, with orbax's default
zstd compression, as the branch trainer writes them.

Timed runs, each in a fresh subprocess (process start and imports included):

- ``mergekit``: mergekit's linear merge through its CLI, ``mergekit-yaml``,
  from a separate virtual env that this script creates on first use
  (``~/.cache/merit-jax/bench-venvs/mergekit``, mergekit plus torch==2.13.0,
  the CPU build);
- ``merit-jax hf``: ``merit_jax.merge.merge_hf_dirs`` on the same directories;
- ``numpy floor``: the plain streaming merge the project measures itself
  against: ``safe_open`` every input, sum w_k * tensor per key with numpy,
  ``safetensors.numpy.save_file``;
- ``merit-jax orbax`` (``--no-orbax`` skips it): ``merge_checkpoints`` on the
  orbax checkpoints, the path ``merit merge`` takes.

All runs use weights 0.1, 0.2, 0.3, 0.4 (for K = 4; w_k proportional to k + 1
otherwise). Runs are interleaved, ``--repeats`` times, with a ``sync`` before
each, and the report gives medians. "merge" is the time after imports, as
the child process measures it. "private" is the peak of RssAnon (anonymous
resident memory) and "rss" the peak of VmRSS of the process tree, both
sampled every 5 ms; RSS also counts memory-mapped input pages.

Usage: python benchmarks/merge.py [--models 4] [--repeats 3] [--source gguf|random]
       [--workdir DIR] [--no-orbax] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shapes import SMOLLM2_135M  # benchmarks/shapes.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
DEFAULT_VENV = Path.home() / ".cache" / "merit-jax" / "bench-venvs" / "mergekit"


OURS_HF = """
import json, sys, time
start = time.perf_counter()
from merit_jax.merge.hf import merge_hf_dirs
imported = time.perf_counter()
args = json.loads(sys.argv[1])
merge_hf_dirs(args["inputs"], args["out"], weights=args["weights"])
print(json.dumps({"import_s": imported - start, "merge_s": time.perf_counter() - imported}))
"""

OURS_ORBAX = """
import json, sys, time
start = time.perf_counter()
from merit_jax.merge.streaming import merge_checkpoints
imported = time.perf_counter()
args = json.loads(sys.argv[1])
merge_checkpoints(args["inputs"], args["out"], weights=args["weights"])
print(json.dumps({"import_s": imported - start, "merge_s": time.perf_counter() - imported}))
"""

FLOOR = """
import json, os, shutil, sys, time
start = time.perf_counter()
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
imported = time.perf_counter()
args = json.loads(sys.argv[1])
os.makedirs(args["out"])
handles = [safe_open(os.path.join(d, "model.safetensors"), "np") for d in args["inputs"]]
merged = {}
for key in handles[0].keys():
    total = handles[0].get_tensor(key).astype(np.float32) * np.float32(args["weights"][0])
    for handle, weight in zip(handles[1:], args["weights"][1:]):
        total += handle.get_tensor(key).astype(np.float32) * np.float32(weight)
    merged[key] = total
save_file(merged, os.path.join(args["out"], "model.safetensors"), metadata={"format": "pt"})
shutil.copy(os.path.join(args["inputs"][0], "config.json"), args["out"])
print(json.dumps({"import_s": imported - start, "merge_s": time.perf_counter() - imported}))
"""


# --------------------------------------------------------------------------- setup


def ensure_mergekit(venv: Path) -> Path:
    """Return the mergekit-yaml of ``venv``, creating the env with pip when it is missing."""
    cli = venv / "bin" / "mergekit-yaml"
    if cli.is_file():
        return cli
    print(f"creating {venv} with mergekit=={MERGEKIT_VERSION} and {TORCH_PIN} ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN],
        check=True,
    )
    return cli


def word_tokenizer(vocab_size: int) -> Any:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )


def base_model(source: str) -> tuple[Any, dict[str, Any], Any]:
    """Return (ModelConfig, HF-named float32 tensors, tokenizer) of the base model."""
    import numpy as np

    from merit_jax.models.config import ModelConfig
    from merit_jax.models.decoder import init_decoder
    from merit_jax.models.weights import hf_from_decoder

    if source == "gguf":
        from merit_jax.models.pretrained import load_pretrained

        pretrained = load_pretrained("smollm2-135m-instruct")
        return pretrained.config, hf_from_decoder(pretrained.model), pretrained.tokenizer
    config = ModelConfig(**SMOLLM2_135M)
    rng = np.random.default_rng(0)
    tensors = {}
    for key, array in hf_from_decoder(init_decoder(config)).items():
        noise = rng.standard_normal(array.shape, dtype=np.float32)
        tensors[key] = (1 + 0.1 * noise) if "norm" in key else 0.02 * noise
    return config, tensors, word_tokenizer(config.vocab_size)


def write_inputs(workdir: Path, num_models: int, source: str, with_orbax: bool) -> Any:
    """Write the K model directories (and orbax checkpoints); return the ModelConfig."""
    import numpy as np
    from safetensors.numpy import save_file

    config, tensors, tokenizer = base_model(source)
    hf_config = {**config.to_hf_dict(), "torch_dtype": "float32"}
    for k in range(num_models):
        rng = np.random.default_rng(100 + k)
        model = {}
        for key, array in tensors.items():
            scale = np.float32(0.01 * float(array.std()))
            noise = rng.standard_normal(array.shape, dtype=np.float32)
            model[key] = (array + scale * noise).astype(np.float32)
        directory = workdir / "inputs" / f"model{k}"
        directory.mkdir(parents=True)
        save_file(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
        tokenizer.save_pretrained(str(directory))
        if with_orbax:
            write_orbax(config, model, workdir / "orbax" / f"model{k}")
        print(f"  wrote model {k + 1}/{num_models}", flush=True)
    return config


def write_orbax(config: Any, tensors: dict[str, Any], directory: Path) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from merit_jax.models.weights import decoder_from_hf

    state = nnx.state(decoder_from_hf(config, tensors), nnx.Param).to_pure_dict()
    # Written as the branch trainer writes final/: orbax's defaults, zstd compression included.
    params = jax.tree.map(np.asarray, state)
    ocp.PyTreeCheckpointer().save(directory / "final", args=ocp.args.PyTreeSave(params))


# --------------------------------------------------------------------------- measuring


def _tree_pids(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return pids


def _memory_kb(pid: int) -> tuple[int, int]:
    """Return (RssAnon, VmRSS) of ``pid`` in kB, or zeros once it has exited."""
    anonymous = resident = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    anonymous = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    resident = int(line.split()[1])
    except OSError:
        pass
    return anonymous, resident


def run_measured(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; return its wall time, peak private memory, peak RSS and JSON output."""
    subprocess.run(["sync"], check=False)
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, cwd=REPO_ROOT)
        peak_private_kb = peak_rss_kb = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_private_kb, peak_rss_kb
            while not done.is_set():
                sizes = [_memory_kb(pid) for pid in _tree_pids(process.pid)]
                peak_private_kb = max(peak_private_kb, sum(s[0] for s in sizes))
                peak_rss_kb = max(peak_rss_kb, sum(s[1] for s in sizes))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        process.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read().decode(), stderr.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(
            f"{command[0]} failed with exit code {process.returncode}:\n{errors[-3000:]}"
        )
    result: dict[str, Any] = {
        "wall_s": wall,
        "private_mb": peak_private_kb / 1024,
        "rss_mb": peak_rss_kb / 1024,
    }
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
    return result


# --------------------------------------------------------------------------- comparing


def read_tensors(directory: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def max_abs_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    import numpy as np

    if set(a) != set(b):
        raise ValueError(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def reference_error(inputs: list[Path], weights: list[float], merged: dict[str, Any]) -> float:
    import numpy as np
    from safetensors import safe_open

    handles = [safe_open(str(d / "model.safetensors"), "np") for d in inputs]
    worst = 0.0
    for key, value in merged.items():
        exact = sum(
            w * h.get_tensor(key).astype(np.float64) for w, h in zip(weights, handles, strict=True)
        )
        worst = max(worst, float(np.max(np.abs(value - exact))))
    return worst


def orbax_as_hf(config: Any, checkpoint: Path) -> dict[str, Any]:
    from merit_jax.merge.checkpoint import decoder_from_params, load_params
    from merit_jax.models.weights import hf_from_decoder

    return hf_from_decoder(decoder_from_params(config, load_params(checkpoint)))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=4, help="number of models K (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    parser.add_argument("--source", choices=("gguf", "random"), default="gguf")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="mergekit's virtual env")
    parser.add_argument("--no-orbax", action="store_true", help="skip the orbax merge")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    mergekit = None if args.no_mergekit else ensure_mergekit(args.venv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merit-merge-bench-"))
    num_models = args.models
    weights = [(k + 1) / (num_models * (num_models + 1) / 2) for k in range(num_models)]
    if num_models == 4:
        weights = [0.1, 0.2, 0.3, 0.4]

    print(f"writing {num_models} models ({args.source}) to {workdir}", flush=True)
    if not (workdir / "inputs").is_dir():
        config = write_inputs(workdir, num_models, args.source, not args.no_orbax)
    else:
        from merit_jax.models.config import ModelConfig

        config = ModelConfig.from_json(workdir / "inputs" / "model0" / "config.json")
    inputs = [workdir / "inputs" / f"model{k}" for k in range(num_models)]
    outputs = workdir / "outputs"
    # Warm the page cache, so that every run reads the inputs from memory.
    for directory in inputs:
        (directory / "model.safetensors").read_bytes()

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    runs: dict[str, list[str]] = {}
    if mergekit is not None:
        yaml = {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": str(d), "parameters": {"weight": w}}
                for d, w in zip(inputs, weights, strict=True)
            ],
        }
        (workdir / "mergekit.yml").write_text(json.dumps(yaml, indent=2))  # YAML is a JSON superset
        runs["mergekit"] = [str(mergekit), str(workdir / "mergekit.yml"), "{out}", "--quiet"]
    hf_args = {"inputs": [str(d) for d in inputs], "weights": weights}
    runs["merit-jax hf"] = [sys.executable, "-c", OURS_HF, "{hf_args}"]
    runs["numpy floor"] = [sys.executable, "-c", FLOOR, "{hf_args}"]
    if not args.no_orbax:
        runs["merit-jax orbax"] = [sys.executable, "-c", OURS_ORBAX, "{orbax_args}"]
    orbax_inputs = [str(workdir / "orbax" / f"model{k}" / "final") for k in range(num_models)]

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, template in runs.items():
            out = outputs / name.replace(" ", "-")
            shutil.rmtree(out, ignore_errors=True)
            command = [
                part.replace("{out}", str(out))
                .replace("{hf_args}", json.dumps({**hf_args, "out": str(out)}))
                .replace(
                    "{orbax_args}",
                    json.dumps({"inputs": orbax_inputs, "weights": weights, "out": str(out)}),
                )
                for part in template
            ]
            result = run_measured(command, env)
            results[name].append(result)
            print(
                f"  repeat {repeat + 1}: {name:16s} {result['wall_s']:6.2f} s, "
                f"private {result['private_mb']:7.0f} MB",
                flush=True,
            )

    summary = {
        name: {
            key: statistics.median(r[key] for r in rows)
            for key in ("wall_s", "private_mb", "rss_mb", "merge_s", "import_s")
            if all(key in r for r in rows)
        }
        for name, rows in results.items()
    }
    ours = read_tensors(outputs / "merit-jax-hf")
    differences = {
        "merit-jax hf vs float64 reference": reference_error(inputs, weights, ours),
        "numpy floor vs merit-jax hf": max_abs_difference(
            read_tensors(outputs / "numpy-floor"), ours
        ),
    }
    if "mergekit" in runs:
        differences["mergekit vs merit-jax hf"] = max_abs_difference(
            read_tensors(outputs / "mergekit"), ours
        )
    if "merit-jax orbax" in runs:
        orbax = orbax_as_hf(config, outputs / "merit-jax-orbax" / "final")
        differences["merit-jax orbax vs merit-jax hf"] = max_abs_difference(orbax, ours)

    report(summary, differences, num_models, args, workdir)
    if args.json:
        args.json.write_text(
            json.dumps({"runs": results, "summary": summary, "max_abs": differences}, indent=2)
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def report(summary, differences, num_models, args, workdir) -> None:
    print()
    print(
        f"Merge of {num_models} float32 SmolLM2-135M checkpoints ({args.source}), "
        f"median of {args.repeats}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'run':18s} {'end-to-end s':>13s} {'merge s':>8s} {'import s':>9s} "
        f"{'private MB':>11s} {'peak RSS MB':>12s}"
    )
    for name, row in summary.items():
        merge = f"{row['merge_s']:8.2f}" if "merge_s" in row else f"{'-':>8s}"
        imports = f"{row['import_s']:9.2f}" if "import_s" in row else f"{'-':>9s}"
        print(
            f"{name:18s} {row['wall_s']:13.2f} {merge} {imports} {row['private_mb']:11.0f} "
            f"{row['rss_mb']:12.0f}"
        )
    ours = summary["merit-jax hf"]
    print()
    if "mergekit" in summary:
        mk = summary["mergekit"]
        print(
            f"mergekit / merit-jax hf, end to end:     {mk['wall_s'] / ours['wall_s']:.2f}x "
            "(target >= 2)"
        )
        print(
            f"mergekit / merit-jax hf, private memory: {mk['private_mb'] / ours['private_mb']:.1f}x"
        )
    floor = summary["numpy floor"]
    print(
        f"merit-jax hf / numpy floor, merge phase: {ours['merge_s'] / floor['merge_s']:.2f}x "
        "(target <= 1.25)"
    )
    if "merit-jax orbax" in summary:
        orbax = summary["merit-jax orbax"]
        print(
            f"merit-jax orbax / numpy floor, merge phase: "
            f"{orbax['merge_s'] / floor['merge_s']:.2f}x"
        )
    for name, value in differences.items():
        print(f"max |{name}|: {value:.3g}")


if __name__ == "__main__":
    main()
