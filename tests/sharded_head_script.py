"""Run under torchrun by tests/test_sharded_head.py: the fused head (hf.add_hidden_head) on 2 gloo
ranks against one process. Under FSDP2 on the global batch split over the ranks: lm_head in the
root unit, lm_head as its own unit, and tied embeddings (in the root unit: FSDP2 keeps a shared
parameter in one unit). Under transformers' tensor parallelism (``DistributedConfig(tp_plan=
"auto")``: lm_head's weight a DTensor sharded over the vocabulary) on the whole batch on each rank.
3 SGD steps of sigmoid DPO, every parameter trained; rank 0 writes, per layout, each step's
loss and gradient norm from both runs and the largest difference of lm_head's first gradient
and of the final weights, as JSON to argv[1]."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from trainer_fixtures import tiny_llama
from transformers import AutoModelForCausalLM

import clo_kernels as ck
from clo_kernels.integrations import hf

V, S, T, STEPS, LR = 97, 8, 12, 3, 0.5


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (S, T), generator=g)
    labels = ids.masked_fill(torch.arange(T) < 4, -100)  # the first 4 positions are the prompt
    return ids, labels, -40 + torch.randn(S, generator=g)  # any reference log-probs


def loss_of(model, ids, labels, ref):
    """Mean sigmoid DPO over the rows' pairs (rows 2k, 2k + 1), from the fused head."""
    pairs = torch.arange(0, ids.shape[0], 2)
    objective = ck.PreferenceObjective(chosen=pairs, rejected=pairs + 1, ref_logps=ref, beta=0.1)
    return model(input_ids=ids, head_fn=lambda h, w, b, softcap: ck.fused_linear_sequence_loss(
        h, w, labels, objective, bias=b, softcap=softcap, shift=True, impl="torch")).loss


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, ids, labels, ref, *, world: int) -> dict:
    hf.add_hidden_head(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms, head_grad = [], [], None
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, ids, labels, ref)
        loss.backward()
        if world > 1:  # the logged loss: the mean of the ranks' means (equal pairs per rank)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        grads = [full(p.grad) for p in model.parameters()]
        losses.append(loss.item())
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        if head_grad is None:
            head_grad = full(model.lm_head.weight.grad).clone()
        opt.step()
    return {"losses": losses, "norms": norms, "head_grad": head_grad,
            "weights": {n: full(p).detach().clone() for n, p in model.named_parameters()}}


def compare(sharded: dict, alone: dict) -> dict:
    return {
        "losses": [sharded["losses"], alone["losses"]], "norms": [sharded["norms"], alone["norms"]],
        "head_grad_diff": (sharded["head_grad"] - alone["head_grad"]).abs().max().item(),
        "head_grad_max": alone["head_grad"].abs().max().item(),
        "weight_diff": max((sharded["weights"][n] - w).abs().max().item() for n, w in alone["weights"].items()),
    }


def tensor_parallel(path: str, ids, labels, ref) -> dict | None:
    """Every rank sees the whole batch and holds a slice of each weight (None: a transformers
    without DistributedConfig)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return None
    base = tiny_llama(V, seed=3).train()
    alone = train(copy.deepcopy(base), ids, labels, ref, world=1)
    folder = Path(path).with_name("tp_model")  # save_pretrained writes on rank 0 only
    base.save_pretrained(folder)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto"))
    assert isinstance(model.lm_head.weight, DTensor), type(model.lm_head.weight)  # the plan did shard the head
    return compare(train(model.train(), ids, labels, ref, world=1), alone)


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, labels, ref = batch()
    share = slice(rank * S // world, (rank + 1) * S // world)
    results = {}
    for layout, tied in (("lm_head in the root unit", False), ("lm_head its own unit", False),
                         ("tied embeddings, root unit", True)):
        base = tiny_llama(V, seed=3, tie_word_embeddings=tied).train()
        alone = train(copy.deepcopy(base), ids, labels, ref, world=1)
        model = copy.deepcopy(base)
        for layer in model.model.layers:
            fully_shard(layer)
        if layout == "lm_head its own unit":
            fully_shard(model.lm_head)
        fully_shard(model)
        results[layout] = compare(train(model, ids[share], labels[share], ref[share], world=world), alone)
    results["tensor parallel"] = tensor_parallel(path, ids, labels, ref)
    if rank == 0:
        Path(path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
