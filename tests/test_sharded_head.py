"""The fused head where a wrapper shards or offloads the model: FSDP2 and transformers' tensor
parallelism on 2 gloo ranks and accelerate's device_map offloading (here), DeepSpeed ZeRO-3
(tests/test_trl.py, through the TRL drop-ins). The head reads lm_head's weight inside
lm_head's own forward (hf.call_as_forward), so a head wrapped as its own FSDP2 unit is gathered
and its gradient reduce-scattered; read outside it (as before), that unit's gradient stayed
each rank's own, 0.065 off on a gradient of 0.058."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import children
import pytest
import torch.distributed as dist

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("sharded") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = children.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         str(HERE / "sharded_head_script.py"), str(out)], env=env,
                        what="the fused head under FSDP2 (3 layouts) and tensor parallelism, 2 ranks", alone_s=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["lm_head in the root unit", "lm_head its own unit", "tied embeddings, root unit",
                                    "tensor parallel"])
def test_a_sharded_model_trains_as_one_process_on_the_global_batch(sharded, layout):
    """3 SGD steps, every parameter trained: each step's loss and gradient norm, lm_head's first
    gradient and the final weights agree with one process's to fp32 rounding. Under tensor
    parallelism lm_head's weight is a DTensor even inside its forward: the head gathers it (without
    that, "aten.mm.out got mixed torch.Tensor and DTensor")."""
    r = sharded[layout]
    if r is None:
        pytest.skip("this transformers has no transformers.distributed.DistributedConfig")
    for key in ("losses", "norms"):
        sharded, alone = r[key]
        assert sharded == pytest.approx(alone, rel=1e-6), (key, sharded, alone)
    assert alone[-1] < alone[0]  # the steps moved the model: the comparison is of trajectories
    assert r["head_grad_diff"] <= 1e-6 * r["head_grad_max"] * 10, r
    assert r["weight_diff"] <= 1e-6, r


def test_a_head_offloaded_to_disk_by_device_map_is_brought_in_for_the_loss(tmp_path):
    """from_pretrained(device_map=...) with lm_head on "disk": outside its forward the weight is
    on the meta device; the head runs inside that forward, where accelerate's hook loads it, and
    gives the log-probs of the model in memory (before: an error from the meta weight)."""
    pytest.importorskip("accelerate")
    import torch
    from trainer_fixtures import tiny_llama
    from transformers import AutoModelForCausalLM

    import clo_kernels as ck
    from clo_kernels.integrations import hf

    model = tiny_llama(97, seed=3)
    model.save_pretrained(tmp_path / "model")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"model": "cpu", "lm_head": "disk"},
                                                     offload_folder=tmp_path / "offload")
    assert offloaded.lm_head.weight.device.type == "meta"
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(11) < 3, -100)
    with torch.no_grad():
        expected = ck.sequence_logps(model.model(input_ids=ids).last_hidden_state, model.lm_head.weight, labels,
                                     shift=True)
    hf.add_hidden_head(offloaded)
    with torch.no_grad():
        got = offloaded(input_ids=ids, head_fn=lambda h, w, b, softcap: ck.sequence_logps(
            h, w, labels, bias=b, softcap=softcap, shift=True))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert offloaded.lm_head.weight.device.type == "meta"  # offloaded again after the call
