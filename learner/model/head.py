"""Make the last pipeline stage's GPTModel return its final hidden states instead of logits, for
`learner.logprobs.head_logprobs_and_entropy`, which applies the output layer chunk by chunk so that the
`[tokens, vocab / tp]` logits never exist whole (at Qwen3's 152K vocabulary they are the largest activation).

The hook: megatron-core 0.16 has no "return hidden states" flag on the last stage (`_postprocess` always calls
`self.output_layer(hidden_states, weight=...)` when labels are None, then returns `output.transpose(0, 1)
.contiguous()`), so `enable_hidden_output` replaces that one ColumnParallelLinear's `forward` on the instance with
one that returns its input. Everything else stays megatron's: the `[s, b, h] -> [b, s, h]` transpose `_postprocess`
applies to logits applies to the hidden states; Float16Module's fp32 cast of the last stage's output upcasts them
(lossless: `head_logprobs_and_entropy` casts each chunk back to the weight's dtype); parameter names, state dicts,
checkpoints, weight export and DDP buffers are untouched (the module and its weight stay where they are, only
unused by the forward), and the weight's gradient still arrives through autograd, from head_logprobs_and_entropy.

Caveats: the model then returns hidden states to every caller (the training step must use the head path, including
for logprobs-only passes); passing `labels` (megatron's own loss) or using MTP, deferred embedding wgrad or the
inference context's last-token slicing is not supported (checked where it can be); sequence parallelism is handled
(all-gather of the sequence here, see `_return_input`) but only runs with Transformer Engine on a GPU, untested on CPU.
"""

from __future__ import annotations

import types

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.model.build import unwrap

_MARK = "_learner_returns_hidden"


def _return_input(
    self: ColumnParallelLinear,
    input_: torch.Tensor,
    weight: torch.Tensor | None = None,
    runtime_gather_output: bool | None = None,
) -> tuple[torch.Tensor, None]:
    """The output layer's forward, minus the matmul: `(hidden [s, b, h], no bias)` in place of `(logits, bias)`."""
    if runtime_gather_output:
        raise RuntimeError("the output layer returns hidden states (enable_hidden_output): no logits to gather")
    if self.sequence_parallel:
        # The sequence is split over TP here, and every rank needs all of it (each holds a vocab shard): gather it.
        # Backward only splits (no reduce-scatter): head_logprobs_and_entropy already all-reduced the gradient.
        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False, group=self.tp_group)
    return input_, None


def enable_hidden_output(model: torch.nn.Module) -> None:
    """Make this rank's GPTModel (last pipeline stage; bare or inside DDP / Float16Module) return the final norm's
    output `[b, s, h]` where it returned logits `[b, s, vocab / tp]`. Idempotent; call once after build."""
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("only the last pipeline stage has an output layer")
    if gpt.config.mtp_num_layers:
        raise ValueError("multi-token prediction computes its own logits with the output layer: not supported")
    if gpt.config.defer_embedding_wgrad_compute:
        raise ValueError("defer_embedding_wgrad_compute computes the output weight's grad itself: not supported")
    layer = gpt.output_layer
    if getattr(layer, _MARK, False):
        return
    # On the instance only: other GPTModels (the frozen reference policy, say) keep their logits.
    layer.forward = types.MethodType(_return_input, layer)
    setattr(layer, _MARK, True)


def returns_hidden(model: torch.nn.Module) -> bool:
    """Whether `enable_hidden_output` was applied to this rank's GPTModel (False off the last stage)."""
    gpt = unwrap(model)
    return gpt.post_process and bool(getattr(gpt.output_layer, _MARK, False))


def output_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """This TP rank's output-layer shard `[padded_vocab / tp, h]` that the logits would use: the word embeddings
    when they are tied to the output on this stage (pipeline first stage too), else output_layer.weight (which,
    tied over PP, megatron keeps in sync with the first stage's embeddings)."""
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("only the last pipeline stage has an output layer")
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    if weight is None:
        weight = gpt.output_layer.weight
    assert isinstance(weight, torch.nn.Parameter), type(weight)
    return weight
