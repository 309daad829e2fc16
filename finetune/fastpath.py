"""The fast training step: what a causal-LM step computes that it does not need to, it skips.

Measured on SmolLM2-135M with LoRA on a 2-core AVX512-BF16 CPU (benchmarks/ and `finetune bench`), a step of TRL's
defaults spends its time on: LoRA dropout masks (random numbers for every LoRA input: ~27% of the step at 0.05;
our recipes use 0), attention over whole packed rows (the CPU flash kernel with a block-diagonal mask, ~35%),
the LM head in fp32 over every position, and fp32 copies of every LoRA input. This module removes the last three,
without changing what is computed for the tokens that are trained:

1. Logits only where the loss is taken: `supervised_nll` asks the model for logits at the positions whose next token
   is trained (transformers' `logits_to_keep`), in the model's dtype (past accelerate's conversion of outputs to
   fp32), and takes the cross-entropy in fp32 chunk by chunk with its gradient in the same pass, so no
   [tokens x vocabulary] fp32 tensor exists and nothing is recomputed. Where the head is a plain linear layer, its
   matmul moves into that loop too (the model returns the hidden states): no logits tensor is held at all.
2. Attention within each packed document: a packed row (padding-free SFT, pretraining) holds several documents whose
   position ids restart at 0. Short documents: `packed_sdpa` lays them out one per row, right-padded, and attends
   causally there: the cost is about the number of documents times the longest one's squared length, not the row's
   squared length; used where that is under a quarter of the rows' (long packed rows of short documents, as SFT
   packs them). Right padding under a causal mask leaves every real token's result exact. Long documents: one causal
   sdpa call each (`attend_documents`), where their triangles and the calls' fixed cost are under the rows' square.
   On CUDA, where the flash kernel takes the call (bf16/fp16, Ampere or later; torch's own check), every document of
   the batch in one call of its variable-length form (`attend_varlen`): no padding and one kernel a layer, whatever
   the documents' lengths; where it does not, the routes above. Otherwise, and for batches with an attention mask
   and models with soft-capping or sliding windows, transformers' own sdpa unchanged.
3. Lean blocks: Llama-family RMSNorms and SiLU MLPs keep their bf16 inputs for backward, not fp32 copies and silu's
   output (the same operations), and grouped key/value heads reach sdpa unrepeated where its kernel takes them.
4. LoRA in the base's dtype: a bf16 base with an fp32 adapter computes its LoRA matmuls under autocast (the adapter
   and its optimizer state stay fp32) instead of copying every input to fp32 for each LoRA layer; and the low-rank
   term is added in its matmul's epilogue, scaled there (`_lora_forward`), not as a [tokens x out] product, a scaled
   copy and a sum (on a CUDA 1B step these elementwise passes took ~8% of the GPU's kernel time).
3 and 4 stay in place for the whole training step (`step_modules`), so activation checkpointing recomputes the same
forward.
5. The preference and RL stages (DPO, KTO, GRPO, RLOO) keep TRL's step, whose fused LM head scores answers at the
   positions with a label only where Triton runs and at every position elsewhere: on the CPU too, only where the
   label is (`compact_head_trainer`; the README's item 6).
6. Fused kernels (`train.fused_kernels`; by default on CUDA where Triton is installed): the lean RMSNorm, the rotary
   embedding, SwiGLU and the chunked loss's softmax each compiled by torch.compile into one kernel each way (`fused`),
   instead of an eager kernel per operation; elsewhere, or where compiling fails, the same functions run eagerly.
7. LoRA's first matmul (`_LoRAIn`, part of 3): the A matmuls of LoRA layers that take the same input (q/k/v,
   gate/up) as one; and, on every device but the CPU, a LoRA input that is a lean norm's or SwiGLU's output
   recomputed in backward from what those keep anyway, instead of held from forward to backward.

tests/test_fastpath.py checks that the loss and every gradient match the plain path (TRL's), in fp32 and bf16, for
packed and padded batches; tests/test_stages.py the same for 5.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

# Rows of the [positions x vocabulary] logits turned to fp32 at a time in the loss (256 x 49,152 x 4 bytes: 48 MiB;
# 512 ran no faster on CPU and held twice the memory); on CUDA more at a time (larger matmuls; 384 MiB).
LOSS_CHUNK = 256
LOSS_CHUNK_CUDA = 2048
# Below this many bytes of fp32 logits the loss is taken in one piece on CUDA. On the CPU the chunked loss is faster
# at every size (its kept buffers, and the gradient taken in the forward instead of autograd's log-softmax backward
# over the whole logits: pretraining's step, vocabulary 8,192, 4,209 vs 3,169 tokens/s with its head in the chunked
# loss, interleaved, `benchmarks/ab_step.py --variants default,whole-logits`), so there nothing is taken whole.
LOSS_WHOLE_BYTES = 160 * 2**20
LOSS_WHOLE_BYTES_CPU = 0
# From this vocabulary size on, the head's matmul always moves into the chunked loss (a chunk of fp32 logits is
# 32 MiB or more): whole logits at the end of the forward, when everything kept for backward is held, set the step's
# peak memory (SmolLM2's 49,152: ~0.3 GB at 1,024 tokens a step); smaller vocabularies (pretraining's 8,192) keep
# whole logits below LOSS_WHOLE_BYTES (on CUDA).
HEAD_IN_LOSS_VOCAB = 32768
# Row widths and kept positions are rounded up to a multiple of this, so a run sees a few dozen matmul shapes, not a
# new one every step: the CPU's oneDNN kernels are built and cached per shape (a new shape costs its build, and the
# cache held ~1.5 GB more after 40 padding-free steps of varying width).
SHAPE_MULTIPLE = 64
# The same for the per-document attention's layout: documents, and the longest document's length.
LAYOUT_MULTIPLE = (4, 16)
# What one sdpa call costs beyond its work, in query x key positions: one causal call per document pays only where
# documents are long (on this project's CPU a 128-token call's backward takes about as long as 256 x 256 positions
# of a masked row; pretraining's 256-token rows of short stories attend faster as whole rows).
DOC_CALL_COST = 256**2


# ----------------------------------------------------------------------------- 1. logits only where trained


def supervised_nll(model, inputs: dict, num_items_in_batch=None, doc_attention: bool = True):
    """Summed next-token negative log-likelihood over positions with a label (not -100), divided by
    `num_items_in_batch` (the Trainer's count of labels in the whole accumulated batch) or by this batch's count.
    Returns (loss, number of trained positions)."""
    inputs = pad_to_multiple(inputs)
    labels = inputs["labels"]
    targets = labels[:, 1:]
    trained = targets != -100
    keep = trained.any(0).nonzero()[:, 0]  # positions (of the input) whose next token some row trains
    kept = keep.numel()
    # Rounded up with position 0, its target set to -100 below (where nothing is trained: a differentiable zero).
    keep = torch.cat([keep, keep.new_zeros(-kept % SHAPE_MULTIPLE if kept else SHAPE_MULTIPLE)])
    forward = {k: v for k, v in inputs.items() if k != "labels" and not k.startswith(("cu_seq_lens", "max_length"))}
    forward.pop("seq_idx", None)
    if doc_attention and "attention_mask" not in forward and "position_ids" in forward:
        lengths = doc_lengths(forward["position_ids"])
        documents, longest = lengths.numel(), int(lengths.max())
        batch, length = forward["position_ids"].shape
        if 4 * documents * longest**2 <= batch * length**2:  # pays only where documents are short next to rows
            forward.update(doc_layout(forward["position_ids"]))
        elif documents > batch and (lengths.double() ** 2).sum() / 2 + documents * DOC_CALL_COST < batch * length**2:
            forward["doc_lengths"] = lengths.tolist()  # long documents: one causal call each, no masked blocks
        if documents > batch and forward["position_ids"].is_cuda:  # all in one varlen flash call, where it runs
            forward.update(doc_cu=F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)), doc_max=longest)
    picked = targets[:, keep]
    picked[:, kept:] = -100
    head = _plain_head(model)
    if head is not None and head_in_loss(head.out_features, picked.numel(), labels.device.type):
        # The head's matmul moves into the loss: chunk by chunk, so not even the logits are held whole; and only at
        # the (row, position) places that are trained (`keep` is every row's positions that some row trains).
        with lean_blocks(model), _head_skipped(head):
            hidden = model(**forward, use_cache=False, logits_to_keep=keep).logits  # [batch, kept, hidden]
        hidden, picked = _trained_rows(hidden.reshape(-1, hidden.shape[-1]), picked.reshape(-1))
        if torch.is_grad_enabled() and hidden.requires_grad:
            nll = _ChunkedNLL.apply(hidden, picked, head.weight)
        else:  # evaluation: the same chunks, no gradient
            nll = _head_nll(hidden, picked, head)
    else:
        with lean_blocks(model):
            logits = model(**forward, use_cache=False, logits_to_keep=keep).logits  # [batch, kept, vocab]
        nll = _chunked_nll(logits.reshape(-1, logits.shape[-1]), picked.reshape(-1))
    count = trained.sum()
    divisor = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return nll / divisor, count


def pad_to_multiple(inputs: dict, multiple: int = SHAPE_MULTIPLE) -> dict:
    """A batch widened to a multiple of `multiple` tokens: the new positions come after every real token (which,
    under the causal mask, never attends to them), are untrained (-100), masked out where there is an attention
    mask, and form documents of their own, no longer than the longest real one, where position ids mark documents.
    Batches with other per-token inputs are left as they are."""
    width = inputs["input_ids"].shape[1]
    pad = -width % multiple
    dropped = ("cu_seq_lens", "max_length", "seq_idx")  # not passed to the model (supervised_nll)
    known = {"input_ids", "labels", "attention_mask", "position_ids"}
    if not pad or any(k not in known and not k.startswith(dropped) for k in inputs):
        return inputs
    out = {"input_ids": F.pad(inputs["input_ids"], (0, pad), value=0),
           "labels": F.pad(inputs["labels"], (0, pad), value=-100)}
    if "attention_mask" in inputs:
        out["attention_mask"] = F.pad(inputs["attention_mask"], (0, pad), value=0)
    if "position_ids" in inputs:
        positions = inputs["position_ids"]  # padding: documents no longer than the longest real one
        more = (torch.arange(pad, device=positions.device) % (int(positions.max()) + 1)).expand(positions.shape[0], pad)
        out["position_ids"] = torch.cat([positions, more], dim=1)
    return out


def trainer_loss(trainer, model, inputs: dict, num_items_in_batch=None):
    """`supervised_nll` as a Trainer's compute_loss returns it: with `num_items_in_batch` counting every rank's labels,
    scaled by the number of processes, since DDP averages the gradients (as Trainer.compute_loss does)."""
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(trainer.accelerator.mixed_precision))
    with outputs_in_model_dtype(model, mixed, trainer.accelerator.autocast):
        loss, _ = supervised_nll(model, inputs, num_items_in_batch)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    return loss


@contextlib.contextmanager
def outputs_in_model_dtype(model, mixed_precision: torch.dtype | None, autocast=None):
    """Under mixed precision, accelerate wraps the model's forward to autocast it and to convert every bf16/fp16
    output to fp32: the logits too, a [positions x vocabulary] fp32 copy (and so an fp32 gradient of that size) that
    the chunked loss does not need. Here the forward is the model's own (where it is accelerate's wrapper and
    nothing else), under accelerate's autocast, which then covers the loss around it too: the head's matmul in the
    chunked loss runs in the dtype the model's head would have run in (pretraining's fp32 weights: bf16, not fp32,
    ~8x slower on a CPU). Where the fast step already autocasts to accelerate's dtype (`lora_autocast`), that autocast
    is the one. `autocast`: a function returning accelerate's autocast context (`Accelerator.autocast`, with its
    handler's settings); torch's autocast to `mixed_precision` without it. The model inside a DDP wrapper is the one
    whose forward is swapped, so DDP still runs."""
    from accelerate.utils.operations import ConvertOutputsToFp32

    inner = getattr(model, "module", model)
    original = inner.__dict__.get("_original_forward")
    wrapped = inner.__dict__.get("forward")
    converts = isinstance(getattr(getattr(wrapped, "__func__", wrapped), "__wrapped__", None), ConvertOutputsToFp32)
    device = next(inner.parameters()).device.type
    autocasting = torch.is_autocast_enabled(device)
    if original is None or not converts or mixed_precision is None \
            or autocasting and torch.get_autocast_dtype(device) != mixed_precision:
        yield
        return
    inner.forward = original
    try:
        if autocasting:
            context = contextlib.nullcontext()
        else:
            context = autocast() if autocast is not None else torch.autocast(device, dtype=mixed_precision)
        with context:
            yield
    finally:
        inner.forward = wrapped


def head_in_loss(vocab: int, positions: float, device_type: str) -> bool:
    """Whether a plain head's matmul moves into the chunked loss: a large vocabulary, or logits too large to take
    whole on this device."""
    return vocab >= HEAD_IN_LOSS_VOCAB or positions * vocab * 4 > _whole_bytes(device_type)


def _whole_bytes(device_type: str) -> int:
    """Up to how many bytes of fp32 logits the loss takes them in one piece on this device."""
    return LOSS_WHOLE_BYTES_CPU if device_type == "cpu" else LOSS_WHOLE_BYTES


def _trained_rows(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `x` whose target is trained (not -100), with their targets; their count rounded up to a multiple
    of SHAPE_MULTIPLE with row 0, untrained (a few matmul shapes a run)."""
    index = (targets != -100).nonzero()[:, 0]
    count = index.numel()
    index = F.pad(index, (0, -count % SHAPE_MULTIPLE if count else SHAPE_MULTIPLE))
    picked = targets[index]
    picked[count:] = -100
    return x[index], picked


def _head_nll(x: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    """Without gradients (evaluation): the summed cross-entropy of `head(x)`, a chunk of rows at a time in fp32."""
    chunk = LOSS_CHUNK_CUDA if x.is_cuda else LOSS_CHUNK
    total = x.new_zeros((), dtype=torch.float32)
    for i in range(0, x.shape[0], chunk):
        target = targets[i : i + chunk]
        logprobs = _log_softmax32(head(x[i : i + chunk].to(head.weight.dtype)))
        total -= torch.where(target != -100, logprobs.gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0).sum()
        del logprobs
    return total


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def _chunked_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Chunk by chunk in fp32, with the gradient taken in the same pass (`_ChunkedNLL`): no [positions x vocabulary]
    fp32 tensor. On CUDA, logits that are small in fp32 (a small vocabulary: pretraining's) are taken whole."""
    if logits.numel() * 4 <= _whole_bytes(logits.device.type):
        return _nll_sum(logits, targets)
    if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation
        return sum(_nll_sum(logits[i : i + LOSS_CHUNK], targets[i : i + LOSS_CHUNK])
                   for i in range(0, logits.shape[0], LOSS_CHUNK))
    return _ChunkedNLL.apply(logits, targets)


class _ChunkedNLL(torch.autograd.Function):
    """Summed cross-entropy whose gradient (softmax - one-hot, zero where the target is -100) is computed chunk by
    chunk in the forward, in fp32, and kept in the logits' dtype: the logits are not kept, nothing is recomputed, and
    the backward is one multiplication (a checkpoint per chunk instead computed each chunk's softmax twice and built
    a full-size zero gradient for every chunk). The graph can be run backward once.

    With the head's `weight`, `x` is the hidden states and each chunk's logits are computed here (as the head
    computes them: its matmul, under the autocast in force), so no [positions x vocabulary] tensor exists at all;
    what is kept is the gradient of the hidden states (and of the weight, where it is trained: pretraining)."""

    @staticmethod
    def forward(ctx, x, targets, weight=None):
        device = x.device.type
        ctx.weight_dtype = None if weight is None else weight.dtype
        stored = weight
        if weight is not None and torch.is_autocast_enabled(device):
            weight = weight.to(torch.get_autocast_dtype(device))
        dtype = x.dtype if weight is None else weight.dtype  # the logits'
        # fp16 would flush small probabilities to zero before the loss scale reaches them: kept in fp32 then.
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        if weight is not None:  # the head's weight for its backward, in the gradient's dtype: cast once, not per chunk
            weight_back = stored if stored.dtype == grad_dtype else weight.to(grad_dtype)
        ctx.dtype = x.dtype
        grad_x = torch.empty_like(x, dtype=grad_dtype)
        trains_weight = weight is not None and ctx.needs_input_grad[2]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if trains_weight else None
        chunk = LOSS_CHUNK_CUDA if x.is_cuda else LOSS_CHUNK
        total = x.new_zeros((), dtype=torch.float32)
        for i in range(0, x.shape[0], chunk):
            rows = x[i : i + chunk]
            if weight is None:
                logits = rows
            else:
                kept = _kept_buffer("logits", (rows.shape[0], weight.shape[0]), dtype, x.device)
                logits = F.linear(rows.to(dtype), weight) if kept is None else torch.mm(rows.to(dtype), weight.t(),
                                                                                        out=kept)
            if fuses(logits):  # one pass over the logits for the statistics, one for the gradient
                nll, grad = fused(_nll_grad_fusable, logits, targets[i : i + chunk], grad_dtype,
                                  fallback=_nll_grad_of_logits)
                del logits
            else:
                logprobs = _log_softmax32(logits)
                del logits
                nll, grad = _nll_grad(logprobs, targets[i : i + chunk], grad_dtype)
                del logprobs
            total += nll
            if weight is None:
                grad_x[i : i + chunk] = grad
                continue
            with torch.autocast(device, enabled=False):  # in the gradient's dtype (fp16 logits: fp32)
                torch.mm(grad, weight_back, out=grad_x[i : i + chunk])  # the head's backward, as linear's
                if trains_weight:
                    _add_weight_grad(grad_w, grad, rows.to(grad_dtype))
        ctx.grads = (grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fast step's loss can be differentiated once (no retain_graph)")
        grad_x, grad_w = grads
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_output).to(ctx.weight_dtype)
        return grad_x.mul_(grad_output).to(ctx.dtype), None, grad_w


def _add_weight_grad(grad_w: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
    """grad_w (fp32) += grad^T @ rows, one chunk's part of a trained head's weight gradient. A bf16/fp16 product is
    rounded once and summed in fp32; on the CPU it goes through kept buffers of the weight's shape (pretraining's
    8,192 x 256: 12 MiB; a fresh fp32 copy of each chunk's part page-faulted, 151 ms of a ~1.2 s step)."""
    if grad.dtype == torch.float32:
        grad_w.addmm_(grad.T, rows)
        return
    part = _kept_buffer("weight_grad", grad_w.shape, grad.dtype, grad.device, pad=False)
    if part is None:
        grad_w += (grad.T @ rows).float()
        return
    torch.mm(grad.T, rows, out=part)
    grad_w += _kept_buffer("weight_grad32", grad_w.shape, torch.float32, grad.device, pad=False).copy_(part)


def _nll_grad(logprobs, target, grad_dtype: torch.dtype):
    """A chunk's summed negative log-likelihood (fp32) and its gradient (softmax - one-hot; zero where the target is
    -100) in `grad_dtype`, from its fp32 log-probabilities, which become the softmax in place: one [rows x
    vocabulary] fp32 tensor at a time. On the CPU the gradient is a kept buffer (`_kept_buffer`), valid until the
    next chunk: the log-probabilities' own for an fp32 gradient, the logits' for a narrower one."""
    trained = target != -100
    target = target.clamp(min=0)[:, None]
    nll = -torch.where(trained, logprobs.gather(1, target)[:, 0], 0.0).sum()
    probs = logprobs.exp_()
    probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
    probs.masked_fill_(~trained[:, None], 0.0)
    kept = _kept_buffer("logits", probs.shape, grad_dtype, probs.device) if grad_dtype != probs.dtype else None
    return nll, probs.to(grad_dtype) if kept is None else kept.copy_(probs)


def _nll_grad_of_logits(logits, target, grad_dtype: torch.dtype):
    return _nll_grad(_log_softmax32(logits), target, grad_dtype)


def _log_softmax32(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary of a chunk of logits; on the CPU into a kept buffer (valid until the next
    chunk), unless autograd records through it."""
    grad = torch.is_grad_enabled() and logits.requires_grad  # (a graph through the buffer: not kept then)
    kept = None if grad else _kept_buffer("logprobs", logits.shape, torch.float32, logits.device)
    if kept is None:
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    kept.copy_(logits)
    return torch.log_softmax(kept, dim=-1, out=kept)


_kept: dict = {}  # the loss's CPU buffers, by use (`_kept_buffer`)


def release_kept_buffers() -> None:
    """Frees the chunked loss's kept CPU buffers (~72 MiB for SmolLM2's vocabulary; where the head trains, two more
    of its weight's shape): at the end of a training run."""
    _kept.clear()


def _kept_buffer(use: str, shape, dtype: torch.dtype, device: torch.device, pad: bool = True) -> torch.Tensor | None:
    """On the CPU, a buffer of `shape` for one use of the chunked loss (the chunk's logits, then its gradient;
    its fp32 log-probabilities; a trained head's weight-gradient parts), kept between chunks and steps until a
    training run ends (`release_kept_buffers`; one loss at a time per process); None elsewhere (CUDA's caching
    allocator reuses its blocks already). A chunk's buffer has at least LOSS_CHUNK rows (`pad`), so a short last
    chunk reuses it. glibc hands a fresh 48 MiB fp32 chunk (SmolLM2's 256 x 49,152) back to the system when freed and
    the next one page-faults in again: on this project's CPU the step's fp32 copy and log-softmax of each chunk
    took 67 and 66 ms in the step against 2 and 11 ms into a buffer in use (json_extract's LoRA step 4% and 13%
    faster with these buffers in two interleaved A/Bs, the same losses)."""
    if device.type != "cpu":
        return None
    rows, cols = shape
    buffer = _kept.get(use)
    if buffer is None or buffer.dtype != dtype or buffer.shape[1] != cols or buffer.shape[0] < rows:
        buffer = _kept[use] = torch.empty(max(rows, LOSS_CHUNK) if pad else rows, cols, dtype=dtype)
    return buffer[:rows]


def _nll_grad_fusable(logits, target, grad_dtype: torch.dtype):
    """`_nll_grad` with the one-hot as a comparison, not a scatter: compiled, the gradient is one elementwise pass
    after the softmax's statistics, and no fp32 tensor of the chunk's size is written."""
    trained = target != -100
    target = target.clamp(min=0)[:, None]
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    nll = -torch.where(trained, logprobs.gather(1, target)[:, 0], 0.0).sum()
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    grad = torch.where(trained[:, None], logprobs.exp() - (vocab == target).to(torch.float32), 0.0)
    return nll, grad.to(grad_dtype)


def _plain_head(model):
    """The causal LM's output layer where the fast loss can take over its matmul: a plain linear layer without bias
    (not adapted by LoRA, not a peft wrapper) whose weight is whole here and whose forward is its own, with no hook
    around it (FSDP and ZeRO-3 gather sharded weights in hooks; accelerate's device maps wrap the forward). None
    otherwise."""
    inner = getattr(model, "module", model)
    try:
        head = inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    plain = type(head) is torch.nn.Linear and head.bias is None and "forward" not in head.__dict__ \
        and not (head._forward_hooks or head._forward_pre_hooks)
    # A trained head outside the forward's graph would reach DDP's reducer after it marked the weight unused; tied to
    # the embeddings, the weight is in the graph through them.
    tied = head.weight is getattr(inner.get_input_embeddings(), "weight", None)
    whole = type(head.weight) is torch.nn.Parameter and head.weight.numel() > 0
    return head if plain and whole and (tied or not head.weight.requires_grad) else None


@contextlib.contextmanager
def _head_skipped(head):
    """The model's forward returns, as its "logits", the hidden states the head would read."""
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        del head.forward


# ----------------------------------------------------------------------------- 2. attention within documents


def doc_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """The lengths of the documents of packed rows, in the order of the flattened [batch x length] tokens: a document
    starts where its position id is 0, or at a row's start."""
    batch, length = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    starts[::length] = True
    first = starts.nonzero()[:, 0]
    return torch.diff(first, append=first.new_tensor([batch * length]))


def doc_layout(position_ids: torch.Tensor) -> dict:
    """The documents of packed rows (each starts where its position id is 0, or at a row's start), as an index into
    the flattened [batch x length] tokens: `doc_index` [documents, longest] (padding repeats the first token; both
    dimensions rounded up, LAYOUT_MULTIPLE) and `doc_valid`, the places of real tokens in [documents x longest], in
    token order."""
    lengths = doc_lengths(position_ids)
    first = torch.cumsum(lengths, 0) - lengths
    # Rounded up (empty documents, padding columns) to a few shapes a run, as the rows are (SHAPE_MULTIPLE).
    lengths = F.pad(lengths, (0, -lengths.numel() % LAYOUT_MULTIPLE[0]))
    longest = -(-int(lengths.max()) // LAYOUT_MULTIPLE[1]) * LAYOUT_MULTIPLE[1]
    offsets = torch.arange(longest, device=position_ids.device)
    valid = offsets[None, :] < lengths[:, None]
    index = torch.where(valid, F.pad(first, (0, lengths.numel() - first.numel()))[:, None] + offsets[None, :], 0)
    # The valid places as integer positions, found once a step: indexing with the mask in every layer would find
    # them again there, each time a host-device synchronisation on a GPU.
    return {"doc_index": index, "doc_valid": valid.reshape(-1).nonzero()[:, 0]}


class _ToDocs(torch.autograd.Function):
    """[heads, tokens, dim] -> [documents, heads, longest, dim]. Padding repeats token 0; it only ever attends to
    or is attended by padding (right of every real token under the causal mask), so its gradient is zero and the
    backward is the inverse gather of the real positions (`valid`: their places in [documents x longest])."""

    @staticmethod
    def forward(ctx, x, index, valid):
        ctx.save_for_backward(valid)
        return x[:, index].transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (valid,) = ctx.saved_tensors
        return grad.transpose(0, 1).flatten(1, 2)[:, valid], None, None


class _FromDocs(torch.autograd.Function):
    """[documents, heads, longest, dim] -> [tokens, heads, dim]: the real positions, in token order."""

    @staticmethod
    def forward(ctx, x, index, valid):
        ctx.save_for_backward(valid)
        ctx.shape = x.shape
        return x.transpose(1, 2).flatten(0, 1)[valid]

    @staticmethod
    def backward(ctx, grad):
        (valid,) = ctx.saved_tensors
        documents, heads, longest, dim = ctx.shape
        out = grad.new_zeros(documents * longest, heads, dim).index_copy_(0, valid, grad)
        return out.reshape(documents, longest, heads, dim).transpose(1, 2), None, None


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, except for packed rows (`doc_index` given by `supervised_nll`): there each
    document attends only to itself. query [batch, heads, tokens, dim] -> [batch, tokens, heads, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    index, valid = kwargs.pop("doc_index", None), kwargs.pop("doc_valid", None)
    lengths = kwargs.pop("doc_lengths", None)
    cu, longest = kwargs.pop("doc_cu", None), kwargs.pop("doc_max", None)
    plain = kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None \
        or query.shape[2] != key.shape[2] or value.shape[-1] != query.shape[-1]
    p_drop = dropout if module.training else 0.0
    if cu is not None and not plain and _varlen_runs and _cuda_flash_takes(query, key, value, p_drop):
        try:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return attend_varlen(query, key, value, cu, longest, scale, p_drop), None
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a torch whose kernel refuses the call: the routes below from now on
            _varlen_failed(e)
    # Where the flash kernel does not take the call (fp32, GPUs before Ampere, CPU): the route the step chose.
    if (index is None and lengths is None) or plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, tokens, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    if lengths is not None:
        return attend_documents(query, key, value, lengths, scale, p_drop), None
    q, k, v = (_ToDocs.apply(t.transpose(0, 1).reshape(t.shape[1], batch * tokens, dim), index, valid)
               for t in (query, key, value))
    if q.is_cuda:  # flash/memory-efficient kernels; exact for right-padded documents under is_causal
        k, v, gqa = _grouped(q, k, v, p_drop)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, scale=scale, is_causal=True, **gqa)
    else:  # the CPU flash kernel's backward is slow at these sizes; bf16 matmuls with an fp32 softmax are not
        # The query heads that share a key/value head are stacked along the positions ([documents, kv heads,
        # group x longest, dim]): one matmul per key/value head, with no repeated keys and values (nor their
        # gradients summed back). The scale goes on q (head-size values a row, not `longest`) and the mask in place;
        # torch's CPU softmax of bf16 computes in fp32 and keeps only its bf16 output for a one-pass backward (the
        # same values as an fp32 softmax rounded to bf16; 7x faster than that backward written in fp32 ops).
        documents, longest, kv_heads = q.shape[0], q.shape[2], k.shape[1]
        group = heads // kv_heads
        future = torch.ones(longest, longest, dtype=torch.bool, device=q.device).triu(1).repeat(group, 1)
        stacked = (q * scale).reshape(documents, kv_heads, group * longest, dim)
        scores = torch.matmul(stacked, k.transpose(-1, -2)).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(F.dropout(probs, p_drop), v).view(documents, heads, longest, dim)
    return _FromDocs.apply(out, index, valid).reshape(batch, tokens, heads, dim), None


def attend_documents(query, key, value, lengths: list[int], scale: float, p_drop: float = 0.0) -> torch.Tensor:
    """Causal attention within each document of packed rows, one sdpa call per document (exact: a document's
    tokens see only its earlier tokens). On CPU, sdpa's flash kernel over a whole row with a block-diagonal mask
    computes every block of the row's square; per document, only each document's causal triangle (~2.4x less time
    on bench_chat's 2,048-token rows of 50-940-token documents). query [batch, heads, tokens, dim] ->
    [batch, tokens, heads, dim]."""
    batch, heads, tokens, dim = query.shape
    key, value, gqa = _grouped(query, key, value, p_drop)
    if batch > 1:  # one row of every token (a document ends where its row does, as in transformers' own mask)
        query, key, value = (t.transpose(0, 1).reshape(1, t.shape[1], batch * tokens, dim)
                             for t in (query, key, value))
    parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, scale=scale, is_causal=True, **gqa)
                     for q, k, v in parts], dim=2)  # [1 or batch, heads, tokens, dim]
    if batch > 1:
        return out.reshape(heads, batch, tokens, dim).permute(1, 2, 0, 3)
    return out.transpose(1, 2)


_varlen_runs = True


def _varlen_failed(error: Exception) -> None:
    global _varlen_runs
    import warnings

    _varlen_runs = False
    warnings.warn(f"the CUDA flash kernel's variable-length form failed ({str(error).splitlines()[0][:200]}); "
                  "packed documents are attended as on GPUs it does not run on", stacklevel=3)


def attend_varlen(query, key, value, cu: torch.Tensor, longest: int, scale: float, p_drop: float = 0.0):
    """Causal attention within each document of packed rows in one call of the CUDA flash kernel's variable-length
    form (`cu`: the documents' cumulative lengths over the flattened [batch x tokens] tokens, int32; `longest`: the
    longest document): no padding, no per-document calls, grouped key/value heads as they are. The kernel's own
    backward (autograd's formula for it). query [batch, heads, tokens, dim] -> [batch, tokens, heads, dim]."""
    batch, heads, tokens, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim) for t in (query, key, value))
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, p_drop, True, False,
                                                  scale=scale)[0]
    return out.reshape(batch, tokens, heads, dim)


def _grouped(query, key, value, p_drop: float = 0.0):
    """Grouped key/value heads for sdpa: passed as they are (`enable_gqa`) where the kernel takes them (the CPU's
    flash kernel; on CUDA the flash kernel, where torch says it can run this causal call: its GPU, dtype and head
    size), which keeps a third (SmolLM2) of the repeated copies out of what backward holds; otherwise repeated
    (transformers' repeat_kv), since sdpa's other CUDA kernels would take grouped heads in its slow math kernel."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value, {}
    if not query.is_cuda or _cuda_flash_takes(query, key, value, p_drop):
        return key, value, {"enable_gqa": True}
    return repeat_kv(key, groups), repeat_kv(value, groups), {}


def _cuda_flash_takes(query, key, value, p_drop: float) -> bool:
    """Whether sdpa's CUDA flash kernel runs a causal call on grouped heads (torch's own check of the GPU, dtypes,
    shapes and settings; where that check is missing, the flag and the kernel's dtypes and head sizes)."""
    if not torch.backends.cuda.flash_sdp_enabled():
        return False
    static = query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256
    if torch.compiler.is_compiling():  # torch's check is not traceable: the static one, no graph break
        return static
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, None, p_drop, True, True)
        return bool(torch.backends.cuda.can_use_flash_attention(params, False))
    except (AttributeError, TypeError, RuntimeError):  # a torch without the check, or without enable_gqa in it
        return static


_installed = False


def install_attention() -> None:
    """Route transformers' "sdpa" through `packed_sdpa` (identical unless a forward passes `doc_index`)."""
    global _installed
    if not _installed:
        from transformers import AttentionInterface

        AttentionInterface.register("sdpa", packed_sdpa)
        _installed = True


# ----------------------------------------------------------------------------- 3. lean blocks


class _RMSNorm(torch.autograd.Function):
    """transformers' Llama-family RMSNorm (fp32 statistics, the weight applied in the input's dtype), keeping for
    backward its input in that dtype and the per-token inverse RMS, instead of the fp32 copy of its input. Forward
    and backward are the same operations as autograd's on the module's own forward, in the same order (`_rms` and
    `_rms_grad`; fused, section 6)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        out, rstd = fused(_rms, x.reshape(-1, shape[-1]), weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return out.view(shape), rstd  # rstd: for a LoRA layer that recomputes this output (`_LoRAIn`)

    @staticmethod
    def backward(ctx, grad, _):
        x, rstd, weight = ctx.saved_tensors
        shape = x.shape
        grad_x, grad_weight = fused(_rms_grad, grad.reshape(-1, shape[-1]), x.reshape(-1, shape[-1]), rstd, weight,
                                    ctx.needs_input_grad[1])
        return grad_x.view(shape), grad_weight, None


def _rms(x, weight, eps: float):
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _rms_out(x, rstd, weight):
    """`_rms`'s output again, from its input and saved inverse RMS: the same operations, the same values."""
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


def _rms_grad(grad, x, rstd, weight, weight_grad: bool):
    x32 = x.to(torch.float32)
    grad_weight = None
    if weight_grad:
        grad_weight = (grad * (x32 * rstd).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
    g = (grad * weight).to(x.dtype).to(torch.float32)  # through `weight * h.to(dtype)`
    g_rstd = (g * x32).sum(-1, keepdim=True)
    g_var = -0.5 * g_rstd * rstd.pow(3)  # rsqrt's derivative, as autograd writes it
    g_x = g * rstd + g_var.expand_as(x32) / x32.shape[-1] * (2.0 * x32)  # mean's, then pow's
    return g_x.to(x.dtype), grad_weight


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward (silu recomputed there) instead of also silu's output:
    the same operations as autograd's, a third less of the MLP's activations held (fused, section 6)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        shape = gate.shape
        return fused(_swiglu, gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])).view(shape)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        shape = gate.shape
        grad_gate, grad_up = fused(_swiglu_grad, *(t.reshape(-1, shape[-1]) for t in (grad, gate, up)))
        return grad_gate.view(shape), grad_up.view(shape)


def _swiglu(gate, up):
    return F.silu(gate) * up


def _swiglu_grad(grad, gate, up):
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class _RoPE(torch.autograd.Function):
    """transformers' `apply_rotary_pos_emb` (q x cos + rotate_half(q) x sin, and k's) with its transpose as the
    backward: dq = g x cos - rotate_half(g x sin). Used where its kernels are fused (section 6): there one kernel each
    way for q and for k, not the slices, negation, concatenation, products and sum of each, and their backward."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return fused(_rope, q, k, cos, sin, unsqueeze_dim)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return *fused(_rope_grad, grad_q, grad_k, cos, sin, ctx.unsqueeze_dim), None, None, None


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q, k, cos, sin, unsqueeze_dim: int):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_grad(grad_q, grad_k, cos, sin, unsqueeze_dim: int):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return grad_q * cos - _rotate_half(grad_q * sin), grad_k * cos - _rotate_half(grad_k * sin)


def _apply_rope(q, k, cos, sin, unsqueeze_dim=1):
    return _RoPE.apply(q, k, cos, sin, unsqueeze_dim)


def _rmsnorm_forward(self, hidden_states):
    out, rstd = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    if hidden_states.requires_grad and _recomputes(out):  # (recomputed from what the norm keeps: nothing otherwise)
        out._finetune_recompute = (_rms_out, (hidden_states.reshape(-1, hidden_states.shape[-1]), rstd, self.weight),
                                   out._version)
    return out


def _swiglu_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    out = _SwiGLU.apply(gate, up)
    if out.requires_grad and _recomputes(out):
        out._finetune_recompute = (_swiglu, (gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])),
                                   out._version)
    return self.down_proj(out)


def _lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward for one plain adapter (no dropout, bias or variant such as DoRA): the base layer's
    output plus scaling x B(A(x)), the low-rank product and its sum taken in one matmul whose epilogue adds the base's
    output (torch.addmm, alpha = scaling), instead of a [tokens x out] product, a scaled copy and a sum, forward and
    backward (the scaling then multiplies [tokens x rank] gradients). The same sum, rounded once. Anything else (an
    adapter switched off or merged, mixed dtypes without autocast, extra arguments): peft's own forward."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = self.__dict__.get("_finetune_plain_lora")  # found once per `lean_blocks` entry
    if args or kwargs or name not in (plain if plain is not None else _plain_lora_names(self)):
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    autocast = torch.is_autocast_enabled(x.device.type)
    if getattr(self, "cast_input_dtype_enabled", True) and x.dtype != a.dtype \
            or not autocast and not x.dtype == a.dtype == b.dtype:
        return type(self).forward(self, x)  # peft casts the input, or the dtypes would not meet in one matmul
    result = self.base_layer(x)
    if not autocast and result.dtype != x.dtype:  # a quantized base computing in another dtype (not the fast step's)
        return type(self).forward(self, x)
    h = _lora_in(self, name, x, autocast)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape).to(result.dtype)  # as peft returns it (autocast may compute in another dtype)


class _LoRAIn(torch.autograd.Function):
    """LoRA's first matmul for one or more adapters that take the same input x [tokens x in]: x @ [A1; A2; ...]^T in
    one matmul, split into each adapter's [tokens x rank] (Llama's q, k and v projections share their input, as do
    gate and up: one matmul instead of three or two, forward and backward, and one gradient for x instead of a sum).
    For backward it keeps x, or, where x is a lean norm's or SwiGLU's output and the device recomputes them
    (`_recomputes`), only what those functions keep already (the norm's input and inverse RMS; gate and up): x is
    computed again in backward (one kernel where kernels are fused, section 6) instead of being held from forward
    to backward."""

    @staticmethod
    def forward(ctx, x, recompute, ranks, dtype, *tensors):
        weights, sources = tensors[:len(ranks)], tensors[len(ranks):]
        ctx.recompute, ctx.ranks, ctx.dtype = recompute, ranks, dtype
        ctx.save_for_backward(*weights, *(sources if recompute else (x,)))
        with torch.autocast(x.device.type, enabled=False):
            return tuple((x @ _stacked(weights, dtype).t()).split(ranks, dim=1))

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        weights, rest = saved[:len(ctx.ranks)], saved[len(ctx.ranks):]
        x = fused(ctx.recompute, *rest) if ctx.recompute else rest[0]
        grad = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
        grad_x = grad @ _stacked(weights, ctx.dtype) if ctx.needs_input_grad[0] else None
        grad_weights = (grad.t() @ x).split(ctx.ranks, dim=0)
        return (grad_x, None, None, None, *(g.to(w.dtype) for g, w in zip(grad_weights, weights)),
                *(None for _ in rest if ctx.recompute))


def _stacked(weights, dtype: torch.dtype) -> torch.Tensor:
    """[A1; A2; ...] in the matmul's dtype."""
    return torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype)


def _recomputes(x: torch.Tensor) -> bool:
    """Whether LoRA layers taking x (a lean norm's or SwiGLU's output) recompute it in backward instead of keeping it:
    while gradients are recorded, on devices other than the CPU (there the elementwise work is a larger share of the
    step than memory is of the machine; `_keep_lora_inputs_on`)."""
    return torch.is_grad_enabled() and x.device.type not in _keep_lora_inputs_on


_keep_lora_inputs_on: frozenset = frozenset({"cpu"})


def recomputes_lora_inputs(model, device_type: str) -> bool:
    """Whether the fast step's LoRA layers recompute their inputs in backward on this device type (for the memory
    estimate): a LoRA model whose LoRA layers `_lora_forward` computes (`_plain_lora_names`: no dropout, no DoRA),
    none over an 8-bit base (bitsandbytes' 8-bit matmul keeps its input itself), with Llama-family lean norms."""
    if device_type in _keep_lora_inputs_on:
        return False
    modules = list(getattr(model, "module", model).modules())
    layers = [m for m in modules if "lora_A" in m._modules]
    return bool(layers) and all(_plain_lora_names(m) and type(getattr(m, "base_layer", None)).__name__
                                != "Linear8bitLt" for m in layers) \
        and any(_module_kind(m) == "rms" for m in modules)


class _SharedInput:
    """peft LoRA layers of one module that take the same input (`lean_blocks` groups Llama's q/k/v and gate/up): the
    first of them to run computes the A matmul of all (`_LoRAIn`); the others take their part."""

    def __init__(self, layers: list, names: list):
        self.layers, self.names, self.x, self.version, self.parts = layers, names, None, None, {}

    def take(self, layer, x: torch.Tensor, recompute, dtype):
        if self.x is not x or self.version != x._version or layer not in self.parts:
            weights = [m.lora_A[n].weight for m, n in zip(self.layers, self.names)]
            parts = _LoRAIn.apply(x.reshape(-1, x.shape[-1]), recompute and recompute[0], [w.shape[0] for w in weights],
                                  dtype, *weights, *(recompute[1] if recompute else ()))
            self.x, self.version, self.parts = x, x._version, dict(zip(self.layers, parts))
        part = self.parts.pop(layer)
        if not self.parts:
            self.x = None
        return part


def _lora_in(layer, name: str, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """x @ A^T for `_lora_forward`: through the layer's `_SharedInput` where `lean_blocks` grouped it, or recomputing
    x in backward where x says how (`_LoRAIn`; not where x was written to in place after its tag); otherwise
    F.linear."""
    a = layer.lora_A[name].weight
    if x.is_inference():  # (no version counter: nothing to share or recompute)
        return F.linear(x, a)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
    recompute = x.__dict__.get("_finetune_recompute") if _recomputes(x) else None
    if recompute is not None and recompute[2] != x._version:  # written to in place since: kept as it is now
        recompute = None
    group = layer.__dict__.get("_finetune_group")
    if group is not None and group.names[group.layers.index(layer)] != name:  # another adapter active since entry
        group = None
    if x.dtype != dtype or group is None and recompute is None:
        return F.linear(x, a)
    if group is not None:
        return group.take(layer, x, recompute, dtype)
    return _LoRAIn.apply(x.reshape(-1, x.shape[-1]), recompute[0], [a.shape[0]], dtype, a, *recompute[1])[0]


# Sibling LoRA layers that a Llama-family block feeds the same input: each group's A matmuls run as one.
_SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _shared_inputs(module) -> list:
    """The groups of `_SHARED_INPUT` among this module's children (two or more of each's names): LoRA layers whose
    forward is `_lora_forward`, each with one active adapter that it computes plainly, A's weights of one dtype and
    device."""
    groups = []
    for names in _SHARED_INPUT:
        layers = [m for m in map(module._modules.get, names) if m is not None and "_finetune_plain_lora" in m.__dict__
                  and len(m.active_adapters) == 1 and m.active_adapters[0] in m.__dict__["_finetune_plain_lora"]]
        adapters = [m.active_adapters[0] for m in layers]
        if len(layers) > 1 and len({(m.lora_A[a].weight.dtype, m.lora_A[a].weight.device)
                                    for m, a in zip(layers, adapters)}) == 1:
            groups.append(_SharedInput(layers, adapters))
    return groups


def _plain_lora_names(layer) -> set:
    """The adapters of a peft LoRA layer that `_lora_forward` computes as peft would: vanilla LoRA, no dropout or
    bias, adapters on and unmerged, A and B plain (`_bare_linear`)."""
    if getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True):
        return set()
    return {name for name in layer.lora_A if name not in getattr(layer, "lora_variant", {})
            and isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and _bare_linear(layer.lora_A[name]) and _bare_linear(layer.lora_B[name])}


def _bare_linear(module) -> bool:
    """A linear layer without bias whose weight is whole here and whose forward is its own, with no hook around it
    (FSDP and ZeRO-3 gather sharded weights in hooks: peft's FSDP wrapping policy shards LoRA's A and B on their
    own), so that its weight can be used without calling it."""
    return type(module) is torch.nn.Linear and module.bias is None and "forward" not in module.__dict__ \
        and not (module._forward_hooks or module._forward_pre_hooks) \
        and type(module.weight) is torch.nn.Parameter and module.weight.numel() > 0


@functools.cache
def _lora_linear_classes() -> tuple:
    from peft.tuners.lora import layer

    classes = [layer.Linear]
    try:
        from peft.tuners.lora import bnb

        classes += [getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)]
    except (ImportError, RuntimeError):  # peft's bitsandbytes layers import bitsandbytes
        pass
    return tuple(classes)


def _same_code(function, reference) -> bool:
    code, ref = getattr(function, "__code__", None), reference.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == (ref.co_code, ref.co_consts,
                                                                                ref.co_names)


@contextlib.contextmanager
def lean_blocks(model):
    """The model's forward with RMSNorms and SiLU-gated MLPs whose code is transformers' Llama one (Llama, Qwen2/3,
    Mistral, SmolLM2 copy it) computed by `_RMSNorm` and `_SwiGLU`: the same values, less held for backward (on
    SmolLM2, 44 -> ~32 bytes per token, layer and hidden unit with the grouped-head attention above); and peft's
    LoRA linear layers by `_lora_forward` (the low-rank sum in the matmul's epilogue). Where kernels are fused on the
    model's device (section 6), also Llama's rotary embedding (`_RoPE`), in every modeling module whose
    `apply_rotary_pos_emb` is Llama's code. Other modules are left as they are."""
    import sys

    from transformers.models.llama import modeling_llama

    swapped, namespaces, parents = [], {}, []
    for module in _modules(model):
        if "q_proj" in module._modules or "gate_proj" in module._modules:
            parents.append(module)
        kind = _module_kind(module)
        if kind == "mlp" and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"):
            swapped.append((module, _swiglu_forward))
        elif kind in _FORWARDS:
            swapped.append((module, _FORWARDS[kind]))
        namespace = getattr(sys.modules.get(type(module).__module__), "__dict__", {})
        namespaces[id(namespace)] = namespace
    swapped = [(m, f) for m, f in swapped if "forward" not in m.__dict__]  # one replaced already (a hook's) stays
    for module, forward in swapped:  # (in the instance's __dict__ as nn.Module.__setattr__ puts it, minus its checks)
        module.__dict__["forward"] = forward.__get__(module)
        if forward is _lora_forward:
            module.__dict__["_finetune_plain_lora"] = _plain_lora_names(module)
    groups = [g for parent in parents for g in _shared_inputs(parent)
              if not any("_finetune_group" in m.__dict__ for m in g.layers)]  # (an outer `lean_blocks`' stay)
    for group in groups:
        for layer in group.layers:
            layer.__dict__["_finetune_group"] = group
    parameter = next(model.parameters(), None)
    rope = [(n, n["apply_rotary_pos_emb"]) for n in namespaces.values()
            if parameter is not None and parameter.device.type in _fuse_on
            and _same_code(n.get("apply_rotary_pos_emb"), modeling_llama.apply_rotary_pos_emb)
            and _same_code(n.get("rotate_half"), modeling_llama.rotate_half)]
    for namespace, _ in rope:
        namespace["apply_rotary_pos_emb"] = _apply_rope
    try:
        yield
    finally:
        for module, forward in swapped:
            if getattr(module.__dict__.get("forward"), "__func__", None) is forward:
                del module.forward
                module.__dict__.pop("_finetune_plain_lora", None)
        for namespace, original in rope:
            namespace["apply_rotary_pos_emb"] = original
        for group in groups:
            for layer in group.layers:
                layer.__dict__.pop("_finetune_group", None)
            group.x, group.parts = None, {}


_kinds: dict = {}  # (module class, its forward) -> "lora", "rms", "mlp" or "" (left as it is)
_FORWARDS = {"lora": _lora_forward, "rms": _rmsnorm_forward}


def _module_kind(module) -> str:
    """`_kind` of the module's class, cached per (class, forward)."""
    key = (type(module), type(module).forward)
    kind = _kinds.get(key)
    if kind is None:
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        kind = _kinds[key] = _kind(type(module), LlamaRMSNorm, LlamaMLP)
    return kind


def _kind(cls, norm, mlp) -> str:
    if cls in _lora_linear_classes():
        return "lora"
    return "rms" if _same_code(cls.forward, norm.forward) else "mlp" if _same_code(cls.forward, mlp.forward) else ""


_step_modules: dict = {}  # id(model) -> its modules, listed once for the step under way (`step_modules`)


def _modules(model) -> list:
    """The model's modules: listed once per training step (the contexts of a step each need them; walking a 1B
    model's ~1,300 modules costs the host about a millisecond each time, while the GPU waits for the step)."""
    inner = getattr(model, "module", model)
    listed = _step_modules.get(id(inner))
    return listed if listed is not None else list(inner.modules())


@contextlib.contextmanager
def step_modules(model, compute_dtype: torch.dtype):
    """Around a whole training step, forward and backward: the lean blocks, and (bf16/fp16 base) LoRA inputs not
    cast to the adapter's dtype (`lora_autocast`), so that a backward which recomputes the forward (activation
    checkpointing) recomputes the one the step ran. Autocast itself stays with the forward."""
    inner = getattr(model, "module", model)
    outer = id(inner) not in _step_modules
    if outer:
        _step_modules[id(inner)] = list(inner.modules())
    try:
        with lean_blocks(model), _lora_inputs_uncast(model, compute_dtype in (torch.bfloat16, torch.float16)):
            yield
    finally:
        if outer:
            del _step_modules[id(inner)]


# ----------------------------------------------------------------------------- 4. LoRA in the base's dtype


@contextlib.contextmanager
def lora_autocast(model, compute_dtype: torch.dtype, device_type: str):
    """The step's forward under autocast to the base's dtype, with peft's cast of every LoRA input to the adapter's
    dtype turned off (so no fp32 copy of each activation); the adapter and its optimizer state stay as they are.
    A no-op for an fp32 base."""
    if compute_dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    with _lora_inputs_uncast(model), torch.autocast(device_type, dtype=compute_dtype):
        yield


@contextlib.contextmanager
def _lora_inputs_uncast(model, enabled: bool = True):
    # peft.helpers.disable_input_dtype_casting does this for every tuner layer, but fails on layers without the flag
    # (TrainableTokensLayer, peft 0.21); LoRA layers are the ones that cast.
    layers = [m for m in _modules(model) if "lora_A" in m._modules] if enabled else []
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.cast_input_dtype_enabled = value


# ----------------------------------------------------------------------------- 5. TRL's fused head, labelled positions


@contextlib.contextmanager
def compact_fused_head():
    """TRL's DPO, KTO, GRPO and RLOO trainers take log-probabilities through its fused LM head
    (`trl.trainer.utils.add_fused_lm_head`), which projects and log-softmaxes only the positions with a label where
    its Triton kernel runs (CUDA, XPU), and every position elsewhere, the CPU included (for compilers that would
    recompile for every count of labels), then drops the unlabelled ones. Here the CPU too takes only the labelled
    positions, TRL's own compact route: each position's log-probability is computed as before (its projection and
    log-softmax are its own row's), without the prompt's and the padding's (the shipped recipes' steps on a 2-core
    CPU: DPO 4.8 -> 3.2 s, KTO 4.9 -> 3.4 s, GRPO 9.1 -> 7.7 s).
    A no-op where TRL has no such switch."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def compact_head_trainer(trainer_class):
    """`trainer_class` whose construction (where TRL precomputes a frozen reference's log-probabilities), training,
    evaluation and prediction (and so generation and its scoring) run under `compact_fused_head`."""

    class Trainer(trainer_class):
        def __init__(self, *args, **kwargs):
            with compact_fused_head():
                super().__init__(*args, **kwargs)

        def train(self, *args, **kwargs):
            with compact_fused_head():
                return super().train(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            with compact_fused_head():
                return super().evaluate(*args, **kwargs)

        def predict(self, *args, **kwargs):
            with compact_fused_head():
                return super().predict(*args, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_class.__name__
    return Trainer


def usable(model) -> bool:
    """Whether `supervised_nll` computes this model's loss as its own forward would: a causal LM whose logits are
    the head's output unscaled (no soft-capping, logit scale or router loss)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    plain = all(getattr(config, key, None) in (None, 1.0, 1) for key in
                ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    return plain and not getattr(config, "output_router_logits", False)


# ----------------------------------------------------------------------------- 6. fused elementwise kernels

# Device types ("cuda", "cpu") whose elementwise chains run compiled (`use_fused_kernels`); emptied where compiling
# fails.
_fuse_on: frozenset = frozenset()
_compiled: dict = {}


def fused_kernels_default(setting: bool | None, device_type: str) -> bool:
    """`train.fused_kernels` resolved: null means on CUDA where Triton (torch.compile's GPU code generator) imports."""
    if setting is not None:
        return setting
    if device_type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused_kernels(device_types) -> None:
    """From now on, in this process, the fast step's RMSNorm, RoPE, SwiGLU and the loss's softmax run on these device
    types as torch.compile builds them (`fused`)."""
    global _fuse_on
    _fuse_on = frozenset(device_types)


def install_fused(setting: bool | None, args) -> None:
    """`train.fused_kernels` for a run on `args.device` (TrainingArguments), said once by the main process."""
    device = args.device.type
    on = fused_kernels_default(setting, device)
    use_fused_kernels({device} if on else ())
    if on and args.process_index == 0:
        print(f"Fused kernels (train.fused_kernels): RMSNorm, rotary embedding, SwiGLU and the loss's softmax on "
              f"{device}, compiled by torch.compile during the first step", flush=True)


def fuses(tensor: torch.Tensor) -> bool:
    return tensor.device.type in _fuse_on


def fused(function, *args, fallback=None):
    """function(*args), compiled by torch.compile where kernels are fused on the first argument's device: one graph
    (no breaks), each elementwise chain one generated kernel (a reduction and its elementwise work together) instead
    of an eager kernel per operation, and each intermediate kept in registers instead of written out; the arithmetic
    fp32 in between. The first dimension of every tensor of two or more (tokens, or batch rows) is compiled as dynamic
    from the start; any other size that changes between calls (the packed rows' width, a shorter last chunk) compiles
    once more, as dynamic from then on (torch's automatic dynamic shapes). The first call compiles (seconds; torch's
    inductor caches the kernels on disk between runs). Anywhere else, or once compiling
    failed (a warning), `fallback` (the same computation, eager: default `function` itself)."""
    if args[0].device.type not in _fuse_on:
        return (fallback or function)(*args)
    compiled = _compiled.get(function)
    if compiled is None:
        compiled = _compiled[function] = torch.compile(function, fullgraph=True)
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 1:
            torch._dynamo.maybe_mark_dynamic(arg, 0)
    try:
        return compiled(*args)
    except _DEVICE_ERRORS:  # the device's own failure (out of memory, a fault): not the compiler's
        raise
    except Exception as error:  # noqa: BLE001 (a compiler's failure: no C++ compiler, Triton too old, ...)
        _fusing_failed(error)
        return (fallback or function)(*args)


_DEVICE_ERRORS = tuple(e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e)


def _fusing_failed(error: Exception) -> None:
    global _fuse_on
    import warnings

    _fuse_on = frozenset()
    warnings.warn(f"fused kernels (torch.compile) failed: {type(error).__name__}: "
                  f"{(str(error).splitlines() or [''])[0][:300]}; the step's eager kernels run instead", stacklevel=3)
