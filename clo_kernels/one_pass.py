"""The one-pass fused CLO loss: the gradient computed in the forward, chunk by chunk of whole pairs.

Every token of sequence s shares one gradient scale g_s = dL/dsums[s], which depends only on
the pairs s belongs to and on the global denominators (objective.sequence_scales). So once a
chunk holds whole pairs, its gradient is known while its logits are at hand:

    z          = h[chunk] @ W^T                 one product into a reused [chunk, V] buffer
    logp, lse  = row pass over z (+ b, softcap)  Triton row kernel on CUDA, PyTorch row blocks on the CPU
                                                (and the row statistics asked for, in the same read)
    sums[s]   += w * logp over the chunk's tokens    the chunk's sequences are complete now (w: token_weights, 1)
    g          = w * dL/dsums (autograd)[seq]    on the device, no host synchronisation
    z         := g * (onehot(y) - softmax) * softcap'      written over the logits
    dh[chunk]  = z @ W        dW += z^T @ h[chunk] (fp32)        db += sum_t z_t

6NDV FLOPs in three products per chunk, where a design that recomputes the logits in the
backward does 8NDV. Token terms (clo_kernels.token_terms; the unlikelihood term is one) ride
along for a gather and a scatter per chunk: their entries' logits are read off z before the row
pass, the row kernels run with the scale g plus the terms' additions, and dL/dz is written once
more at the terms' entries. The backward only multiplies the saved gradients by grad_output, and no
gradient work is done under torch.no_grad() or when no input needs a gradient (then only the
first two lines run: that is also the forward of ``sequence_logps`` without gradients).

Chunks: sequences joined by pairs (a sequence in two pairs joins both) form groups, found once
by a union-find over the (P,) pair indices; the labelled tokens are sorted by (chunk, position)
once on the device, so packed input with seq_ids in any order works. That plan costs the one
host synchronisation of the call (token counts per sequence and the pair indices, a few
hundred integers). Layouts it cannot take fall back to the two-pass path and say so once: a
group with more labelled tokens than a chunk, or a ref_logps that needs a gradient.

Memory, beyond inputs and gradients: the [chunk, V] buffer of ``options.chunk_bytes``
(DEFAULT_CHUNK_BYTES per device) and, for a 16-bit weight, the fp32 dW accumulator (V x D x 4
bytes) during the forward; dh (N, D), dW and db (in the inputs' dtypes; fp32 for fp16 inputs,
whose chunks carry a power-of-two dz scale so that no entry underflows before the loss scale is
known) are kept from the forward to the backward, which hands them out once and keeps nothing.
The gradient scales come from the objective by autograd (objective.sequence_scales), so any
pair-local objective runs here. The lean mode (backward="atomic") keeps no buffer at all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._inputs import TokenBatch, mask_token_logps, needs_autograd, token_order
from .backend import addmm_fp32, mm_fp32, row_ops, triton_module, user_stacklevel
from .objective import CLOOutput, PairObjective, check_locality, sequence_scales
from .options import LogProbOptions
from .token_terms import Entries

if TYPE_CHECKING:
    from .token_terms import TokenTerm

_warned: set[str] = set()


DZ_TOP = 2.0**12  # fp16 chunks: the largest |g| of a chunk is lifted to [DZ_TOP / 2, DZ_TOP)


def dz_scale(bound: torch.Tensor) -> torch.Tensor:
    """The power of two that lifts max(bound) into [DZ_TOP / 2, DZ_TOP), on the device (no host sync).

    A row's dz entries are at most 2 * bound (|onehot - p| <= 1, an unlikelihood term's parts bounded
    by |g| + a W), so they stay below 2^13, far inside fp16's 65,504, while entries down to 2^-35 of
    the largest survive rounding; the products that follow accumulate in fp32."""
    return torch.exp2(torch.floor(torch.log2(DZ_TOP / bound.amax())).clamp(-100.0, 100.0))


def _buffer_dtype(impl: str, hidden: torch.Tensor) -> torch.dtype:
    """The [chunk, V] buffer's dtype: hidden's, except under the Triton interpreter, whose bf16
    stores truncate; it keeps fp32 logits (bf16-rounded by the product, as on a GPU) and lets
    torch round dz."""
    return torch.float32 if impl == "triton" and triton_module().INTERPRETED else hidden.dtype


def _max_rows(opts: LogProbOptions, impl: str, hidden: torch.Tensor, V: int) -> int:
    """Tokens per chunk: as many as fill options.chunk_bytes of buffer."""
    return opts.chunk_rows(V, _buffer_dtype(impl, hidden).itemsize, hidden.device)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    order: torch.Tensor  # (n,) labelled token rows, grouped by chunk, in position order within one
    bounds: tuple[tuple[int, int], ...]  # [start, end) of each chunk in ``order``


def plan_chunks(batch: TokenBatch, chosen: torch.Tensor | None, rejected: torch.Tensor | None, *,
                max_rows: int) -> Plan | str:
    """Chunks of whole groups of paired sequences with at most ``max_rows`` labelled tokens each,
    or why there are none. Without pairs (a forward without gradients) every sequence is a group
    of its own and a sequence may span chunks."""
    S = batch.num_seqs
    counts = torch.zeros(S, dtype=torch.long, device=batch.labels.device).index_add_(
        0, batch.seq_ids, batch.valid.long())
    if chosen is None:
        n = int(counts.sum())
        order = token_order(batch, [0] * S, n)
        return Plan(order, tuple((s, min(n, s + max_rows)) for s in range(0, n, max_rows)))
    host = torch.cat([counts, chosen.long(), rejected.long()]).tolist()  # the call's one host sync
    counts, P = host[:S], chosen.numel()
    parent = list(range(S))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(host[S:S + P], host[S + P:], strict=True):
        if 0 <= a < S and 0 <= b < S:  # out of range only with validate=False: the loss is NaN anyway
            parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for s in range(S):
        groups.setdefault(root(s), []).append(s)
    chunk_of_seq, bounds, start, size = [0] * S, [], 0, 0
    for members in groups.values():
        n = sum(counts[s] for s in members)
        if n > max_rows:
            return (f"sequences {members[:4]}{'...' if len(members) > 4 else ''}, joined by pairs, hold {n} labelled "
                    f"tokens, more than one chunk of {max_rows} (options.chunk_bytes)")
        if size and size + n > max_rows:
            bounds.append((start, start + size))
            start, size = start + size, 0
        for s in members:
            chunk_of_seq[s] = len(bounds)
        size += n
    if size:
        bounds.append((start, start + size))
    return Plan(token_order(batch, chunk_of_seq, start + size), tuple(bounds))


def fall_back(kind: str, reason: str) -> None:
    """Say once per kind of reason that a call takes the two-pass path."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"clo_kernels: the one-pass loss cannot take this layout ({reason}); it runs the two-pass "
                      "path (backward='staged'), which recomputes the logits in the backward", RuntimeWarning,
                      stacklevel=user_stacklevel())


# ----------------------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class _Loop:
    """One call's inputs; ``run`` fills ``output`` (a CLOOutput) and returns (dh, dW, db)."""

    batch: TokenBatch
    weight: torch.Tensor
    bias: torch.Tensor | None
    opts: LogProbOptions
    impl: str
    plan: Plan
    objective: PairObjective | None  # None: token log-probs only, no loss
    need: tuple[bool, bool, bool]  # gradients of hidden, weight, bias
    terms: tuple[TokenTerm, ...] = ()  # token terms folded into the loop
    check: bool = False  # check_locality at the end (one host sync)
    output: CLOOutput | None = None
    scales: torch.Tensor | None = None  # (S,) the g_s the chunks used, with check
    token_stats: torch.Tensor | None = None  # (len(opts.row_stats), N) row statistics, once token_logps has run
    _term_values: list | None = None  # the terms' values, once token_logps has run
    _final: tuple | None = None  # (sums, counts, stats) at the end of the loop

    def token_logps(self) -> tuple[torch.Tensor, tuple]:
        batch, weight, opts = self.batch, self.weight, self.opts
        bias = None if self.bias is None else self.bias.contiguous()  # the row kernels read (V,) densely
        hidden, seq = batch.hidden, batch.seq_ids
        N, V = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = self.need
        grads = need_h or need_w or need_b
        fwd, grad_into = row_ops(self.impl)
        labels = batch.labels.clamp(0, V - 1)  # out of range only with validate=False: NaN below
        buf_dtype = _buffer_dtype(self.impl, hidden)
        # fp32 rows in PyTorch without softcap: the softmax stays in the buffer between the two row
        # passes (rows_softmax_), so the gradient takes one pass over it instead of three.
        in_place = self.impl == "torch" and opts.softcap is None and buf_dtype == torch.float32
        if in_place:
            from .linear_logprob_torch import rows_grad_from_softmax_, rows_softmax_
        rows_max = max((e - s for s, e in self.plan.bounds), default=0)
        buf = torch.empty((rows_max, V), dtype=buf_dtype, device=hidden.device)
        tok = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        sums = torch.zeros(batch.num_seqs, dtype=torch.float32, device=hidden.device)
        names = opts.row_stats
        stats = None  # name -> (S,) sums of the row statistics, views of st_sums
        if names:
            self.token_stats = torch.zeros((len(names), N), dtype=torch.float32, device=hidden.device)
            # the objective's scales may read its sequences' statistics: summed as the log-probs are
            st_sums = torch.zeros((len(names), batch.num_seqs), dtype=torch.float32, device=hidden.device)
            stats = dict(zip(names, st_sums, strict=True))
        if grads:
            counts = torch.zeros_like(sums).index_add_(0, seq, batch.valid.float())
            if self.check:
                self.scales = torch.full_like(sums, float("nan"))  # the g_s each chunk used, for check_locality
        # fp16 (5 exponent bits) would round every dz entry below 2^-24 to 0 here, before the caller's
        # loss scale (GradScaler's grad_output) is known. So each chunk's dz carries a power of two
        # that lifts its largest entry near DZ_TOP, and dh, dW and db stay fp32 in true units (the
        # scale taken back) until the backward applies grad_output and rounds once. bf16 has fp32's
        # exponent range and needs none of it.
        scaled = grads and hidden.dtype == torch.float16
        dh = torch.zeros(hidden.shape, dtype=torch.float32 if scaled else hidden.dtype, device=hidden.device) \
            if need_h else None
        dw, db = None, (torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None)
        dw_sc = None  # scaled: the scale dw is in (that of the last chunk added)
        per_term = [t.by_chunk(batch, self.plan.order, self.plan.bounds, vocab_size=V) for t in self.terms]
        term_sums = [torch.zeros((), dtype=torch.float32, device=hidden.device) for _ in self.terms]
        entries = [Entries.of([chunks[i] for chunks, _ in per_term], V) for i in range(len(self.plan.bounds))]
        for (start, end), ex in zip(self.plan.bounds, entries, strict=True):
            rows = self.plan.order[start:end]
            h = hidden.index_select(0, rows)
            z = buf[: end - start]
            if z.dtype == h.dtype:
                torch.mm(h, weight.T, out=z)
            else:
                z.copy_(h @ weight.T)
            y, s = labels[rows], seq[rows]
            if ex is not None:
                ex.read(z, bias)
            if in_place:
                logp, lse, inv, st = rows_softmax_(z, y, bias=bias, stats=names)
            else:
                logp, lse, st = fwd(z, y, bias=bias, softcap=opts.softcap, stats=names)
            if batch.bad_token is not None:
                logp = torch.where(batch.bad_token[rows], float("nan"), logp)
            tok[rows] = logp
            w_rows = None if batch.weights is None else batch.weights[rows]  # token_weights: in the sums only
            sums.index_add_(0, s, logp if w_rows is None else logp * w_rows)
            if names:
                self.token_stats[:, rows] = st
                st_sums.index_add_(1, s, st)
            if ex is not None:
                for k, value in ex.values(lse, softcap=opts.softcap):
                    term_sums[k] += value
            if not grads:
                continue
            g = sequence_scales(self.objective, sums, counts, stats)[s]  # final for the chunk's whole groups
            if self.scales is not None:
                self.scales[s] = g
            if w_rows is not None:  # d sums[s] / d logp_t = w_t
                g = g * w_rows
            added = None if ex is None else ex.scale(g)
            g_rows = g if added is None else g + added
            sc = None
            if scaled:  # dL/dz is linear in (g, the terms' parts): scaling g_rows and the parts scales it
                sc = dz_scale(g.abs() if added is None else g.abs() + added.abs())
                g_rows = g_rows * sc
            db_rows = None if scaled else db  # scaled: db is summed from the final dz below
            if in_place:  # z := dL/dz (db += its column sums)
                rows_grad_from_softmax_(z, y, g_rows, inv, db=db_rows)
            else:
                grad_into(z, z, y, lse, g_rows, bias=bias, softcap=opts.softcap, db=db_rows)
            if ex is not None:
                ex.write(z, y, g, added, lse, softcap=opts.softcap, db=db_rows, factor=sc)
            dz = z.to(hidden.dtype)
            if sc is None:
                if need_h:
                    dh.index_copy_(0, rows, dz @ weight)
                if need_w:
                    dw = addmm_fp32(dw, dz.T, h)
                continue
            if need_h:
                dh.index_copy_(0, rows, mm_fp32(dz, weight).div_(sc))
            if need_w:  # dw holds dW times the last chunk's scale: an exact power-of-two rescale per chunk
                dw = addmm_fp32(dw if dw is None else dw.mul_(sc / dw_sc), dz.T, h)
                dw_sc = sc
            if need_b:
                db += dz.sum(0, dtype=torch.float32).div_(sc)
        self._term_values = [total / den for total, (_, den) in zip(term_sums, per_term, strict=True)]
        if grads:
            self._final = (sums, counts, stats)
        buf = z = dz = h = None  # the [chunk, V] buffer goes before dW is cast: the peak stays that of the loop
        if need_w:
            if dw is None:
                dw = torch.zeros(weight.shape, dtype=torch.float32 if scaled else weight.dtype, device=weight.device)
            elif scaled:
                dw.div_(dw_sc)
            else:
                dw = dw.to(weight.dtype)
        # scaled: dh, dW and db stay fp32 for the backward; else in the inputs' dtypes (db is fp32 either way).
        return tok, (dh, dw, db if scaled or not need_b else db.to(bias.dtype))

    def run(self) -> tuple:
        tok, grads = self.token_logps()
        if self.check and self.scales is not None:
            check_locality(self.objective, self.scales, *self._final)
        with torch.no_grad():
            st = None if self.token_stats is None else mask_token_logps(self.token_stats, self.batch)
            self.output = self.objective.output(mask_token_logps(tok, self.batch), self.batch, token_stats=st,
                                                names=self.opts.row_stats)
            for term, value in zip(self.terms, self._term_values or [], strict=True):
                term.add_to(self.output, value)
        return grads


class _OnePassCLO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, loop: _Loop):
        ctx.grads = loop.run()
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loop.output.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None  # handed out, not kept: nothing of the loss's size outlives this
        if grads is None:
            raise RuntimeError("clo_kernels: the one-pass loss computes its gradients in the forward and hands them "
                               "out once; for a second backward through it (retain_graph=True) use "
                               "options=LogProbOptions(backward='staged')")
        return (*(None if g is None else g.mul_(grad_output).to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)),
                None)


def clo_loss(batch: TokenBatch, weight, bias, objective: PairObjective, *, opts: LogProbOptions, impl: str,
             terms: tuple = (), check: bool = False) -> CLOOutput | None:
    """``objective``'s loss of ``batch`` in one pass, plus token terms (token_terms) folded in, or None
    where it needs the two-pass path: an objective that is not pair-local (chosen up front), or a
    layout the loop cannot take (said once per reason). check: check_locality after the loop."""
    hidden = batch.hidden
    need = tuple(needs_autograd(t) for t in (hidden, weight, bias))
    if any(need) and not objective.pair_local:
        return None
    if objective.ref_logps is not None and needs_autograd(objective.ref_logps):
        fall_back("ref grad", "ref_logps requires a gradient")
        return None
    max_rows = _max_rows(opts, impl, hidden, weight.shape[0])
    plan = plan_chunks(batch, *objective.pairs(), max_rows=max_rows) if any(need) else \
        plan_chunks(batch, None, None, max_rows=max_rows)
    if isinstance(plan, str):
        fall_back("group size", plan)
        return None
    loop = _Loop(batch=batch, weight=weight, bias=bias, opts=opts, impl=impl, plan=plan, objective=objective,
                 need=need, terms=terms, check=check)
    if not any(need):
        loop.run()
        return loop.output
    loss = _OnePassCLO.apply(hidden, weight, bias, loop)
    out = loop.output
    return CLOOutput(loss=loss, logps=out.logps, metrics=out.metrics, row_stats=out.row_stats)


def forward_token_logps(batch: TokenBatch, weight, bias, *, opts: LogProbOptions,
                        impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) fp32 token log-probs without gradients and the (len(opts.row_stats), N) row statistics
    or None (0 at unlabelled tokens, before masking)."""
    plan = plan_chunks(batch, None, None, max_rows=_max_rows(opts, impl, batch.hidden, weight.shape[0]))
    loop = _Loop(batch=batch, weight=weight, bias=bias, opts=opts, impl=impl, plan=plan, objective=None,
                 need=(False, False, False))
    return loop.token_logps()[0], loop.token_stats
