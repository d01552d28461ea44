"""The eval step: held-out scores of theta0, the branches, the merged model and baselines.

Modules:

* ``loglikelihood``: summed continuation log-probabilities in fixed [B, T] shapes;
* ``multiple_choice``: zero-shot multiple choice under the BIG-bench convention
  (acc, acc_norm, chance level);
* ``held_out``: mean response-token loss on held-out instruction examples;
* ``generation``: greedy-generation exact match for short-answer tasks;
* ``diagnostics``: held-out loss along the line between two models;
* ``runner``: :class:`EvalSpec`, :func:`evaluate_model`, :func:`evaluate_models`
  and the results.json / results.md writer.
"""

from merit_jax.eval.diagnostics import (
    DEFAULT_ALPHAS,
    LinearPathResult,
    interpolate_states,
    linear_path_losses,
    loss_barrier,
)
from merit_jax.eval.generation import ExactMatchResult, evaluate_exact_match, is_exact_match
from merit_jax.eval.held_out import (
    HeldOutData,
    HeldOutResult,
    held_out_losses,
    pooled_loss,
    prepare_held_out,
    task_loss_sums,
)
from merit_jax.eval.loglikelihood import LoglikelihoodRequest, LoglikelihoodResult, score_requests
from merit_jax.eval.multiple_choice import (
    MultipleChoiceResult,
    build_requests,
    choose,
    encode_pair,
    evaluate_multiple_choice,
    move_trailing_whitespace,
    select_examples,
    task_result,
)
from merit_jax.eval.runner import (
    EvalSpec,
    evaluate_model,
    evaluate_models,
    format_markdown,
    write_results,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "EvalSpec",
    "ExactMatchResult",
    "HeldOutData",
    "HeldOutResult",
    "LinearPathResult",
    "LoglikelihoodRequest",
    "LoglikelihoodResult",
    "MultipleChoiceResult",
    "build_requests",
    "choose",
    "encode_pair",
    "evaluate_exact_match",
    "evaluate_model",
    "evaluate_models",
    "evaluate_multiple_choice",
    "format_markdown",
    "held_out_losses",
    "interpolate_states",
    "is_exact_match",
    "linear_path_losses",
    "loss_barrier",
    "move_trailing_whitespace",
    "pooled_loss",
    "prepare_held_out",
    "score_requests",
    "select_examples",
    "task_loss_sums",
    "task_result",
    "write_results",
]
