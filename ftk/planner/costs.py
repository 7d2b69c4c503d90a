"""The cost arithmetic of the memory planner: bytes per device of a run, by component.

Pure arithmetic on a model's *shape* (parameter counts by kind, widths, depth, vocabulary), no weights:
the shape comes from ftk's own model options (`model=gpt-small`, through ftk.models.build_config) or from
a checkpoint's config.json (`AutoConfig.from_pretrained` reads only that file; hub names work online).
Nothing here imports torch at module level; the functions that detect the machine import it lazily.

Per device, in bytes (GB below means 10^9 bytes, the unit of GPU data sheets and of "70B x 2 B = 140 GB"):

* weights: every parameter in the dtype it is held in. `weights=ftk` (default) is what ftk does: every
  model, built or loaded (whatever dtype its checkpoint was saved in), is held in float32 and bf16/fp16
  precision is autocast on top, so AdamW always has float32 weights and moments; the frozen base of LoRA
  and prompt tuning under bf16/fp16 is held in that 16-bit dtype (its adapters and new head in float32). QLoRA: block Linear layers in NF4 with double quantization,
  0.5 + 1/64 + 4/(64*256) = 0.516 bytes per parameter; everything else (embeddings, norms, output head)
  float32, as peft.prepare_model_for_kbit_training upcasts it; LoRA adapters float32.
  `weights=16bit` is the textbook convention of the published tables: frozen weights in 16 bits,
  trainable ones in 16 bits plus a float32 master copy (2 + 4 bytes).
* gradients: trainable parameters x gradient dtype (the parameter's dtype; 2 bytes under weights=16bit).
  DDP adds its gradient buckets (another copy); FSDP shards gradients, weights and optimizer state.
* optimizer state: AdamW keeps two moments per trainable parameter in the parameter's dtype (8 bytes for
  float32); bitsandbytes 8-bit AdamW 2 bytes. torch's foreach AdamW (`hardware.optimizer=adamw`) also needs
  one moment-sized temporary during the step; the fused one (ftk's default) does not.
* activations: what autograd keeps for the backward pass. Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models") count sbh(34 + 5as/h) bytes per layer for a 16-bit GPT block
  with dropout: 34 bytes per token and hidden unit (dropout masks included) plus the a*s*s attention
  matrix (5as/h). SDPA (ftk's default attention) keeps no s x s matrix, only one float per head
  and token (its logsumexp), and ftk trains without dropout, so no masks. What remains depends on how
  transformers writes each block; counted with torch.autograd.graph.saved_tensors_hooks on transformers 5
  (tests/test_planner.py re-counts them), per token and layer:
      GPT-2 : 8 h + 2 kv + 5 i   (its GELU-tanh is written in Python: 5 tensors of MLP width i)
      Llama : 8 h + 2 kv + 4 i   (SwiGLU: gate, up, SiLU(gate), product; RMSNorm keeps 2 tensors)
      BERT  : 6 h + 2 kv + 2 i   (GELU kernel: its input and output)
  where h is the hidden size, kv the key/value width (kv heads x head size; h without grouped-query
  attention) and i the MLP width, in the activation dtype. Under bf16/fp16 autocast the norm inputs stay
  float32 on the float32 residual stream (GPT-2 2 h, Llama 4 h, BERT 2 h) and the rest is 16-bit (GPT-2
  6 h, Llama 7 h, BERT 6 h, plus the kv and i terms); autocast also keeps a 16-bit copy of every matmul
  weight until its backward (2 bytes per weight). Frozen weights need no inputs kept for their
  gradients: a block whose weights are all frozen (LoRA, QLoRA, prompt tuning) keeps 2 h + 1 i less
  (Llama 4 h + 1 i; under autocast, in 16 bits, GPT-2 2 h, BERT 4 h, Llama 5 h and 2 h float32, each
  + 1 i), and LoRA adds back each adapted Linear's input (and, with dropout, its dropped copy and mask)
  and its rank-r intermediate: within 2% of the counted tensors for all three families, full or LoRA,
  fp32 or bf16. QLoRA's 4-bit layers return float32, so its blocks keep float32 tensors whatever the
  precision. Layers below the lowest trainable parameter keep nothing (freeze_layers,
  feature_extraction). Gradient checkpointing keeps each layer's input (1 h) and recomputes one block at
  a time in the backward pass.
* logits and loss: ftk computes the output head and the loss together, a chunk of tokens at a time
  (ftk.objectives.linear_cross_entropy): the selected hidden states and their gradient, and one chunk of
  logits (64 MiB of float32); the full (tokens x vocab) logits never exist. Where that path does not apply
  (Setup.fused_head False) the loss holds the logits and float32 copies of them: 2-3 x tokens x vocab x 4
  bytes (a masked LM's loss keeps only the masked 15% in float32).
* overhead: CUDA context and kernels (~0.75 GB), or on a CPU the process itself (Python, torch,
  transformers: ~0.5 GB of resident memory before any tensor).

The parts do not peak together: the activations are all alive when the backward pass starts (first
with the logits' buffers, then with one block's backward working set: its recomputed activations under
checkpointing and the gradients of its intermediates), the gradients all exist only when it ends, so
    total = weights + optimizer state + overhead
            + max(activations + max(logits, working set), gradients (+ step temporaries)),
which the measured peaks on this CPU match within 8% (0.92-1.04; 9 cases: GPT-2, Llama and BERT shapes; fp32 and
bf16; checkpointing, LoRA, QLoRA; scripts/measure_memory.py, tests/test_planner.py). Published tables
usually add gradients and activations: `Estimate.summed`, an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ftk.objectives.table import facts as objective_facts
from ftk.planner.setup import Setup, adapter_targets
from ftk.planner.shapes import DTYPE_BYTES, GB, Linear, Shape, count, gb


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, fp32 absmax per 256 blocks
CUDA_OVERHEAD = int(0.75 * GB)             # CUDA context, cuBLAS/cuDNN workspaces (approximate)
CPU_OVERHEAD = int(0.5 * GB)               # resident size of Python + torch + transformers before any tensor


@dataclass(frozen=True)
class Saved:
    """Tensors a block keeps for backward, per token, in multiples of the hidden (h) and MLP (i) widths;
    plus 2 of the key/value width in every case (see the module docstring for how they were counted)."""

    h: float                   # without autocast: in the activation dtype
    i: float
    h_fp32_mixed: float        # under autocast: kept in float32 (norm inputs on the residual stream)
    h_16_mixed: float          # under autocast: kept in 16 bits (the i and kv terms are 16-bit too)
    outside: float             # outside the blocks: embedding output, final norm, LM-head input, MLM transform
    frozen_h: float            # kept only for the block's weight gradients: gone when they are frozen (+ 1 i)
    frozen_h_fp32_mixed: float  # the same under autocast, float32 part ...
    frozen_h_16_mixed: float    # ... and 16-bit part (+ 1 i)


SAVED = {"gpt2": Saved(8, 5, 2, 6, 2, 2, 0, 2),
         "llama": Saved(8, 4, 4, 7, 3, 4, 2, 5),
         "bert": Saved(6, 2, 2, 6, 5, 2, 0, 4)}
SAVED["generic"] = SAVED["llama"]


@dataclass
class Suggestion:
    overrides: str        # what to pass, e.g. "regime=lora" or "hardware.micro_batch_size=2"
    total: int            # the peak per device with it, bytes
    fits: bool
    rank: int             # cost order: lower is cheaper (see RANK)


@dataclass
class Estimate:
    shape: Shape
    setup: Setup
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    step_temporaries: int = 0
    transient: int = 0  # one block's backward working set (its recomputed activations when checkpointing)
    budget: Optional[int] = None
    budget_source: str = ""
    notes: List[str] = field(default_factory=list)
    details: Dict[str, str] = field(default_factory=dict)
    suggestions: List[Suggestion] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Peak per device: activations are all kept when the backward pass starts (with the logits' buffers,
        then one block's working set), gradients all exist only when it ends."""
        return (self.weights + self.optimizer + self.overhead
                + max(self.activations + max(self.logits, self.transient), self.gradients + self.step_temporaries))

    @property
    def summed(self) -> int:
        """Every part added up, as published tables do: an upper bound of `total`."""
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.transient + self.overhead + self.step_temporaries)

    @property
    def tensors(self) -> int:
        """The peak without the fixed overhead: what a measured increase of a process's memory compares to."""
        return self.total - self.overhead

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.total <= self.budget

    @property
    def verdict(self) -> str:
        if self.budget is None:
            return (f"needs {gb(self.total)} per device; budget unknown: pass hardware.memory_budget_gb=<GB per "
                    "device>")
        share = self.total / max(self.budget, 1)
        if self.total <= self.budget:
            tight = ", tight" if share > 0.9 else ""
            return f"fits: {gb(self.total)} of {gb(self.budget)} per device ({share:.0%}{tight})"
        return f"does not fit: needs {gb(self.total)} per device, budget {gb(self.budget)} ({share:.1f}x)"

    def best_suggestion(self) -> Optional[Suggestion]:
        fitting = [s for s in self.suggestions if s.fits]
        return fitting[0] if fitting else None

    def rows(self) -> List[Tuple[str, int, str]]:
        rows = [("weights", self.weights, self.details.get("weights", "")),
                ("gradients", self.gradients, self.details.get("gradients", "")),
                ("optimizer state", self.optimizer, self.details.get("optimizer", "")),
                ("activations", self.activations, self.details.get("activations", "")),
                ("logits and loss", self.logits, self.details.get("logits", "")),
                ("backward working set", self.transient, self.details.get("working", "")),
                ("overhead", self.overhead, self.details.get("overhead", ""))]
        if self.step_temporaries:
            rows.insert(3, ("optimizer step temporaries", self.step_temporaries, "foreach AdamW: one moment-sized "
                            "buffer during the step (hardware.optimizer=adamw_fused has none)"))
        rows.append(("total (peak)", self.total, "weights + optimizer + overhead + max(activations + max(logits, "
                                                 "working set), gradients)"))
        return rows


def _components(s: Shape, u: Setup) -> Estimate:
    row, r = u.facts, u.regime_settings
    head = s.head(u.objective, u.num_labels)
    h, i, kv, layers = s.hidden_size, s.intermediate_size, s.kv_width, s.num_layers
    textbook = u.weights == "16bit"
    mixed = u.precision in ("bf16", "fp16")
    quantized = row.quantized
    # ftk holds weights in float32 (finetune_setup.load_task_model, models.load_model), except a frozen base the
    # regime holds in 16 bits under bf16/fp16 (LoRA, prompt tuning): what trains stays float32
    adapter_base = row.frozen_in_16bit and mixed and not textbook
    held = ("bfloat16" if u.precision == "bf16" else "float16") if adapter_base else "float32"
    loaded = DTYPE_BYTES.get(held, 4)  # bytes per weight as ftk holds it
    notes: List[str] = []
    details: Dict[str, str] = {}
    total_params = s.body_params + head.params

    # -- what trains
    targets: List[Linear] = []
    extra = 0  # trainable parameters that are not model weights: adapters, a soft prompt
    frozen_blocks = min(getattr(r, "freeze_layers", 0), layers) if row.body == "frozen_below" else 0
    if row.adapter is not None:
        if row.adapter.targets != "prompt":
            targets = adapter_targets(s, r.target_modules, row.adapter.targets)
            extra = layers * sum(row.adapter.params(r, t) for t in targets)
        base_trainable = head.new_params
    elif row.body == "outside":
        base_trainable = head.new_params
    elif row.body == "frozen_below":  # embeddings (and a tied output head with them) and k blocks frozen
        base_trainable = total_params - s.embedding_params - frozen_blocks * s.layer_params
    else:  # the body trains (in the last phase of a phased regime)
        base_trainable = total_params
        if row.phased:
            notes.append(f"regime={row.name}: planned for its last phase, when every weight trains")
    virtual = r.num_virtual_tokens if row.virtual_tokens else 0
    extra += virtual * h
    trainable = base_trainable + extra
    kept = sum(row.adapter.kept(r, t) for t in targets) if targets else 0  # adapters' own saved values
    dropout = row.adapter.dropout(r) if row.adapter is not None else 0.0

    # -- weights
    if quantized:
        four_bit = layers * s.linear_weights_per_layer
        rest = total_params - four_bit
        rest_b = 2 if textbook else 4  # peft.prepare_model_for_kbit_training upcasts what is not quantized
        weights = four_bit * NF4_BYTES + rest * rest_b + extra * (6 if textbook else 4)
        details["weights"] = (f"{count(four_bit)} in NF4 ({NF4_BYTES:.3f} B each) + {count(rest)} at "
                              f"{rest_b} B + {count(extra)} adapter at {6 if textbook else 4} B")
    elif textbook:
        weights = (total_params - base_trainable) * 2 + (base_trainable + extra) * 6
        details["weights"] = (f"{count(total_params)} at 2 B (16-bit); the {count(trainable)} trainable "
                              "also as a float32 master copy (+4 B)")
    else:
        weights = total_params * loaded + extra * 4
        details["weights"] = f"{count(total_params)} x {loaded} B ({held}" + (
            ", as saved: transformers 5 loads dtype='auto')" if held != "float32" else ")") + (
            f" + {count(extra)} trainable at 4 B" if extra else "")
        if loaded == 2 and base_trainable > head.new_params:
            notes.append(f"the checkpoint is {held}: ftk trains it in {held}, gradients and AdamW state too "
                         "(no float32 master copy); estimate.weights=16bit shows the usual mixed-precision figure")

    # -- gradients and optimizer state (in the trainable parameter's dtype)
    base_b = 2 if textbook else (4 if quantized else loaded)
    gradients = base_trainable * base_b + extra * (2 if textbook else 4)
    details["gradients"] = f"{count(trainable)} trainable x {base_b if base_trainable else 4} B"
    if u.optimizer == "adamw_8bit":
        optimizer = trainable * 2
        details["optimizer"] = "8-bit AdamW (bitsandbytes): 2 x 1 B per trainable parameter"
    else:
        state_b = 4 if textbook else base_b
        optimizer = base_trainable * 2 * state_b + extra * 8
        details["optimizer"] = f"AdamW: 2 moments x {state_b} B per trainable parameter"
    step_temporaries = optimizer // 2 if u.optimizer == "adamw" else 0

    # -- activations, per device: micro-batch x sequence tokens
    seq = u.seq_len + virtual
    # preference objectives: each pair is two sequences in one forward (chosen, rejected)
    n = u.micro_batch_size * seq * (2 if u.pairs else 1)
    c = SAVED.get(s.family, SAVED["generic"])
    # the residual stream's dtype: the embeddings' (QLoRA: upcast to float32 by prepare_model_for_kbit_training)
    resid = 2 if textbook or (loaded == 2 and not quantized) else 4
    low = 2 if (mixed or textbook) else resid       # everything autocast computes in 16 bits
    autocast_dtype = "bfloat16" if u.precision == "bf16" else "float16"
    casts = mixed and not textbook and held != autocast_dtype  # autocast keeps 16-bit copies of the weights
    # blocks in the backward graph, and whether their weights are frozen (adapters inside pass gradients through)
    graph_layers = {"outside": 0, "frozen_below": layers - frozen_blocks}.get(row.body, layers)
    frozen = row.body == "frozen"

    act = low  # bytes of the tensors a block keeps
    qlora_act = quantized and not textbook
    # a 16-bit frozen base (LoRA / prompt tuning under bf16/fp16) computes in 16 bits throughout: autocast
    # has nothing to cast, so it keeps what a plain 16-bit model keeps
    autocast = mixed and not textbook and not qlora_act and not adapter_base
    if qlora_act:
        # bitsandbytes' 4-bit layers return their input's dtype (the float32 residual stream), so nearly all
        # a QLoRA block keeps is float32 whatever the precision (measured within ~20% of this)
        act = resid
        per_token = (c.h * h + 2 * kv + c.i * i) * act
    elif autocast:
        per_token = c.h_fp32_mixed * h * resid + (c.h_16_mixed * h + 2 * kv + c.i * i) * low
    else:
        per_token = (c.h * h + 2 * kv + c.i * i) * low
    from ftk.hardware import probs_bytes

    probs = probs_bytes(u.micro_batch_size, s.num_heads, seq) if u.matmul_attention else 0
    # the matmul attention's probabilities (ftk.cpu_attention), or SDPA's logsumexp
    per_token += probs // n if probs else s.num_heads * 4
    lora_copies = 0
    if frozen:
        if autocast:
            per_token -= c.frozen_h_fp32_mixed * h * resid + (c.frozen_h_16_mixed * h + i) * low
            # each adapter casts its input to 16 bits itself; its dropout runs on the float32 input
            per_token += (sum(t.in_features for t in targets) + kept) * low
            if dropout > 0:
                per_token += sum(t.in_features for t in targets) * resid
            lora_copies = sum(row.adapter.params(r, t) for t in targets) * 2
        else:
            per_token -= (c.frozen_h * h + i) * act
            # adapters reading the same tensor share it; with dropout each keeps its own copy and mask
            per_token += sum({t.reads: t.in_features for t in targets}.values()) * act + kept * act
            if dropout > 0:
                per_token += sum(t.in_features for t in targets) * (act + 2)
    per_layer = per_token * n
    copies = (s.linear_weights_per_layer * 2 if casts and not quantized else 0) + lora_copies
    recompute = 0
    if u.gradient_checkpointing and graph_layers:
        saved = graph_layers * n * h * resid
        recompute = per_layer + copies  # one block at a time, in the backward pass
        how = (f"checkpointed: {graph_layers} layer inputs ({n:,} tokens x {h} x {resid} B); one block at a time "
               f"recomputed in the backward pass")
    else:
        saved = graph_layers * (per_layer + copies)
        how = f"{graph_layers} layers x {n:,} tokens x {per_token / 1e3:,.1f} kB"
        if copies and graph_layers:
            how += f" + 16-bit weight copies ({gb(graph_layers * copies)})"
    if not graph_layers:
        how = "no layer keeps anything (nothing trains below the head)"
    outside = c.outside * n * h * resid if graph_layers else n * h * resid
    # the output head stays in full precision under QLoRA (float32 after prepare_model_for_kbit_training)
    head_copy = head.matmul_weights * 2 if (casts or (mixed and qlora_act)) else 0
    # the pretrained output head trains (frozen with the embeddings when tied to them and they are frozen)
    head_trains = row.head_trains and not (row.body == "frozen_below" and s.tied)
    head_grad = s.vocab_size * h * base_b if (objective_facts(u.objective).language_model and head_trains) else 0
    activations = int(saved + outside + head_copy + head_grad)
    details["activations"] = how
    # One block's backward working set: its recomputed activations (checkpointing) and the gradients of its
    # intermediates. It comes after the logits' backward has freed its buffers, so the peak takes the larger.
    working = (n * (2 * i + 2 * h) * act + 2 * probs) if graph_layers else 0  # + the probabilities' gradients
    transient = int(recompute + working)
    details["working"] = ("one block recomputed + " if recompute else "") + "gradients of its intermediates"

    # -- logits and loss
    # ftk's language-model objectives compute the head and the loss together (ftk.objectives.linear_cross_entropy):
    # the tokens with a target (their hidden states as selected, in the matmul dtype, and their gradient) and one
    # chunk of rows of logits at a time (the logits, their float32 log-softmax and its cast gradient). The head's
    # weight gradient, computed in that forward pass, is counted with the activations (head_grad).
    # Without it (u.fused_head False) the loss holds the logits: on a CPU ftk.objectives.cross_entropy's the logits
    # and their gradient plus a float32 chunk of rows; on CUDA F.cross_entropy's float32 copy, log-softmax and
    # gradient. The 2 x float32 is measured (scripts/measure_memory.py): with bf16 logits the peak still rises by as
    # much, as the 16-bit copies of the head's gradient and its float32 accumulation overlap the loss's buffers.
    from ftk.objectives import LOSS_CHUNK_ROWS, head_chunk_rows

    cpu_loss = u.device == "cpu"
    chunk = 2 * LOSS_CHUNK_ROWS * head.logits * 4
    causal = objective_facts(u.objective).head == "causal_lm"
    picked = n if causal else int(u.mlm_probability * n)  # a masked LM's loss sees only the masked tokens
    # preference objectives read per-token log-probabilities from the logits; FSDP shards the head's weight
    fused = u.fused_head and not u.pairs and not (u.strategy == "fsdp" and u.devices > 1)
    if head.logits and fused:
        rows = min(head_chunk_rows(head.logits), picked)
        # + a chunk's share of the head's weight gradient (vocab x hidden, 16-bit product and its float32 copy)
        logits = picked * h * (resid + 2 * low) + rows * head.logits * (4 + 2 * low) + head.logits * h * (low + 4)
        details["logits"] = (f"fused head and loss: {picked:,} tokens x {h} hidden x {resid + 2 * low} B + one chunk "
                             f"of {rows} x {head.logits:,} logits x {4 + 2 * low} B + its head-gradient share")
    elif head.logits and causal:
        if cpu_loss:
            logits = 2 * n * head.logits * 4 + chunk
            details["logits"] = f"2 x {n:,} tokens x {head.logits:,} logits x 4 B + a float32 chunk"
        else:
            logits = 3 * n * head.logits * 4
            details["logits"] = f"3 x {n:,} tokens x {head.logits:,} logits x 4 B"
    elif head.logits:  # a masked LM: only the picked tokens reach the loss
        if cpu_loss:
            logits = n * head.logits * low + 2 * picked * head.logits * low + chunk
            details["logits"] = f"{n:,} tokens x {head.logits:,} logits, the masked {picked:,} x 2, x {low} B"
        else:
            logits = n * head.logits * low + 3 * picked * head.logits * 4
            details["logits"] = f"{n:,} tokens x {head.logits:,} logits, the masked {picked:,} x 3 in float32"
    else:
        logits = 0
        details["logits"] = "one prediction per sequence: negligible"

    # -- the reference policy (objective=dpo): a frozen 16-bit copy of the weights, and its logits (no gradient)
    # alive beside the policy's while the loss is computed; with the adapter off or precomputed, no copy
    if u.reference == "frozen_copy":
        weights += total_params * 2
        details["weights"] += f" + reference: a frozen 16-bit copy ({count(total_params)} x 2 B)"
    if u.reference in ("frozen_copy", "adapter_off") and head.logits:
        ref_b = 2 if u.reference == "frozen_copy" else (low if mixed else 4)
        logits += n * head.logits * ref_b
        details["logits"] += f" + the reference's logits ({ref_b} B each)"
    if u.reference != "none":
        notes.append({"frozen_copy": "reference: a frozen 16-bit copy of the base",
                      "adapter_off": "reference: the policy with its adapter off (no copy)",
                      "precomputed": "reference: log-probabilities precomputed before training (no copy)"}
                     [u.reference])

    # -- devices
    world = max(1, u.devices)
    if world > 1 and u.strategy == "fsdp":
        unit = 2 * s.layer_params * (2 if textbook else 4 if quantized else loaded)
        weights = weights / world + unit
        gradients, optimizer, step_temporaries = gradients // world, optimizer // world, step_temporaries // world
        details["weights"] += f"; FSDP: 1/{world} per device + 2 gathered layers"
    elif world > 1 and u.strategy == "ddp":
        gradients *= 2
        details["gradients"] += "; DDP: + its gradient buckets"
    overhead = CUDA_OVERHEAD if u.device == "cuda" else CPU_OVERHEAD
    details["overhead"] = ("CUDA context and workspaces (approximate)" if u.device == "cuda" else
                           "the process itself: Python, torch, transformers")
    return Estimate(shape=s, setup=u, parameters=total_params + extra, trainable=trainable,
                    weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
                    activations=activations, logits=int(logits), overhead=overhead,
                    step_temporaries=int(step_temporaries), transient=transient, notes=notes, details=details)
