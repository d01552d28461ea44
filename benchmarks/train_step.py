"""Benchmark one training step (forward, backward, AdamW) in JAX and in PyTorch.

The model has SmolLM2-135M's dimensions (Llama, 30 layers, D 576, N 9, K 3,
H 64, F 1536, V 49152, tied embeddings). The parent process writes one random
initialization as safetensors and starts one subprocess per configuration, so
that each peak resident memory (``resource.getrusage``) is that run's own:

- JAX, float32 parameters and compute: ``jax.jit`` over the ``nnx.split``
  state with the parameters and optimizer state donated, optax AdamW;
- JAX, float32 parameters with bfloat16 compute (``--no-bf16`` skips it);
- PyTorch: transformers' ``LlamaForCausalLM`` from the same weights and
  ``torch.optim.AdamW`` with the same hyperparameters (``--no-torch`` skips it).

The runs then take turns step by step, so that load from other processes
falls on all of them alike. All train on the same random batch, so their
losses should agree, and the report prints each run's largest loss
difference from JAX float32.

Achieved FLOP/s counts 6 * P + 12 * L * D * T floating-point operations per
token (forward plus backward). P is the parameter count with the tied
embedding counted once, because the LM head uses it as a matmul. The second
term is attention's two T x T matmuls per layer. Peak FLOP/s is a measured
2048^3 matmul in JAX, float32 and bfloat16 inputs with float32 accumulation,
and MFU is achieved / peak of the run's compute dtype.

Usage: python benchmarks/train_step.py [--batch 4] [--seq 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shapes import SMOLLM2_135M  # benchmarks/shapes.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent


# AdamW hyperparameters shared by both frameworks (torch.optim.AdamW's defaults,
# except the learning rate).
LEARNING_RATE = 3e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_token(num_params: int, seq: int) -> float:
    """Return forward-plus-backward FLOPs per token: 6 * P + 12 * L * D * T."""
    layers, hidden = SMOLLM2_135M["num_hidden_layers"], SMOLLM2_135M["hidden_size"]
    return 6.0 * num_params + 12.0 * layers * hidden * seq


def random_batch(batch: int, seq: int, seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, SMOLLM2_135M["vocab_size"], size=(batch, seq), dtype=np.int32)


def _model_config(compute_dtype: str, scan_layers: bool, remat: bool) -> Any:
    from merit_jax.models.config import ModelConfig

    return ModelConfig(
        **SMOLLM2_135M,
        param_dtype="float32",
        compute_dtype=compute_dtype,
        scan_layers=scan_layers,
        remat=remat,
    )


# --------------------------------------------------------------------------- workers
#
# A worker builds its model and optimizer, prints one JSON line with its setup,
# then runs one training step for every "step" line on stdin and replies with
# a JSON line of the step time and loss. "done" makes it print its peak RSS
# and exit. The parent alternates steps between workers, so that load from
# other processes on the machine falls on all frameworks alike.


def _serve(setup: dict[str, Any], train_step: Any) -> None:
    print(json.dumps(setup), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            break
        if command != "step":
            raise ValueError(f"unknown worker command {command!r}; expected 'step' or 'done'")
        start = time.perf_counter()
        loss = train_step()
        print(json.dumps(dict(step_s=time.perf_counter() - start, loss=loss)), flush=True)
    print(json.dumps(dict(peak_rss_mb=peak_rss_mb())), flush=True)


def serve_jax(args: argparse.Namespace) -> None:
    """Serve JAX training steps: jax.jit over the nnx.split state, optax AdamW."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from merit_jax.models.decoder import init_decoder
    from merit_jax.models.loss import masked_lm_loss

    config = _model_config(args.compute_dtype, args.scan, args.remat)
    start = time.perf_counter()
    graphdef, params = nnx.split(init_decoder(config, seed=args.seed))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = optax.adamw(
        LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY
    )
    opt_state = optimizer.init(params)
    init_s = time.perf_counter() - start

    tokens_bt = jnp.asarray(random_batch(args.batch, args.seq, args.seed))
    loss_mask_bt = jnp.ones_like(tokens_bt, dtype=bool)
    vocab_chunk = args.vocab_chunk or None

    def train_step(params, opt_state, tokens_bt, loss_mask_bt):
        def mean_loss(params):
            loss_sum, count = masked_lm_loss(
                nnx.merge(graphdef, params), tokens_bt, loss_mask_bt, vocab_chunk_size=vocab_chunk
            )
            return loss_sum / count

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = (
        jax.jit(train_step, donate_argnums=(0, 1))
        .lower(params, opt_state, tokens_bt, loss_mask_bt)
        .compile()
    )
    compile_s = time.perf_counter() - start
    state = [params, opt_state]
    del params, opt_state

    def step() -> float:
        state[0], state[1], loss = compiled(state[0], state[1], tokens_bt, loss_mask_bt)
        return float(loss)  # float() waits for the step to finish

    setup = dict(
        num_params=int(num_params),
        init_s=init_s,
        compile_s=compile_s,
        backend=f"jax {jax.__version__} on {jax.devices()[0].platform}",
    )
    _serve(setup, step)


def serve_torch(args: argparse.Namespace) -> None:
    """Serve PyTorch training steps: transformers' LlamaForCausalLM, torch.optim.AdamW."""
    import torch
    import transformers
    from safetensors.torch import load_file

    config = _model_config("float32", True, False)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    weights = load_file(args.weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    del weights
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.float().train()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    init_s = time.perf_counter() - start
    tokens = torch.from_numpy(random_batch(args.batch, args.seq, args.seed)).long()

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    setup = dict(
        num_params=int(num_params),
        init_s=init_s,
        compile_s=0.0,
        backend=(
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"attention {model.config._attn_implementation}, {torch.get_num_threads()} threads"
        ),
    )
    _serve(setup, step)


# --------------------------------------------------------------------------- parent


def measure_matmul_peaks(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Return the best GFLOP/s of a size^3 matmul: JAX float32, JAX bf16 x bf16 -> f32, numpy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    flops = 2.0 * size**3
    a32 = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b32 = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
    f32 = jax.jit(lambda a, b: a @ b)
    bf16 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))

    def best_gflops(fn, *operands) -> float:
        jax.block_until_ready(fn(*operands))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*operands))
            best = min(best, time.perf_counter() - start)
        return flops / best / 1e9

    a_np, b_np = np.asarray(a32), np.asarray(b32)
    return dict(
        jax_float32=best_gflops(f32, a32, b32),
        jax_bfloat16=best_gflops(bf16, a16, b16),
        numpy_float32=best_gflops(lambda a, b: a @ b, a_np, b_np),
    )


def write_initial_weights(path: Path, seed: int) -> None:
    """Save ``init_decoder(config, seed)`` in Hugging Face names, for the PyTorch run."""
    from safetensors.numpy import save_file

    from merit_jax.models.decoder import init_decoder
    from merit_jax.models.weights import hf_from_decoder

    save_file(hf_from_decoder(init_decoder(_model_config("float32", True, False), seed)), path)


class Worker:
    """One framework configuration running in its own subprocess."""

    def __init__(self, label: str, worker: str, extra: list[str], args: argparse.Namespace):
        self.label = label
        command = [
            sys.executable,
            __file__,
            "--worker",
            worker,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--seed",
            str(args.seed),
            "--vocab-chunk",
            str(args.vocab_chunk),
            "--scan" if args.scan else "--no-scan",
            "--remat" if args.remat else "--no-remat",
            *extra,
        ]
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if args.malloc_hugepages:
            # glibc >= 2.35: back large malloc'ed blocks with transparent huge pages.
            env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        print(f"starting {label} ...", file=sys.stderr, flush=True)
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.setup = self._read()
        self.step_s: list[float] = []
        self.losses: list[float] = []
        self.peak_rss_mb = 0.0

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"{self.label} worker exited with status {code}; see its stderr")
        return json.loads(line)

    def _send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def step(self) -> None:
        self._send("step")
        result = self._read()
        self.step_s.append(result["step_s"])
        self.losses.append(result["loss"])

    def finish(self) -> None:
        self._send("done")
        self.peak_rss_mb = self._read()["peak_rss_mb"]
        self.process.wait()


def summarize(worker: Worker, args: argparse.Namespace, peak_gflops: float) -> dict[str, Any]:
    timed = sorted(worker.step_s[args.warmup :])
    tokens = args.batch * args.seq
    median_s = statistics.median(timed)
    tokens_per_s = tokens / median_s
    gflops = tokens_per_s * flops_per_token(worker.setup["num_params"], args.seq) / 1e9
    return dict(
        label=worker.label,
        tokens_per_s=tokens_per_s,
        best_tokens_per_s=tokens / timed[0],
        step_s=worker.step_s,
        gflops=gflops,
        mfu=gflops / peak_gflops,
        peak_rss_mb=worker.peak_rss_mb,
        losses=worker.losses,
        **worker.setup,
    )


def print_report(args: argparse.Namespace, peaks: dict[str, float], results: list[dict]) -> None:
    tokens = args.batch * args.seq
    params = results[0]["num_params"]
    order = "alternating between runs" if args.interleave else "one run after another"
    print(
        f"batch {args.batch} x {args.seq} = {tokens} tokens per step; {args.steps} timed steps "
        f"after {args.warmup} warmup, {order}; scan={args.scan} "
        f"remat={args.remat} vocab_chunk={args.vocab_chunk or 'off'} "
        f"malloc_hugepages={args.malloc_hugepages}; load average before: {args.load_before}"
    )
    print(
        f"parameters: {params / 1e6:.1f}M; FLOPs per token = 6 * P + 12 * L * D * T = "
        f"{flops_per_token(params, args.seq) / 1e6:.0f}M"
    )
    print(
        "matmul peak (2048^3, best of 10): "
        + ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in peaks.items())
    )
    print(
        f"{'run':<18}{'tok/s':>8}{'best':>8}{'GFLOP/s':>9}{'MFU':>7}{'peak RSS':>10}"
        f"{'compile':>9}{'loss 0':>9}{'loss end':>10}{'max |dloss|':>13}"
    )
    reference = results[0]["losses"]
    for row in results:
        diff = max(abs(a - b) for a, b in zip(row["losses"], reference, strict=True))
        print(
            f"{row['label']:<18}{row['tokens_per_s']:>8.1f}{row['best_tokens_per_s']:>8.1f}"
            f"{row['gflops']:>9.1f}{row['mfu']:>7.1%}{row['peak_rss_mb']:>8.0f}MB"
            f"{row['compile_s']:>8.1f}s{row['losses'][0]:>9.4f}{row['losses'][-1]:>10.4f}"
            f"{diff:>13.4f}"
        )
    print("tok/s: median over timed steps; best: fastest step; max |dloss|: vs the first run")
    by_label = {row["label"]: row for row in results}
    if "torch float32" in by_label:
        torch_speed = by_label["torch float32"]["tokens_per_s"]
        for row in results:
            if row["label"] != "torch float32":
                ratio = row["tokens_per_s"] / torch_speed
                print(f"{row['label']} / torch float32 tokens/s: {ratio:.2f}x")
    for row in results:
        print(f"{row['label']}: {row['backend']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (default: 6)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before the timed ones (default: 2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and batch seed (default: 0)")
    parser.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the JAX layer stack with nnx.scan (default: on)",
    )
    parser.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute JAX layer activations in the backward pass (default: off)",
    )
    parser.add_argument(
        "--vocab-chunk",
        type=int,
        default=0,
        help="compute the JAX loss in vocabulary chunks of this size; 0 uses full logits",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run JAX with bfloat16 compute and float32 parameters (default: on)",
    )
    parser.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run PyTorch (default: on)",
    )
    parser.add_argument(
        "--malloc-hugepages",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run every worker with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (default: off)",
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="alternate steps between runs; --no-interleave runs all steps of one run, "
        "then the next (default: on)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--compute-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")

    if args.worker == "jax":
        serve_jax(args)
        return 0
    if args.worker == "torch":
        serve_torch(args)
        return 0

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    peaks = measure_matmul_peaks()
    runs = [("jax float32", "jax", ["--compute-dtype", "float32"], peaks["jax_float32"])]
    if args.bf16:
        runs.append(
            ("jax bf16 compute", "jax", ["--compute-dtype", "bfloat16"], peaks["jax_bfloat16"])
        )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        if args.torch:
            write_initial_weights(weights, args.seed)
            runs.append(
                ("torch float32", "torch", ["--weights", str(weights)], peaks["jax_float32"])
            )
        # Workers start one after another, so their compiles do not overlap.
        workers = [Worker(label, worker, extra, args) for label, worker, extra, _ in runs]
        if args.interleave:
            for _ in range(args.warmup + args.steps):
                for worker in workers:
                    worker.step()
        else:
            for worker in workers:
                for _ in range(args.warmup + args.steps):
                    worker.step()
        for worker in workers:
            worker.finish()
    results = [
        summarize(worker, args, peak) for worker, (*_, peak) in zip(workers, runs, strict=True)
    ]
    print_report(args, peaks, results)
    if args.json:
        args.json.write_text(json.dumps(dict(peaks=peaks, runs=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
