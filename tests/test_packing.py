"""Packing for fine-tuning (ftk.data.packing, ftk.cpu_attention.SegmentAttention): rows hold several examples
with attention kept inside each - the loss of each example in a packed row equals its loss alone (fp32 SDPA and
the CPU bf16 matmul path, GPT-2 and Llama), the bf16 path computes each example on its own rather than handing
the masked call to SDPA, gradients match, a training step on packed rows is the padded batch's step, and the
decision (data.packing) is taken in one place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ftk import cpu_attention
from ftk.cpu_attention import MatmulAttention, SegmentAttention, packed_segments, use_matmul_attention
from ftk.data.examples import Example, collate
from ftk.data.packing import collate_packed, pack_rows, packing_on
from ftk.errors import UsageError
from ftk.objectives.sft import SupervisedFineTuning

VOCAB = 200


def examples(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Example(input_ids=ids, token_labels=[-100] * prompt + ids[prompt:]))
    return out


def tiny(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                             max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0))
    return model.eval()  # no dropout: two forwards are the same function


def test_rows_hold_every_example_once_within_capacity_and_nearly_equal():
    lengths = [30, 5, 17, 22, 9, 28, 3, 14, 25, 11]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 64 and len(rows) == -(-sum(lengths) // 64)  # the fewest rows that can hold them
    assert max(fills) - min(fills) <= max(lengths) // 2  # balanced: little padding to the longest row
    with pytest.raises(ValueError):
        pack_rows([65], 64)


def test_packed_batch_layout():
    ex = examples(5)
    batch = collate_packed(ex, pad_id=0, capacity=64)
    assert "attention_mask" not in batch  # restarting position ids without a mask mean packed rows
    assert int(batch["real_tokens"]) == sum(len(e.input_ids) for e in ex)
    # every example's labels, minus its first token (never a target, as unpacked), are somewhere in the rows
    assert int((batch["labels"] != -100).sum()) == sum(sum(t != -100 for t in e.token_labels[1:]) for e in ex)
    starts = int((batch["position_ids"] == 0).sum())
    assert starts >= len(ex)  # each example (and each row's padding) restarts at 0


def per_example_losses(model, ex, packed):
    """The summed response loss of each example: from one packed batch, or each alone."""
    objective = SupervisedFineTuning()
    if not packed:
        return [float(objective.loss(model, collate([e], 0))[0]) for e in ex]
    batch = collate_packed(ex, 0, 64)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none",
                          ignore_index=-100).view(logits.shape[0], -1)
    rows = pack_rows([len(e.input_ids) for e in ex], 64)
    out = [0.0] * len(ex)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(ex[i].input_ids)
            out[i] = float(nll[r, at:at + n - 1].sum())  # position t predicts t+1, inside the example
            at += n
    total, _ = objective.loss(model, batch)
    assert float(total) == pytest.approx(sum(out), rel=1e-4)  # the objective sums the same targets
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_each_example_in_a_packed_row_has_its_loss_alone_fp32(kind):
    model, ex = tiny(kind), examples()
    with torch.no_grad():
        alone, packed = per_example_losses(model, ex, False), per_example_losses(model, ex, True)
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_matmul_attention_computes_packed_rows_example_by_example(kind, monkeypatch):
    model, ex = tiny(kind).to(torch.bfloat16), examples()
    assert use_matmul_attention(model)
    calls = []
    real = SegmentAttention.apply
    monkeypatch.setattr(SegmentAttention, "apply", lambda *a: calls.append(len(a[4])) or real(*a))
    with torch.no_grad():
        packed = per_example_losses(model, ex, True)
        alone = per_example_losses(model, ex, False)
    # served by the matmul path (not handed back to SDPA), one segment per example plus the rows' padding
    assert calls and calls[0] >= len(ex)
    assert packed == pytest.approx(alone, rel=3e-2, abs=3e-2)  # bf16 resolution; the order of roundings differs


def test_segment_attention_is_block_diagonal_sdpa_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(2, 3, 20, 8, generator=g) for _ in range(3)]
    seg_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 20])
    mask = (seg_ids[:, :, None] == seg_ids[:, None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    mask = mask[:, None]
    segments = packed_segments(mask)
    assert segments == [(0, 0, 7), (0, 7, 16), (0, 16, 20), (1, 0, 20)]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*ref, attn_mask=mask)
    out = SegmentAttention.apply(*mine, 8 ** -0.5, segments)
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    expected.backward(grad)
    out.backward(grad)
    for a, b in zip(mine, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    # a padding mask is not a packed one: it goes to SDPA
    padding = torch.ones(2, 1, 20, 20, dtype=torch.bool).tril()
    padding[1, :, :, 15:] = False
    assert packed_segments(padding) is None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_training_step_on_packed_rows_is_the_padded_batchs(kind):
    ex = examples(6, seed=3)
    objective = SupervisedFineTuning()
    grads = []
    for batch in (collate(ex, 0), collate_packed(ex, 0, 64)):
        model = tiny(kind)
        total, count = objective.loss(model, objective.inputs(batch))
        (total / count).backward()
        grads.append((float(total), int(count), torch.cat([p.grad.flatten() for p in model.parameters()
                                                          if p.grad is not None])))
    (padded_loss, padded_n, padded_g), (packed_loss, packed_n, packed_g) = grads
    assert padded_n == packed_n and packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert torch.allclose(packed_g, padded_g, atol=1e-6, rtol=1e-4)


def test_packing_is_decided_in_one_place():
    assert packing_on(None, "sft", "full") and packing_on(None, "sft", "lora")
    assert not packing_on(None, "classification", "full")  # not (yet) a packing objective: padded batches
    assert not packing_on(None, "sft", "prompt_tuning")  # virtual tokens would sit before the first example only
    assert not packing_on(False, "sft", "full")
    with pytest.raises(UsageError, match="data.packing=true: objective=classification"):
        packing_on(True, "classification", "full")
    with pytest.raises(UsageError, match="regime=prompt_tuning"):
        packing_on(True, "sft", "prompt_tuning")


def test_finetune_sft_packed_has_the_padded_runs_losses_and_resumes_exactly(pretrained, tmp_path, capsys):
    """`ftk finetune objective=sft`: packing is on by default and said so; its per-step losses are the padded
    run's (the same examples per step, the same targets), its token counts are real tokens only, and a packed
    run stopped and resumed continues with the uninterrupted run's losses."""
    import json

    from tests.conftest import ftk, make_labelled, write_jsonl

    records = [{"instruction": f"Name the keyword of: {r['text']}", "input": "", "output": r["label"]}
               for r in make_labelled(48, seed=3)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    common = [f"model.name_or_path={pretrained['gpt']}", "objective=sft", "regime=full", "hardware=cpu",
              "hardware.precision=fp32", "train.batch_size=8", "train.seq_len=64", "train.warmup_steps=2",
              "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.eval_batches=2",
              "train.lr=3e-3", f"data.path={data}"]

    def losses(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["tokens"]) for r in lines if "loss" in r}

    def run(name, *args):
        path = tmp_path / name
        assert ftk("finetune", *common, *args, f"hydra.run.dir={path}") == 0
        return path

    packed = losses(run("packed", "train.max_steps=6", "train.save_every=3"))
    assert "packing: several examples per row" in capsys.readouterr().err
    padded = losses(run("padded", "train.max_steps=6", "data.packing=false"))
    assert sorted(packed) == sorted(padded) == list(range(1, 7))
    for step in packed:
        assert packed[step][0] == pytest.approx(padded[step][0], rel=2e-3)  # fp32 matmuls at "high" precision
        assert packed[step][1] == padded[step][1]  # real tokens only, padding not counted
    checkpoint = tmp_path / "packed" / "checkpoints" / "step-0000003"
    assert checkpoint.is_dir()
    resumed = losses(run("resumed", "train.max_steps=6", f"train.resume={checkpoint}"))
    for step in range(4, 7):
        assert resumed[step][0] == pytest.approx(packed[step][0], rel=1e-6)
