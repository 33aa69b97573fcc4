"""The torch engine: a padding-free forward for a BERT cross-encoder, the pairs' tokens packed into
one sequence. It serves CUDA (float32 or float16), and a CPU only when ``MGEO_BACKEND=torch``: a CPU's
forwards are ONNX Runtime's (``ort.py``).

Address pairs differ in length (10 to 100+ tokens), and a padded batch spends most of its
work on padding unless it is sorted across many requests. Almost all of a BERT's work is in
its dense layers (projections, feed-forward, LayerNorm), which treat every token alone; here
they run on the real tokens only, packed one after another into a [tokens, hidden] matrix.
Only attention needs the pairs apart. The pairs are grouped by length, and each layer
scatters the packed queries, keys and values into one padded block per group for a masked
attention, then gathers the real rows back: attention, a few per cent of the work at the
lengths of addresses, pads little too. So a forward costs what its real tokens cost, in any
order and at any batch size. Positions restart per pair and attention stays inside each pair:
a pair gets the same probabilities in any batch as alone (tests hold them to 1e-5), and those
of ``BertForSequenceClassification`` to within 1e-4 (one fused query/key/value multiply sums
in another order).

The layers run as one TorchScript function: a single call that releases the GIL for the whole
forward, where eager PyTorch takes the GIL back between every operation and so queues behind
the worker's request threads at each of some 150 steps.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import torch
from transformers import BertForSequenceClassification

from ..checkpoint import Checkpoint, CheckpointError, build_model
from . import Encoded, length_groups

# An attention group is cut where its padded area would pass its real tokens by this factor.
ATTENTION_PADDING = 1.25
# hidden_act -> torch's gelu approximation; the activations BERT checkpoints use.
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _encode_layers(hidden: torch.Tensor, slots: torch.Tensor, padded_size: int,
                   blocks: List[Tuple[int, int, int, torch.Tensor]], layers: List[List[torch.Tensor]],
                   heads: int, eps: float, gelu: str) -> torch.Tensor:
    """The encoder layers over packed tokens [tokens, hidden]; ``blocks`` are the attention groups."""
    width = hidden.shape[1]
    scale = float(width // heads) ** -0.5
    for w in layers:
        qkv = torch.nn.functional.linear(hidden, w[0], w[1])
        padded = qkv.new_zeros(padded_size, qkv.shape[1])
        padded[slots] = qkv
        context = qkv.new_empty(padded_size, width)
        for start, count, longest, bias in blocks:
            block = padded[start:start + count * longest].view(count, longest, 3, heads, width // heads)
            q, k, v = block.permute(2, 0, 3, 1, 4).unbind(0)
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
            out = torch.matmul(scores.softmax(-1), v)
            context[start:start + count * longest] = out.transpose(1, 2).reshape(count * longest, width)
        attended = torch.nn.functional.linear(context[slots], w[2], w[3]) + hidden
        hidden = torch.nn.functional.layer_norm(attended, [width], w[4], w[5], eps)
        intermediate = torch.nn.functional.gelu(torch.nn.functional.linear(hidden, w[6], w[7]), approximate=gelu)
        hidden = torch.nn.functional.layer_norm(torch.nn.functional.linear(intermediate, w[8], w[9]) + hidden,
                                                [width], w[10], w[11], eps)
    return hidden


with warnings.catch_warnings():
    # torch 2.13 calls TorchScript deprecated in favour of torch.compile, which on a CPU needs a
    # C++ compiler at run time and compiles again for new shapes; TorchScript needs neither.
    warnings.simplefilter("ignore", DeprecationWarning)
    _encode = torch.jit.script(_encode_layers)


class PackedBert:
    """Scores encoded pairs with the weights of an eval-mode ``BertForSequenceClassification``."""

    def __init__(self, model: BertForSequenceClassification):
        config = model.config
        if config.hidden_act not in GELU_APPROXIMATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported")
        self.model = model
        self.heads = config.num_attention_heads
        self.eps = config.layer_norm_eps
        self.gelu = GELU_APPROXIMATIONS[config.hidden_act]
        self.embeddings = model.bert.embeddings
        self.layers = []
        for layer in model.bert.encoder.layer:
            attention, output = layer.attention, layer.output
            self.layers.append([
                # Queries, keys and values in one matrix multiply instead of three.
                torch.cat([attention.self.query.weight, attention.self.key.weight, attention.self.value.weight]),
                torch.cat([attention.self.query.bias, attention.self.key.bias, attention.self.value.bias]),
                attention.output.dense.weight, attention.output.dense.bias,
                attention.output.LayerNorm.weight, attention.output.LayerNorm.bias,
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                output.dense.weight, output.dense.bias, output.LayerNorm.weight, output.LayerNorm.bias])

    @torch.inference_mode()
    def logits(self, encoded: Sequence[Encoded]) -> torch.Tensor:
        """Logits [pairs, labels] for already-encoded pairs, in order."""
        weights = self.embeddings.word_embeddings.weight
        device, dtype = weights.device, weights.dtype
        lengths = [len(ids) for ids, _ in encoded]
        starts = [0] * len(lengths)
        for i in range(1, len(lengths)):
            starts[i] = starts[i - 1] + lengths[i - 1]
        # Each attention group is a padded [pairs, longest] block in one flat buffer, with a
        # bias of -inf on its padding; slots[t] is where packed token t sits in that buffer.
        blocks, slots, padded_size = [], [0] * sum(lengths), 0
        for group in length_groups(lengths, ATTENTION_PADDING):
            longest = lengths[group[-1]]
            for row, i in enumerate(group):
                base = padded_size + row * longest
                slots[starts[i]:starts[i] + lengths[i]] = range(base, base + lengths[i])
            padding = torch.arange(longest)[None, :] >= torch.tensor([lengths[i] for i in group])[:, None]
            bias = torch.zeros(padding.shape, dtype=dtype).masked_fill_(padding, float("-inf"))
            blocks.append((padded_size, len(group), longest, bias[:, None, None, :].to(device)))
            padded_size += len(group) * longest

        e = self.embeddings
        input_ids = torch.tensor([t for ids, _ in encoded for t in ids], device=device)
        token_types = torch.tensor([t for _, types in encoded for t in types], device=device)
        positions = torch.tensor([p for n in lengths for p in range(n)], device=device)
        hidden = e.LayerNorm(e.word_embeddings(input_ids) + e.token_type_embeddings(token_types)
                             + e.position_embeddings(positions))
        hidden = _encode(hidden, torch.tensor(slots, device=device), padded_size, blocks, self.layers,
                         self.heads, self.eps, self.gelu)
        pooler = self.model.bert.pooler
        pooled = pooler.activation(pooler.dense(hidden[torch.tensor(starts, device=device)]))
        return self.model.classifier(pooled)


class TorchEngine:
    backend = "torch"
    note = ""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, fp16: bool):
        model = build_model(checkpoint)
        self.precision = "float16" if fp16 else "float32"
        self.model = (model.half() if fp16 else model).to(device)
        try:
            self._packed = PackedBert(self.model)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint cannot be served: {exc}") from exc

    def probabilities(self, encoded: Sequence[Encoded]) -> torch.Tensor:
        return torch.softmax(self._packed.logits(encoded).float(), dim=-1).cpu()
