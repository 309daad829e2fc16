"""The fast step (finetune/fastpath.py) learns what the plain step learns: same loss, same gradient for every
trained tensor, in fp32 and bf16, packed and padded. Tolerances: in fp32, 1e-5 relative to the gradient's norm
(summation order only). In bf16 both paths round (differently), so each is compared with the fp32 computation of
the same weights: the fast path's error must be at most twice the plain path's plus 1e-3, loss within 1%."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil

import pytest
import torch

from finetune import fastpath


def _tiny_lora(dtype, kv_heads=2, seed=0, heads=4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         initializer_range=0.1, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():  # B nonzero, so every LoRA tensor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


DOCS = (7, 12, 5, 9, 6, 8, 4, 10, 11, 3, 6, 9)  # short documents in a long row: attended one by one


def _packed_batch(lengths=DOCS, vocab=300, seed=1):
    """One padding-free row of documents (position ids restarting at 0), prompt tokens of each masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    start = 0
    for n in lengths:
        labels[0, start : start + n // 2] = -100  # the "prompt" half of each document
        start += n
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def _plain(model, inputs):
    """The plain step: every position's logits, transformers' sdpa over the whole row (a block-diagonal mask built
    from the position ids), the mean cross-entropy over labelled positions."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits.float()
    targets = inputs["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (targets != -100).sum()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _error(grads, truth):
    return {n: float((grads[n] - truth[n]).norm() / truth[n].norm().clamp(min=1e-12)) for n in truth}


def _assert_same(model, inputs, dtype, fast_context=None, route="layout"):
    """`route`: how the fast step attends: "layout" (documents one per row, padded), "documents" (one causal call
    per document), "varlen" (CUDA: one flash call for all) or "sdpa" (transformers' own, over whole rows)."""
    fastpath.install_attention()
    calls = []
    real, real_documents, real_varlen = fastpath._FromDocs.apply, fastpath.attend_documents, fastpath.attend_varlen
    fastpath._FromDocs.apply = lambda *a: calls.append("layout") or real(*a)
    fastpath.attend_documents = lambda *a: calls.append("documents") or real_documents(*a)
    fastpath.attend_varlen = lambda *a: calls.append("varlen") or real_varlen(*a)
    truth_model = copy.deepcopy(model).float()  # the same weights, computed in fp32 the plain way
    truth_loss = _plain(truth_model, inputs)
    truth = _grads(truth_model, truth_loss)
    plain_loss = _plain(model, inputs)
    plain = _grads(model, plain_loss)
    try:
        with fast_context or contextlib.nullcontext():
            fast_loss, count = fastpath.supervised_nll(model, inputs)
    finally:
        fastpath._FromDocs.apply, fastpath.attend_documents, fastpath.attend_varlen = real, real_documents, real_varlen
    assert calls == ([] if route == "sdpa" else [route] * 2)  # each of the 2 layers
    fast = _grads(model, fast_loss)
    assert int(count) == int((inputs["labels"][:, 1:] != -100).sum())
    assert fast.keys() == truth.keys() and len(truth) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    fast_err, plain_err = _error(fast, truth), _error(plain, truth)
    if dtype == torch.float32:
        assert abs(fast_loss.item() - plain_loss.item()) <= 1e-5 * plain_loss.item(), (fast_loss, plain_loss)
        assert max(_error(fast, plain).values()) <= 1e-5, _error(fast, plain)
    else:
        assert abs(fast_loss.item() - truth_loss.item()) <= 1e-2 * truth_loss.item(), (fast_loss, truth_loss)
        for name in truth:
            assert fast_err[name] <= 2 * plain_err[name] + 1e-3, (name, fast_err[name], plain_err[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_same_loss_and_gradients(dtype):
    _assert_same(_tiny_lora(dtype), _packed_batch(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_same_loss_and_gradients(dtype):
    """Unpacked rows, right-padded with an attention mask: only the logits are cut down, attention is sdpa's."""
    batch = _packed_batch(lengths=(14, 14))
    ids = torch.stack([batch["input_ids"][0, :14], batch["input_ids"][0, 14:]])
    labels = torch.stack([batch["labels"][0, :14], batch["labels"][0, 14:]])
    mask = torch.ones_like(ids)
    mask[1, 10:], labels[1, 10:] = 0, -100  # the second row is 10 tokens, then padding
    _assert_same(_tiny_lora(dtype), {"input_ids": ids, "attention_mask": mask, "labels": labels}, dtype,
                 route="sdpa")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_in_the_loss_over_several_rows_same_loss_and_gradients(dtype, monkeypatch):
    """A large vocabulary's path (the head's matmul in the chunked loss, over the trained places only) on several
    packed rows and on right-padded rows, whose trained positions differ from row to row."""
    monkeypatch.setattr(fastpath, "HEAD_IN_LOSS_VOCAB", 300)
    monkeypatch.setattr(fastpath, "LOSS_CHUNK", 16)
    calls = []
    real = fastpath._ChunkedNLL.apply
    monkeypatch.setattr(fastpath._ChunkedNLL, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    a = _packed_batch(lengths=(5, 6, 4, 7, 6, 2, 5, 4, 6, 3), seed=2)
    b = _packed_batch(lengths=(3, 5, 4, 5, 6, 7, 4, 6, 4, 4), seed=3)
    _assert_same(_tiny_lora(dtype), {k: torch.cat([a[k], b[k]]) for k in a}, dtype)
    batch = _packed_batch(lengths=(14, 14))
    ids = torch.stack([batch["input_ids"][0, :14], batch["input_ids"][0, 14:]])
    labels = torch.stack([batch["labels"][0, :14], batch["labels"][0, 14:]])
    mask = torch.ones_like(ids)
    mask[1, 10:], labels[1, 10:] = 0, -100
    _assert_same(_tiny_lora(dtype), {"input_ids": ids, "attention_mask": mask, "labels": labels}, dtype,
                 route="sdpa")
    assert calls == [torch.Size([64, 64])] * 2  # trained places (under 64), rounded up: hidden states, not logits


def test_fp32_adapter_on_a_bf16_base_computed_under_autocast():
    """The recipes' default: bf16 frozen base, fp32 LoRA; the fast step computes LoRA in bf16 under autocast."""
    model = _tiny_lora(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    _assert_same(model, _packed_batch(), torch.bfloat16, fastpath.lora_autocast(model, torch.bfloat16, "cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_several_packed_rows_and_multi_query_heads():
    """Pretraining's shape: a batch of packed rows, documents carried across rows; one key/value head."""
    a = _packed_batch(lengths=(5, 6, 4, 7, 6, 2, 5, 4, 6, 3), seed=2)
    b = _packed_batch(lengths=(3, 5, 4, 5, 6, 7, 4, 6, 4, 4), seed=3)
    inputs = {k: torch.cat([a[k], b[k]]) for k in a}
    _assert_same(_tiny_lora(torch.float32, kv_heads=1), inputs, torch.float32)
    # Three query heads to a key/value head, in bf16 too; 5 documents, so the layout adds 3 empty ones.
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same(_tiny_lora(dtype, kv_heads=2, heads=6), _packed_batch(lengths=(5, 6, 1, 7, 9)), dtype)
    long_documents = _packed_batch(lengths=(30, 8))  # 4 x 2 x 30^2 > 64^2, and calls cost more than 64^2 positions
    _assert_same(_tiny_lora(torch.float32), long_documents, torch.float32, route="sdpa")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_documents_attended_one_call_each(dtype, monkeypatch):
    """Long documents (bench_chat's shape): one causal sdpa call per document, within a row and across rows (a
    document carried from one row into the next), grouped-query heads. A call's cost scaled to these tiny rows."""
    monkeypatch.setattr(fastpath, "DOC_CALL_COST", 8**2)
    _assert_same(_tiny_lora(dtype), _packed_batch(lengths=(40, 17, 33)), dtype, route="documents")
    a, b = _packed_batch(lengths=(25, 39), seed=2), _packed_batch(lengths=(30, 34), seed=3)
    b["position_ids"][0, :30] += 25  # row 2 starts mid-document: attended within its row, as transformers' mask does
    inputs = {k: torch.cat([a[k], b[k]]) for k in a}
    assert fastpath.doc_lengths(inputs["position_ids"]).tolist() == [25, 39, 30, 34]
    _assert_same(_tiny_lora(dtype, kv_heads=1), inputs, dtype, route="documents")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel's variable-length form is CUDA's")
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cuda_documents_attended_in_one_varlen_flash_call(kv_heads):
    """On CUDA (bf16), every document of a packed batch in one call of the flash kernel's variable-length form,
    grouped key/value heads as they are: short documents, long ones, and a document carried into the next row."""
    a, b = _packed_batch(lengths=(25, 39), seed=2), _packed_batch(lengths=(30, 34), seed=3)
    b["position_ids"][0, :30] += 25
    rows = {k: torch.cat([a[k], b[k]]) for k in a}
    for inputs in (_packed_batch(), _packed_batch(lengths=(40, 17, 33)), rows):
        model = _tiny_lora(torch.bfloat16, kv_heads=kv_heads).cuda()
        _assert_same(model, {k: v.cuda() for k, v in inputs.items()}, torch.bfloat16, route="varlen")


def test_varlen_route_falls_back_to_the_route_the_step_chose(monkeypatch):
    """Where the flash kernel does not take the call (here: CPU tensors), the cumulative lengths are ignored and the
    step's own route runs (one call per document where it chose that; else transformers' sdpa over whole rows). A
    kernel that refuses the call is warned about once and not tried again; running out of memory is not a refusal."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 24, 16), torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    cu, module = torch.tensor([0, 10, 24], dtype=torch.int32), SimpleNamespace(training=False, num_key_value_groups=2)
    documents = torch.cat([fastpath.attend_documents(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], [b - a], 0.25)
                           for a, b in ((0, 10), (10, 24))], dim=1)
    out, _ = fastpath.packed_sdpa(module, q, k, v, None, scaling=0.25, doc_cu=cu, doc_max=14, doc_lengths=[10, 14])
    torch.testing.assert_close(out, documents)
    mask = torch.zeros(1, 1, 24, 24, dtype=torch.bool)
    mask[..., :10, :10] = mask[..., 10:, 10:] = True
    mask &= torch.ones(24, 24, dtype=torch.bool).tril()
    whole, _ = fastpath.packed_sdpa(module, q, k, v, mask, scaling=0.25, doc_cu=cu, doc_max=14)
    torch.testing.assert_close(whole, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])
    torch.testing.assert_close(whole, documents)
    monkeypatch.setattr(fastpath, "_cuda_flash_takes", lambda *a: True)
    monkeypatch.setattr(fastpath, "_varlen_runs", True)

    def out_of_memory(*a):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fastpath, "attend_varlen", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fastpath.packed_sdpa(module, q, k, v, None, scaling=0.25, doc_cu=cu, doc_max=14, doc_lengths=[10, 14])
    assert fastpath._varlen_runs

    def refused(*a):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(fastpath, "attend_varlen", refused)
    with pytest.warns(UserWarning, match="variable-length form failed \\(FlashAttention only supports Ampere"):
        out, _ = fastpath.packed_sdpa(module, q, k, v, None, scaling=0.25, doc_cu=cu, doc_max=14, doc_lengths=[10, 14])
    torch.testing.assert_close(out, documents)
    assert not fastpath._varlen_runs


def test_grouped_heads_reach_the_cuda_flash_kernel_only_where_torch_says_it_runs_them():
    """On CUDA, grouped key/value heads go to sdpa unrepeated only where torch's own check says its flash kernel
    takes the call (other kernels would run it in the math kernel). The check is called as this torch defines it:
    for CPU tensors it answers no, where the fallback (dtype and head size) would say yes."""
    q = torch.zeros(1, 6, 8, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert fastpath._cuda_flash_takes(q, kv, kv, 0.0) is False
    key, value, gqa = fastpath._grouped(q, kv, kv)  # the CPU's flash kernel takes grouped heads
    assert key is kv and gqa == {"enable_gqa": True}


def test_documents_attend_only_to_themselves():
    """A document's logits are the same alone as packed behind another one."""
    fastpath.install_attention()
    model = _tiny_lora(torch.float32).eval()
    packed = _packed_batch(lengths=(9, 11))
    alone = {"input_ids": packed["input_ids"][:, 9:], "position_ids": packed["position_ids"][:, 9:]}
    with torch.no_grad():
        layout = fastpath.doc_layout(packed["position_ids"])
        both = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], **layout).logits[:, 9:]
        single = model(**alone).logits
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-5)


def test_doc_layout_names_each_document():
    layout = fastpath.doc_layout(torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]]))  # row 2 continues a document
    assert layout["doc_index"][:, :3].tolist() == [[0, 1, 2], [3, 4, 0], [5, 6, 0], [7, 8, 9]]
    # Rounded up to a multiple of 4 documents and 16 places; the real tokens' places in [documents x 16], in order.
    assert layout["doc_index"].shape == (4, 16)
    assert layout["doc_valid"].tolist() == [0, 1, 2, 16, 17, 32, 33, 48, 49, 50]
    five = fastpath.doc_layout(torch.tensor([[0, 1, 0, 0, 0, 0]]))
    assert five["doc_index"].shape == (8, 16) and five["doc_valid"].tolist() == [0, 1, 16, 32, 48, 64]


def test_rows_and_kept_positions_are_rounded_up_to_a_few_shapes():
    """The model sees rows widened to a multiple of 64 tokens (untrained, after every real token, documents no longer
    than the longest real one) and keeps logits at a multiple of 64 positions; the loss is the same."""
    model = _tiny_lora(torch.float32)
    inputs = _packed_batch()  # 90 tokens, 12 documents
    widened = fastpath.pad_to_multiple(inputs)
    assert widened["input_ids"].shape == (1, 128) and (widened["labels"][:, 90:] == -100).all()
    assert widened["position_ids"][0, 90:].tolist() == [i % 12 for i in range(38)]
    seen = []
    real = model.base_model.model.forward
    model.base_model.model.forward = lambda **kw: seen.append((kw["input_ids"].shape, kw["logits_to_keep"].shape)) \
        or real(**kw)
    loss, count = fastpath.supervised_nll(model, inputs)
    model.base_model.model.forward = real
    assert seen == [(torch.Size([1, 128]), torch.Size([64]))]  # 48 trained positions -> 64
    assert abs(loss.item() - _plain(model, inputs).item()) <= 1e-5 * loss.item() and int(count) == 48
    with_mask = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"]),
                 "labels": inputs["labels"]}
    widened = fastpath.pad_to_multiple(with_mask)
    assert widened["attention_mask"][0, 90:].sum() == 0 and widened["attention_mask"][0, :90].all()


def test_no_trained_token_gives_a_zero_loss_with_a_gradient():
    model = _tiny_lora(torch.float32)
    inputs = _packed_batch()
    inputs["labels"][:] = -100
    loss, count = fastpath.supervised_nll(model, inputs)
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0


def test_long_losses_are_chunked_exactly(monkeypatch):
    model = _tiny_lora(torch.float32)
    inputs = _packed_batch(lengths=(40, 50, 30))
    head_in_loss = fastpath.head_in_loss
    monkeypatch.setattr(fastpath, "LOSS_WHOLE_BYTES_CPU", 2**62)  # whole logits, from the model's head
    monkeypatch.setattr(fastpath, "head_in_loss", lambda *args: False)
    whole, _ = fastpath.supervised_nll(model, inputs)
    monkeypatch.setattr(fastpath, "LOSS_CHUNK", 16)
    monkeypatch.setattr(fastpath, "LOSS_WHOLE_BYTES_CPU", 0)
    logits, _ = fastpath.supervised_nll(model, inputs)  # the model's logits, chunked (a head the loss can't take)
    monkeypatch.setattr(fastpath, "head_in_loss", head_in_loss)
    chunked, _ = fastpath.supervised_nll(model, inputs)  # the CPU's default: the head's matmul in the chunked loss
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n][:1]
    (grad_whole,) = torch.autograd.grad(whole, lora_b)
    for loss in (logits, chunked):
        torch.testing.assert_close(whole, loss)
        torch.testing.assert_close(grad_whole, torch.autograd.grad(loss, lora_b)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_with_its_gradient_in_one_pass(monkeypatch, dtype):
    """The chunked loss (a real vocabulary's path: gradient computed in the forward, chunk by chunk) learns what the
    plain step learns, at the module's tolerances; on the CPU each chunk's logits and log-probabilities go into
    buffers kept between chunks and steps (the same ones the next step); a second backward through it is refused."""
    monkeypatch.setattr(fastpath, "LOSS_CHUNK", 16)
    monkeypatch.setattr(fastpath, "LOSS_WHOLE_BYTES_CPU", 0)  # (the CPU's default)
    monkeypatch.setattr(fastpath, "_kept", {})
    calls = []
    real = fastpath._ChunkedNLL.apply
    monkeypatch.setattr(fastpath._ChunkedNLL, "apply", lambda *a: calls.append(a[0].shape[-1]) or real(*a))
    _assert_same(_tiny_lora(dtype), _packed_batch(), dtype)
    assert calls == [64]  # hidden states and the head's weight: the logits are computed chunk by chunk inside
    kept = {use: (b.data_ptr(), b.shape, b.dtype) for use, b in fastpath._kept.items()}
    assert kept == {"logits": (kept["logits"][0], (16, 300), dtype), "logprobs": (kept["logprobs"][0], (16, 300),
                                                                                 torch.float32)}
    loss, _ = fastpath.supervised_nll(_tiny_lora(dtype), _packed_batch())
    assert {use: (b.data_ptr(), b.shape, b.dtype) for use, b in fastpath._kept.items()} == kept
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated once"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_through_a_trained_tied_head(monkeypatch, dtype):
    """Every weight trained (pretraining), the head tied to the embeddings: the head's matmul inside the chunked
    loss gives the tied weight its head gradient (added to the embedding's), as the plain step does."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.setattr(fastpath, "LOSS_CHUNK", 16)
    monkeypatch.setattr(fastpath, "LOSS_WHOLE_BYTES_CPU", 0)  # (the CPU's default)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.1, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = _packed_batch()
    truth_model = copy.deepcopy(model).float()
    truth = _grads(truth_model, _plain(truth_model, inputs))
    plain = _grads(model, _plain(model, inputs))
    fast = _grads(model, fastpath.supervised_nll(model, inputs)[0])
    assert fast.keys() == truth.keys() and "lm_head.weight" not in fast and "model.embed_tokens.weight" in fast
    fast_err, plain_err = _error(fast, truth), _error(plain, truth)
    for name in truth:
        limit = 1e-5 if dtype == torch.float32 else 2 * plain_err[name] + 1e-3
        assert fast_err[name] <= limit, (name, fast_err[name], plain_err[name])


def test_held_out_loss_through_the_head_in_the_loss_is_the_plain_loss(monkeypatch):
    """Without gradients (evaluation), a large vocabulary's head still runs inside the loss, chunk by chunk over the
    trained places only: the loss is the plain step's (fp32: 1e-6 relative)."""
    model = _tiny_lora(torch.float32)
    inputs = _packed_batch(lengths=(40, 50, 30))
    with torch.no_grad():
        plain = _plain(model, inputs)
    monkeypatch.setattr(fastpath, "LOSS_CHUNK", 16)
    monkeypatch.setattr(fastpath, "HEAD_IN_LOSS_VOCAB", 300)  # the tiny model's vocabulary counts as large
    calls = []
    real = fastpath._head_nll
    monkeypatch.setattr(fastpath, "_head_nll", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        loss, count = fastpath.supervised_nll(model, inputs)
    trained = int((inputs["labels"][:, 1:] != -100).sum())
    assert int(count) == trained and calls == [torch.Size([-(-trained // 64) * 64, 64])]  # hidden states, rounded
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)


def test_trained_rows_are_picked_and_rounded_up_untrained():
    x = torch.arange(10.0)[:, None].expand(10, 3)
    targets = torch.tensor([-100, 4, -100, 7, 8, -100, -100, -100, 2, -100])
    rows, picked = fastpath._trained_rows(x, targets)
    assert rows.shape == (64, 3) and rows[:4, 0].tolist() == [1.0, 3.0, 4.0, 8.0] and not rows[4:].any()
    assert picked[:4].tolist() == [4, 7, 8, 2] and (picked[4:] == -100).all()
    rows, picked = fastpath._trained_rows(x, torch.full((10,), -100))
    assert rows.shape == (64, 3) and (picked == -100).all()


def test_chunked_loss_ignores_untrained_rows_whatever_their_logits():
    """A row whose target is -100 adds nothing to the loss or the gradient, even with -inf logits (as
    F.cross_entropy's ignore_index); fp16 logits keep an fp32 gradient until the loss scale is applied."""
    logits = torch.randn(5, 7, requires_grad=True)
    targets = torch.tensor([1, -100, 3, -100, 0])
    with torch.no_grad():
        logits[1] = float("-inf")
    loss = fastpath._ChunkedNLL.apply(logits, targets)
    (grad,) = torch.autograd.grad(loss * 1e4, logits)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    assert not grad[~keep].any() and torch.isfinite(grad).all()
    half = torch.full((1, 7), -12.0, dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        half[0, 0] = 12.0  # the other probabilities ~4e-11: zero in fp16, ~0.3 once scaled by 2**30
    (grad,) = torch.autograd.grad(fastpath._ChunkedNLL.apply(half, torch.tensor([0])) * 2**30, half)
    assert grad.dtype == torch.float16 and (grad[0, 1:] > 0).all()


def test_sft_trainer_fast_loss_matches_trl_loss(tmp_path, tiny_llama, chat_file):
    """Through the SFT stage's trainer on a real packed batch: the fast loss is TRL's own loss."""
    from finetune.stages import runner
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, data={"packing": True, "eval_datasets": [str(chat_file)]})
    trainer = runner.build(recipe).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    fast = type(trainer).compute_loss(trainer, trainer.model, dict(batch))
    plain = type(trainer).__mro__[1].compute_loss(trainer, trainer.model, dict(batch))
    assert "cu_seq_lens_q" in batch  # packed, padding-free
    assert abs(fast.item() - plain.item()) <= 2e-2 * plain.item(), (fast, plain)
    # Evaluation takes the fast loss too (no every-position logits), and it is TRL's held-out loss.
    fast_eval = trainer.evaluate()
    object.__setattr__(recipe.train, "fast_path", False)
    plain_eval = trainer.evaluate()
    assert "eval_entropy" not in fast_eval and "eval_entropy" in plain_eval  # TRL's path computed over the vocabulary
    assert abs(fast_eval["eval_loss"] - plain_eval["eval_loss"]) <= 2e-2 * plain_eval["eval_loss"]


def test_fast_loss_takes_bf16_logits_past_accelerates_fp32_outputs(tmp_path, tiny_llama, chat_file, monkeypatch):
    """Under bf16 mixed precision accelerate converts the model's outputs to fp32 (a [positions x vocabulary] copy,
    and an fp32 gradient of that size). The fast step takes the logits in bf16, for the same loss (the conversion is
    exact), and leaves accelerate's forward in place."""
    from finetune.stages import runner
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, model={"name": str(tiny_llama), "dtype": "bf16"},
                         data={"packing": True})
    trainer = runner.build(recipe).trainer
    model = trainer.accelerator.prepare_model(trainer.model)
    wrapped = model.forward
    batch = next(iter(trainer.get_train_dataloader()))
    dtypes = []
    real = fastpath._chunked_nll
    monkeypatch.setattr(fastpath, "_chunked_nll", lambda logits, t: dtypes.append(logits.dtype) or real(logits, t))
    monkeypatch.setattr(fastpath, "head_in_loss", lambda *args: False)  # the model returns logits (the head's own)
    trained = [p for p in model.parameters() if p.requires_grad]
    with fastpath.lora_autocast(model, torch.bfloat16, "cpu"):
        fast = fastpath.trainer_loss(trainer, model, dict(batch))
        fast_grads = torch.autograd.grad(fast, trained)
        through_accelerate, _ = fastpath.supervised_nll(model, dict(batch))
        accelerate_grads = torch.autograd.grad(through_accelerate, trained)
        with fastpath.outputs_in_model_dtype(model, torch.float16):  # not accelerate's dtype: its forward is kept
            fastpath.supervised_nll(model, dict(batch))
    assert trainer.args.bf16 and dtypes == [torch.bfloat16, torch.float32, torch.float32]
    assert fast.item() == through_accelerate.item()
    assert model.forward == wrapped
    for mine, theirs in zip(fast_grads, accelerate_grads):  # one more bf16 rounding of the unscaled gradient
        assert (mine.float() - theirs.float()).norm() <= 1e-2 * theirs.float().norm()


def test_bench_names_an_unknown_case(capsys):
    from finetune.cli import main

    assert main(["bench", "--cases", "sft-lora-json,nope"]) == 2
    assert "--cases: unknown nope; choose from sft-lora-json, sft-lora-chat" in capsys.readouterr().err


def test_bench_table_names_the_machine_and_its_ratios_and_mfu():
    """The table says what it was measured on (its figures differ by CPU: AMX or not), and computes the ratio to the
    first side and MFU (4 x parameters for LoRA SFT, 6 x for pretraining) against the measured rate."""
    from finetune.bench import _table, machine

    rows = [{"case": "sft-lora-json", "side": "trl", "tokens_per_second": 100.0, "warmup_seconds": 20.0,
             "peak_rss_mib": 3072.0, "parameters": 10**8, "heldout_loss": 0.25},
            {"case": "sft-lora-json", "side": "finetune", "tokens_per_second": 450.0, "warmup_seconds": 8.0,
             "peak_rss_mib": 2048.0, "parameters": 10**8, "heldout_loss": 0.02, "tokens_per_step": 930},
            {"case": "pretrain", "side": "finetune", "tokens_per_second": 4000.0, "warmup_seconds": 9.0,
             "peak_rss_mib": 1024.0, "parameters": 7 * 10**6}]
    lines = _table(rows, {2048: 4e11}).splitlines()
    assert lines[0] == f"Machine: {machine()}" and machine()
    assert lines[2] == "bf16 matmul measured in this run (TFLOP/s): 2048x2048 0.40; MFU against 0.40"
    assert lines[6] == "| sft-lora-json | trl | 100 | 1.00 | 20 | 3.00 | - | 10.0% | 0.2500 |"
    assert lines[7] == "| sft-lora-json | finetune | 450 | 4.50 | 8 | 2.00 | 930 | 45.0% | 0.0200 |"
    assert lines[8] == "| pretrain | finetune | 4000 | 1.00 | 9 | 1.00 | - | 42.0% | - |"


def test_bench_rounds_are_each_read_against_their_own_first_side():
    """--repeat: each round's ratio is against that round's TRL side, and the table ends with each side's median."""
    from finetune.bench import _table

    def row(side, speed, round_):
        return {"case": "sft-lora-json", "side": side, "tokens_per_second": speed, "warmup_seconds": 10.0,
                "peak_rss_mib": 2048.0, "parameters": 10**8, "round": round_}

    rows = [row("trl", 100.0, 1), row("finetune", 400.0, 1), row("trl", 80.0, 2), row("finetune", 440.0, 2),
            row("trl", 120.0, 3), row("finetune", 420.0, 3)]
    lines = _table(rows, {2048: 4e11}).splitlines()
    assert lines[6].startswith("| sft-lora-json | trl, round 1 | 100 | 1.00 |")
    assert lines[9].startswith("| sft-lora-json | finetune, round 2 | 440 | 5.50 |")
    assert lines[11].startswith("| sft-lora-json | finetune, round 3 | 420 | 3.50 |")
    assert lines[-2:] == ["sft-lora-json trl: median 100 tokens/s (3 rounds)",
                          "sft-lora-json finetune: x plain 4.00 (median of 3 rounds: 4.00, 5.50, 3.50), median 420 "
                          "tokens/s"]


def test_bench_refuses_no_rounds(capsys):
    from finetune.cli import main

    assert main(["bench", "--repeat", "0"]) == 2
    assert "--repeat 0: give 1 or more rounds" in capsys.readouterr().err


def test_malloc_tunable_set_where_it_changes_something(tmp_path):
    """The command re-executes itself with glibc's huge-page tunable only where transparent huge pages are given on
    request ("madvise"), keeping a user's own tunables, and never twice or when turned off."""
    import platform
    import subprocess
    import sys

    from finetune.cli import malloc_tunables

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    modes = {}
    for mode in ("always", "madvise", "never"):
        modes[mode] = tmp_path / mode
        modes[mode].write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")))
    assert malloc_tunables({}, str(modes["madvise"])) == "glibc.malloc.hugetlb=1"
    assert malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, str(modes["madvise"])) == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert malloc_tunables({}, str(modes["always"])) is None and malloc_tunables({}, str(modes["never"])) is None
    assert malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, str(modes["madvise"])) is None
    assert malloc_tunables({"FINETUNE_MALLOC_TUNING": "0"}, str(modes["madvise"])) is None
    assert malloc_tunables({}, str(tmp_path / "missing")) is None
    expected = malloc_tunables({})
    code = ("import os, sys; print(os.environ.get('GLIBC_TUNABLES'), flush=True); sys.argv = ['finetune', '--help'];"
            "from finetune.cli import main; main()")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GLIBC_TUNABLES", "FINETUNE_MALLOC_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.splitlines()
    # This machine: printed once before and once after the re-execution, or once where nothing is to change.
    assert out[:2] == (["None", expected] if expected else ["None", "usage: finetune [-h] [--debug] VERB ..."])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_blocks_compute_the_same_values_and_gradients_bit_for_bit(dtype):
    """`lean_blocks` keeps less for backward (no fp32 copy of a norm's input, no silu output) but runs the same
    operations as autograd on transformers' own forwards: outputs and gradients are identical, not merely close.
    The norm's weight is trained here too (pretraining); the modules' own forwards come back afterwards."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm

    torch.manual_seed(0)
    block = torch.nn.Sequential(LlamaRMSNorm(64, eps=1e-5), LlamaMLP(LlamaConfig(hidden_size=64,
                                                                                  intermediate_size=128))).to(dtype)
    torch.nn.init.normal_(block[0].weight)
    x = torch.randn(3, 50, 64, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 50, 64, dtype=dtype)
    results = []
    for lean in (False, True):
        x.grad = None
        block.zero_grad()
        with fastpath.lean_blocks(block) if lean else contextlib.nullcontext():
            out = block(x)
            if lean:
                assert "forward" in block[0].__dict__ and "forward" in block[1].__dict__
        (out * upstream).sum().backward()
        results.append([out, x.grad, *(p.grad for p in block.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert "forward" not in block[0].__dict__ and "forward" not in block[1].__dict__


@pytest.mark.parametrize("case", ["fp32", "bf16", "bf16 base, fp32 adapter under autocast"])
def test_lora_sum_in_the_matmul_epilogue_matches_peft(case):
    """`lean_blocks` computes peft's LoRA linear layers as base + addmm(scaling): outputs and the gradients of the
    input and of A and B as peft's forward gives them. fp32: 1e-6 relative (one rounding of the scaled sum instead of
    two); bf16: within peft's own bf16 error from the fp32 truth, times 2, plus 1e-3. A layer with dropout or DoRA
    keeps peft's forward (the same output bit for bit, dropout's masks drawn from the same seed), as does one whose A
    or B has a hook (FSDP's and ZeRO-3's gather sharded weights there)."""
    from peft import LoraConfig, get_peft_model

    def layer(dtype, adapter_dtype, **config):
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 96)).to(dtype),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["0"], **config))
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.1)
                p.data = p.data.to(adapter_dtype)
        return model

    addmm, calls = torch.addmm, []

    def counted(*args, **kwargs):
        calls.append(1)
        return addmm(*args, **kwargs)

    def run(model, x, fused, autocast):
        calls.clear()
        model.zero_grad()
        x = x.detach().requires_grad_()
        with fastpath.lean_blocks(model) if fused else contextlib.nullcontext(), \
                fastpath._lora_inputs_uncast(model, autocast), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                assert model.base_model.model[0].forward.__func__ is fastpath._lora_forward
            torch.addmm = counted
            try:
                out = model(x)
            finally:
                torch.addmm = addmm
            assert len(calls) == (1 if fused else 0)  # the epilogue's sum, or peft's own forward
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = [x.grad] + [p.grad for n, p in model.named_parameters() if "lora_" in n]
        return [t.detach().float() for t in [out, *grads]]

    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    autocast = "autocast" in case
    model = layer(dtype, torch.float32 if autocast else dtype)
    x = torch.randn(2, 40, 64, dtype=dtype)
    fused, plain = run(model, x, True, autocast), run(model, x, False, autocast)
    if dtype == torch.float32:
        for f, p in zip(fused, plain):
            assert float((f - p).norm() / p.norm()) <= 1e-6
    else:
        truth = run(copy.deepcopy(model).float(), x.float(), False, False)
        for f, p, t in zip(fused, plain, truth):
            assert float((f - t).norm() / t.norm()) <= 2 * float((p - t).norm() / t.norm()) + 1e-3
    hooked = layer(torch.float32, torch.float32)  # A sharded in a hook (FSDP's way): peft calls A, we do not
    hooked.base_model.model[0].lora_A["default"].register_forward_pre_hook(lambda *_: None)
    assert fastpath._plain_lora_names(hooked.base_model.model[0]) == set()
    for config in ({"lora_dropout": 0.5}, {"use_dora": True}):  # dropout: the same masks from the same seed
        other = layer(torch.float32, torch.float32, **config)
        assert fastpath._plain_lora_names(other.base_model.model[0]) == set()
        with torch.no_grad(), fastpath.lean_blocks(other):
            torch.manual_seed(1)
            inside = other(x.float())
        with torch.no_grad():
            torch.manual_seed(1)
            assert torch.equal(inside, other(x.float()))


def test_lean_blocks_hold_less_for_backward():
    """The point of `lean_blocks`: on a tiny Llama, the tensors autograd keeps for backward take fewer bytes."""
    model = _tiny_lora(torch.bfloat16)
    inputs = _packed_batch()

    def held(lean: bool) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with fastpath.lean_blocks(model) if lean else contextlib.nullcontext():
                model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
        return sum(n for ptr, n in seen.items() if ptr not in params)

    plain, lean = held(False), held(True)
    tokens, layers = inputs["input_ids"].numel(), model.config.num_hidden_layers
    silu_outputs = layers * tokens * model.config.intermediate_size * 2  # bf16, no longer kept
    norm_inputs = 2 * layers * tokens * model.config.hidden_size * (4 - 2)  # fp32 copies -> the bf16 inputs
    assert plain - lean >= silu_outputs + norm_inputs, (plain, lean)


@pytest.mark.parametrize("case", ["fp32", "bf16 base, fp32 adapter under autocast"])
@pytest.mark.parametrize("recompute", [False, True])
def test_lora_layers_sharing_an_input_take_one_matmul_and_may_recompute_it(case, recompute, monkeypatch):
    """`lean_blocks` runs the A matmuls of q/k/v, and of gate/up, as one (`_LoRAIn`, one per group and layer); where
    the device recomputes LoRA inputs (`recompute`: every device but the CPU by default; here the CPU stood in), the
    norms' and SwiGLU's outputs are not kept for backward but computed again, and down_proj's A runs through it too.
    Loss and every gradient as peft's own forward gives them (fp32: 1e-5 relative; bf16: within 2x peft's own error
    from the fp32 truth, plus 1e-3), and what autograd keeps drops by at least those outputs' bytes where they were
    kept (the first layer's input norm keeps nothing itself: its output stays)."""
    _check_shared_input(case, recompute, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_cuda_lora_inputs_recomputed_with_fused_kernels(monkeypatch):
    """The GPU's default: LoRA inputs recomputed, by the fused kernels."""
    assert "cuda" not in fastpath._keep_lora_inputs_on
    monkeypatch.setattr(fastpath, "_compiled", {})
    with _fused_on("cuda"):
        _check_shared_input("bf16 base, fp32 adapter under autocast", True, monkeypatch, "cuda")
        assert fastpath._fuse_on == {"cuda"}
    assert {fastpath._rms_out, fastpath._swiglu} <= set(fastpath._compiled)


def _check_shared_input(case, recompute, monkeypatch, device="cpu"):
    keep = frozenset({"cpu", "cuda"} - ({device} if recompute else set()))
    monkeypatch.setattr(fastpath, "_keep_lora_inputs_on", keep)
    autocast = "autocast" in case
    dtype = torch.bfloat16 if autocast else torch.float32
    model = _tiny_lora(dtype).to(device)
    inputs = {k: v.to(device) for k, v in _packed_batch().items()}
    forward = {k: inputs[k] for k in ("input_ids", "position_ids")}
    ranks, real = [], fastpath._LoRAIn.apply
    monkeypatch.setattr(fastpath._LoRAIn, "apply", lambda *a: ranks.append(a[2]) or real(*a))

    def run(model, lean, autocast, hook=None):
        model.zero_grad()
        with fastpath.step_modules(model, dtype) if lean else contextlib.nullcontext(), \
                fastpath._lora_inputs_uncast(model, autocast), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=autocast), \
                hook or contextlib.nullcontext():
            logits = model(**forward, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], inputs["labels"][0, 1:], ignore_index=-100)
        return loss, _grads(model, loss)

    ranks.clear()
    fast_loss, fast = run(model, True, autocast)
    layer = [[8, 8, 8], [8, 8]] + ([[8]] if recompute else [])  # q/k/v, gate/up, down_proj (recomputed SwiGLU)
    assert ranks == layer * 2
    assert not any("_finetune_group" in m.__dict__ for m in model.modules())  # taken back with the forwards
    plain_loss, plain = run(model, False, autocast)
    if not autocast:
        assert abs(fast_loss.item() - plain_loss.item()) <= 1e-5 * plain_loss.item()
        assert max(_error(fast, plain).values()) <= 1e-5, _error(fast, plain)
    else:
        truth = run(copy.deepcopy(model).float(), False, False)[1]
        fast_err, plain_err = _error(fast, truth), _error(plain, truth)
        assert all(fast_err[n] <= 2 * plain_err[n] + 1e-3 for n in truth), (fast_err, plain_err)

    def held(kept) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        monkeypatch.setattr(fastpath, "_keep_lora_inputs_on", kept)
        run(model, True, autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in seen.items() if ptr not in params)

    if recompute:
        config, tokens, size = model.config, inputs["input_ids"].numel(), 2 if autocast else 4
        outputs = ((2 * config.num_hidden_layers - 1) * config.hidden_size
                   + config.num_hidden_layers * config.intermediate_size) * tokens * size
        assert held(frozenset({device})) - held(frozenset()) >= outputs


@pytest.mark.parametrize("recompute", [False, True])
def test_activation_checkpointing_recomputes_the_fast_steps_forward(tmp_path, tiny_llama, chat_file, recompute,
                                                                    monkeypatch):
    """With train.activation_checkpointing, backward recomputes each layer's forward: the fast step's (lean blocks,
    uncast LoRA inputs on a bf16 base, LoRA inputs recomputed or not), since they stay in place for the whole
    training step. The step's gradients are the ones without checkpointing."""
    from finetune.stages import runner
    from tests.conftest import tiny_recipe

    monkeypatch.setattr(fastpath, "_keep_lora_inputs_on", frozenset() if recompute else frozenset({"cpu"}))

    grads = []
    for checkpointing in (False, True):
        recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, model={"name": str(tiny_llama), "dtype": "bf16"},
                             data={"packing": True}, train={"activation_checkpointing": checkpointing})
        trainer = runner.build(recipe).trainer
        if trainer.args.activation_checkpointing:
            trainer.model.activation_checkpointing_enable()  # as Trainer.train does before its first step
        assert trainer.model.is_activation_checkpointing == checkpointing
        torch.manual_seed(0)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, whose step this is
        trainer.training_step(trainer.model, dict(batch))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        assert not any("forward" in m.__dict__ for m in trainer.model.modules() if "RMSNorm" in type(m).__name__)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6)


def test_the_head_moves_into_the_loss_only_where_it_is_a_plain_unhooked_layer():
    """The chunked loss computes the head's matmul itself only for a plain bias-free linear head whose forward is its
    own: a hooked head (FSDP/ZeRO-3 gather weights in hooks) or a wrapped forward keeps the model's own head."""
    model = _tiny_lora(torch.float32)
    head = model.get_output_embeddings()
    assert fastpath._plain_head(model) is head
    handle = head.register_forward_pre_hook(lambda module, args: None)
    assert fastpath._plain_head(model) is None
    handle.remove()
    head.forward = head.forward  # an instance-level forward (accelerate's device-map hooks wrap it so)
    assert fastpath._plain_head(model) is None
    del head.forward
    with fastpath._head_skipped(head):
        hidden = torch.randn(2, 64)
        assert head(hidden) is hidden
    assert "forward" not in head.__dict__ and fastpath._plain_head(model) is head
    head.weight.requires_grad_(True)  # trained and untied: outside the forward's graph, which DDP would refuse
    assert head.weight is not model.get_input_embeddings().weight and fastpath._plain_head(model) is None


@contextlib.contextmanager
def _fused_on(*devices):
    fastpath.use_fused_kernels(devices)
    try:
        yield
    finally:
        fastpath.use_fused_kernels(())


def _fused_and_compiled(device: str, dtype, monkeypatch):
    """The packed-rows and chunked-loss checks with the fused kernels on `device`; every fused function compiled
    (none fell back)."""
    monkeypatch.setattr(fastpath, "_compiled", {})
    monkeypatch.setattr(fastpath, "LOSS_CHUNK", 16)
    monkeypatch.setattr(fastpath, "LOSS_CHUNK_CUDA", 16)
    monkeypatch.setattr(fastpath, "LOSS_WHOLE_BYTES", 0)
    ropes = []
    real_rope = fastpath._apply_rope
    monkeypatch.setattr(fastpath, "_apply_rope", lambda *a: ropes.append(a[0].shape) or real_rope(*a))
    with _fused_on(device):
        model = _tiny_lora(dtype).to(device)
        inputs = {k: v.to(device) for k, v in _packed_batch().items()}
        _assert_same(model, inputs, dtype, route="varlen" if device == "cuda" else "layout")
        assert fastpath._fuse_on == {device}  # nothing failed
    assert set(fastpath._compiled) == {fastpath._rms, fastpath._rms_grad, fastpath._swiglu, fastpath._swiglu_grad,
                                       fastpath._rope, fastpath._rope_grad, fastpath._nll_grad_fusable}
    assert len(ropes) == 2  # each layer's rotary embedding, through the fused one
    from transformers.models.llama import modeling_llama

    assert modeling_llama.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb"  # transformers' own again


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="inductor's CPU kernels need a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_learn_what_the_plain_step_learns(dtype, monkeypatch):
    """train.fused_kernels on the CPU (inductor's C++ kernels): RMSNorm, RoPE, SwiGLU and the loss's softmax
    compiled, forward and backward; the same loss and gradients as the plain step at the module's tolerances (fp32
    to 1e-5: only the order of sums differs)."""
    _fused_and_compiled("cpu", dtype, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's fused kernels (Triton)")
def test_cuda_fused_kernels_learn_what_the_plain_step_learns(monkeypatch):
    assert fastpath.fused_kernels_default(None, "cuda")  # Triton comes with CUDA's torch
    _fused_and_compiled("cuda", torch.bfloat16, monkeypatch)


def test_fused_kernels_fall_back_to_the_eager_step_with_a_warning(monkeypatch):
    """Where compiling fails (no C++ compiler, an old Triton), a warning names the error, the step's eager kernels
    compute the same values, and nothing is compiled again in this process."""
    def broken(function, **options):
        def run(*args):
            raise RuntimeError("backend compiler failed: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fastpath, "_compiled", {})
    model = _tiny_lora(torch.float32)
    eager, _ = fastpath.supervised_nll(model, _packed_batch())
    with _fused_on("cpu"), pytest.warns(UserWarning, match="fused kernels .torch.compile. failed: RuntimeError: "
                                                           "backend compiler failed: no working C"):
        loss, _ = fastpath.supervised_nll(model, _packed_batch())
        assert fastpath._fuse_on == frozenset()
    assert torch.equal(loss, eager)
    assert set(fastpath._compiled) == {fastpath._rms}  # the first one tried, and no other after it
    # The loss's fused form falls back to the eager one (one fp32 chunk at a time): the same values.
    logits, target = torch.randn(8, 50), torch.tensor([3, -100, 7, 0, 49, -100, 1, 2])
    with _fused_on("cpu"), pytest.warns(UserWarning, match="fused kernels .torch.compile. failed"):
        nll, grad = fastpath.fused(fastpath._nll_grad_fusable, logits, target, torch.float32,
                                   fallback=fastpath._nll_grad_of_logits)
    reference = torch.nn.functional.cross_entropy(logits.requires_grad_(), target, ignore_index=-100,
                                                  reduction="sum")
    reference.backward()
    torch.testing.assert_close(nll, reference.detach())
    torch.testing.assert_close(grad, logits.grad)
    assert [torch.allclose(a, b) for a, b in zip(fastpath._nll_grad_fusable(logits.detach(), target, torch.float32),
                                                 (nll, grad))] == [True, True]


def test_fused_kernels_default_to_cuda_with_triton_only():
    assert not fastpath.fused_kernels_default(None, "cpu")
    assert fastpath.fused_kernels_default(True, "cpu") and not fastpath.fused_kernels_default(False, "cuda")
