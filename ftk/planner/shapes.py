"""A model's shape: parameter counts by kind, widths, depth and vocabulary, from ftk's model options or a
config.json (never weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from ftk.errors import UsageError, first_line
from ftk.objectives.table import facts as objective_facts


GB = 10 ** 9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
DEFAULT_NUM_LABELS = 2                     # classification before the data is read: the head is tiny anyway


@dataclass(frozen=True)
class Linear:
    """One projection inside a transformer block (nn.Linear, or GPT-2's Conv1D)."""

    name: str          # module path inside the block, e.g. "attn.c_attn", "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool
    reads: str         # the activation it reads; Linears reading the same tensor share it ("attn_in", ...)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Shape:
    """What the planner needs to know about a model: parameter counts by kind and the widths."""

    model_type: str
    family: str                # activation pattern: gpt2 | llama | bert | generic
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tied: bool                 # output embedding shares the input embedding's weight
    encoder: bool
    embedding_params: int      # token (+ position, + token type) embeddings and their norm
    layer_params: int          # one block: attention + MLP + norms, weights and biases
    top_params: int            # after the blocks, before any head (the final norm)
    linears: Tuple[Linear, ...]  # the projections of one block
    dtype: Optional[str] = None  # the dtype the checkpoint was saved in; None: float32 (built from scratch)
    source: str = ""

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_weights_per_layer(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.linears)

    @property
    def linear_params_per_layer(self) -> int:
        return sum(lin.params for lin in self.linears)

    def head(self, objective: str, num_labels: int = DEFAULT_NUM_LABELS) -> "Head":
        return _head(self, objective, num_labels)

    def parameters(self, objective: str = "clm", num_labels: int = DEFAULT_NUM_LABELS) -> int:
        return self.body_params + self.head(objective, num_labels).params

    @property
    def body_params(self) -> int:
        return self.embedding_params + self.num_layers * self.layer_params + self.top_params

    def describe(self) -> str:
        kv = f", {self.num_kv_heads} kv heads" if self.num_kv_heads != self.num_heads else ""
        return (f"{self.model_type}: {self.num_layers} layers x {self.hidden_size} ({self.num_heads} heads{kv}, "
                f"MLP {self.intermediate_size}), vocabulary {self.vocab_size:,}")


@dataclass(frozen=True)
class Head:
    params: int          # parameters on top of the body (LM head, MLM transform, classifier, pooler)
    new_params: int      # of those, freshly initialised (a classification head)
    matmul_weights: int  # weights of the head's matmuls (cast to 16 bits under autocast)
    logits: int          # logits per position (the vocabulary for language models; 0 for a classifier)


def _head(s: Shape, objective: str, num_labels: int) -> Head:
    h, v = s.hidden_size, s.vocab_size
    untied = 0 if s.tied else v * h
    kind = objective_facts(objective).head
    if kind == "causal_lm":
        return Head(untied, 0, v * h, v)
    if kind == "masked_lm":  # BERT/RoBERTa: dense + LayerNorm transform, decoder (tied) with its own bias
        return Head(h * h + h + 2 * h + v + untied, 0, h * h + v * h, v)
    classifier = h * num_labels
    if s.family == "bert" and s.model_type == "roberta":  # classifier.dense + classifier.out_proj, all new
        new = h * h + h + classifier + num_labels
        return Head(new, new, h * h + classifier, 0)
    if s.family == "bert":  # the pretrained pooler + a new classifier
        return Head(h * h + h + classifier + num_labels, classifier + num_labels, h * h + classifier, 0)
    return Head(classifier, classifier, classifier, 0)  # decoders: a new `score` Linear without bias


_LLAMA_LIKE = ("llama", "mistral", "qwen2")
_BERT_LIKE = ("bert", "roberta")


def shape_from_config(config: Any, source: str = "") -> Shape:
    """The shape of a transformers config (PretrainedConfig): exact parameter counts for GPT-2, Llama,
    Mistral, Qwen2, BERT and RoBERTa; any other architecture is built on the meta device (no memory) and
    its parameters counted there."""
    kind = getattr(config, "model_type", "")
    dtype = _dtype_name(getattr(config, "dtype", None) if hasattr(config, "dtype") else
                        getattr(config, "torch_dtype", None))
    if kind == "gpt2":
        return _gpt2_shape(config, dtype, source)
    if kind in _LLAMA_LIKE:
        return _llama_shape(config, dtype, source)
    if kind in _BERT_LIKE:
        return _bert_shape(config, dtype, source)
    return _meta_shape(config, dtype, source)


def _dtype_name(dtype: Any) -> Optional[str]:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    return name if name in DTYPE_BYTES else None


def _gpt2_shape(c: Any, dtype: Optional[str], source: str) -> Shape:
    h, layers, heads, v = c.n_embd, c.n_layer, c.n_head, c.vocab_size
    i = c.n_inner or 4 * h
    linears = (Linear("attn.c_attn", h, 3 * h, True, "attn_in"), Linear("attn.c_proj", h, h, True, "attn_out"),
               Linear("mlp.c_fc", h, i, True, "mlp_in"), Linear("mlp.c_proj", i, h, True, "mlp_mid"))
    layer = sum(lin.params for lin in linears) + 2 * 2 * h  # + ln_1, ln_2 (weight and bias)
    return Shape("gpt2", "gpt2", h, layers, heads, heads, h // heads, i, v, c.n_positions,
                 bool(getattr(c, "tie_word_embeddings", True)), False, v * h + c.n_positions * h, layer, 2 * h,
                 linears, dtype, source)


def _llama_shape(c: Any, dtype: Optional[str], source: str) -> Shape:
    h, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    d = getattr(c, "head_dim", None) or h // heads
    i, v = c.intermediate_size, c.vocab_size
    qkv_bias = bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2"
    o_bias = bool(getattr(c, "attention_bias", False)) and c.model_type != "qwen2"
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    linears = (Linear("self_attn.q_proj", h, heads * d, qkv_bias, "attn_in"),
               Linear("self_attn.k_proj", h, kv * d, qkv_bias, "attn_in"),
               Linear("self_attn.v_proj", h, kv * d, qkv_bias, "attn_in"),
               Linear("self_attn.o_proj", heads * d, h, o_bias, "attn_out"),
               Linear("mlp.gate_proj", h, i, mlp_bias, "mlp_in"),
               Linear("mlp.up_proj", h, i, mlp_bias, "mlp_in"),
               Linear("mlp.down_proj", i, h, mlp_bias, "mlp_mid"))
    layer = sum(lin.params for lin in linears) + 2 * h  # + two RMSNorm weights
    return Shape(c.model_type, "llama", h, layers, heads, kv, d, i, v, c.max_position_embeddings,
                 bool(getattr(c, "tie_word_embeddings", False)), False, v * h, layer, h, linears, dtype, source)


def _bert_shape(c: Any, dtype: Optional[str], source: str) -> Shape:
    h, layers, heads, i, v = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size
    linears = (Linear("attention.self.query", h, h, True, "attn_in"),
               Linear("attention.self.key", h, h, True, "attn_in"),
               Linear("attention.self.value", h, h, True, "attn_in"),
               Linear("attention.output.dense", h, h, True, "attn_out"),
               Linear("intermediate.dense", h, i, True, "mlp_in"),
               Linear("output.dense", i, h, True, "mlp_mid"))
    layer = sum(lin.params for lin in linears) + 2 * 2 * h  # + two LayerNorms
    embeddings = v * h + c.max_position_embeddings * h + c.type_vocab_size * h + 2 * h
    return Shape(c.model_type, "bert", h, layers, heads, heads, h // heads, i, v, c.max_position_embeddings,
                 bool(getattr(c, "tie_word_embeddings", True)), True, embeddings, layer, 0, linears, dtype, source)


def _meta_shape(config: Any, dtype: Optional[str], source: str) -> Shape:
    """Any other architecture: instantiate it on the meta device (shapes only, no memory) and count."""
    import torch
    import transformers

    model, failure = None, None
    for name in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel"):
        try:
            with torch.device("meta"):
                model = getattr(transformers, name).from_config(config)
            break
        except Exception as exc:  # noqa: BLE001 - try the next head; report the last failure
            failure = exc
    if model is None:
        text = str(failure).strip()
        raise UsageError(f"cannot plan memory for model type '{getattr(config, 'model_type', '?')}': "
                         f"{text.splitlines()[0] if text else type(failure).__name__}") from None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(output, "weight", None)
    tied = head_weight is None or head_weight is model.get_input_embeddings().weight
    layers = getattr(config, "num_hidden_layers", None)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    if not blocks:
        raise UsageError(f"cannot plan memory for {type(model).__name__}: no list of {layers} blocks found")
    prefix, block_list = blocks[0]
    linears = []
    for name, module in block_list[0].named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2 or isinstance(module, torch.nn.Embedding):
            continue
        transposed = type(module).__name__ == "Conv1D"  # GPT-2 style: weight is (in, out)
        n_in, n_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        linears.append(Linear(name, int(n_in), int(n_out), getattr(module, "bias", None) is not None, name))
    # an untied output head is counted by Shape.head(), like the families above
    seen, before, after, in_blocks = (set() if tied else {id(head_weight)}), 0, 0, False
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith(prefix + "."):
            in_blocks = True
        elif in_blocks:
            after += p.numel()
        else:
            before += p.numel()
    layer = sum(p.numel() for p in block_list[0].parameters())
    h = getattr(config, "hidden_size", None) or linears[0].in_features
    heads = getattr(config, "num_attention_heads", 1)
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    i = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * h
    positions = getattr(config, "max_position_embeddings", 0) or 0
    vocab = getattr(config, "vocab_size", 0)
    encoder = not getattr(config, "is_decoder", False) and "MaskedLM" in " ".join(getattr(config, "architectures", None) or [])
    return Shape(config.model_type, "generic", h, layers, heads, kv, d, i, vocab, positions, tied, encoder,
                 before, layer, after, tuple(linears), dtype, source)


class _VocabOnly:
    """Stands in for a tokenizer when ftk.models.build_config sizes a model from the configured vocabulary."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def shape_from_model_options(m: Any, source: str = "") -> Shape:
    """The shape ftk builds from scratch for a `model` config group (model=gpt-small, ...)."""
    from ftk.models import build_config

    return shape_from_config(build_config(m, _VocabOnly(m.vocab_size)), source)


def shape_from_checkpoint(name_or_path: str, trust_remote_code: bool = False) -> Shape:
    """The shape of a model directory or hub name: reads config.json only, never the weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UsageError(f"cannot read the config of model '{name_or_path}': {first}") from None
    return shape_from_config(config, name_or_path)


def count(n: float) -> str:
    """A parameter count the way people say it: 6.74B, 124.4M, 1,026."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{int(n):,}"


def gb(n: float) -> str:
    value = n / GB
    return f"{value:,.0f} GB" if value >= 100 else f"{value:,.1f} GB" if value >= 1 else f"{value:,.2f} GB"
