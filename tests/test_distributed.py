"""Data-parallel training under torchrun on the CPU (gloo, 2 processes) on a tiny random Llama
with tied embeddings, SmolLM2's tokenizer and the bundled demo quads.

The claim under test: N ranks x ``batch_quads`` b train exactly like one process with
``batch_quads`` N*b (global denominators, gradients summed over ranks), for DDP and for FSDP2;
a checkpoint written at 2 ranks resumes at 2 ranks on the same trajectory. The runs go through
``python -m torch.distributed.run ... -m clo train``, the command users type.

Runs compared across layouts train with SGD (momentum 0.9), whose update is linear in the
gradient, so the rounding-level difference of two summation orders stays rounding-level in
the weights. Adam would not keep it there: for a near-zero gradient its update g / sqrt(v) is
about lr whatever g is, so one element in a thousand differed by 1.8e-5 after 4 steps.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import children
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("datasets")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from trainer_fixtures import metrics, save_model, smollm2_tokenizer, tiny_llama

from clo.checkpoints import load_checkpoint
from clo.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
# Margins are beta x differences of fp32 sequence log-probs near -500 nats, whose rounding
# (~3e-5) a different summation order moves: 1e-5 absolute after beta = 0.1.
MARGIN_ABS = 1e-5
COMMON = dict(device="cpu", max_quads=6, max_steps=STEPS, max_length=96, optimizer="sgd", lr=0.5, warmup_steps=1,
              save_every=2)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    tok = smollm2_tokenizer()  # SmolLM2 ties lm_head to the embedding: so does this model
    return save_model(tiny_llama(len(tok), seed=1, tie_word_embeddings=True), tok, tmp_path_factory.mktemp("tied"))


def torchrun_command(out: Path, *extra: str, nproc: int = 2, **options) -> tuple[list[str], dict]:
    """The `torchrun -m clo train` command line (options as flags) and its environment."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "clo", "train", *flags, "--output-dir", str(out), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return cmd, env


def torchrun(out: Path, *extra: str, nproc: int = 2, alone_s: float = 30, **options) -> subprocess.CompletedProcess:
    """``alone_s``: what the run takes alone (children.run); 30 s covers the few-step runs here."""
    cmd, env = torchrun_command(out, *extra, nproc=nproc, **options)
    proc = children.run(cmd, env=env, what=f"torchrun -m clo train ({nproc} ranks, {' '.join(extra)})",
                        alone_s=alone_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def single(model: str, out: Path, **kw) -> dict:
    return train(TrainConfig(model=model, output_dir=str(out), progress=False, **{**COMMON, **kw}))


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"step-{step:07d}" / "state.pt", weights_only=True)["trainable"]


def cut_back(run: Path, to: Path, *, step: int = 2) -> Path:
    """A copy of ``run`` as if killed after its step-``step`` checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / f"step-{STEPS:07d}")
    (to / "checkpoints" / "LATEST").write_text(f"step-{step:07d}")
    return to


def assert_same_run(a: Path, b: Path, *, rtol: float) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "nll", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "lr"):
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=MARGIN_ABS), (x["step"], key)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-4, atol=2e-6, msg=n)


@pytest.fixture(scope="module")
def runs(tied_llama, tmp_path_factory):
    """One process with 2 quads per micro-batch; 2 DDP ranks with 1 each (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    single(tied_llama, root / "single", batch_quads=2, save_final=False)
    torchrun(root / "ddp", model=tied_llama, batch_quads=1, save_final=False, **COMMON)
    return root


def test_ddp_two_ranks_equal_one_process_on_the_global_batch(runs):
    assert_same_run(runs / "ddp", runs / "single", rtol=1e-5)
    assert set(weights(runs / "ddp")) == {n for n in weights(runs / "single")}  # the projections, no tied head
    assert all("self_attn" in n for n in weights(runs / "ddp"))
    # the reference pass was split over the ranks and gathered into one cache file
    (ref_ddp,), (ref_one,) = (glob.glob(str(runs / r / "cache" / "ref-*.pt")) for r in ("ddp", "single"))
    assert Path(ref_ddp).name == Path(ref_one).name
    ref_ddp, ref_one = (torch.load(f, weights_only=True) for f in (ref_ddp, ref_one))
    torch.testing.assert_close(ref_ddp, ref_one, rtol=1e-6, atol=1e-5, equal_nan=True)
    assert not ref_ddp.isnan().any()  # 4 steps x 2 quads cover all 6 quads
    assert load_checkpoint(runs / "ddp")["world_size"] == 2


def test_ddp_checkpoint_resumes_at_two_ranks(runs, tied_llama, tmp_path):
    # The 2-rank run, cut back to its step-2 checkpoint (as if killed during step 3), resumed at 2 ranks.
    cut = cut_back(runs / "ddp", tmp_path / "cut")
    torchrun(cut, "--resume", model=tied_llama, batch_quads=1, save_final=False, **COMMON)
    assert_same_run(cut, runs / "ddp", rtol=1e-6)


def test_resume_at_another_world_size_is_refused(runs, tied_llama, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(runs / "ddp", cut)
    with pytest.raises(ValueError, match="written at world size 2, this run has 1"):
        single(tied_llama, cut, batch_quads=1, resume=True, save_final=False)
    # a checkpoint from before distributed training (no world size; optimizer keyed by index)
    folder = cut / "checkpoints" / f"step-{STEPS:07d}"
    (folder / "meta.json").unlink()  # such checkpoints had only state.pt
    state = torch.load(folder / "state.pt", weights_only=True)
    del state["world_size"]
    torch.save(state, folder / "state.pt")
    with pytest.raises(ValueError, match="predates distributed training"):
        single(tied_llama, cut, batch_quads=1, resume=True, save_final=False)


def test_fsdp2_two_ranks_equal_one_process_and_save_a_loadable_model(tied_llama, tmp_path):
    """FSDP2 with every weight trained: the tied lm_head/embedding is sharded, gathered for the
    fused loss inside the root module's forward, and its gradient reduce-scattered."""
    from transformers import AutoModelForCausalLM

    single(tied_llama, tmp_path / "single", batch_quads=2, trainable="all", save_final=True)
    torchrun(tmp_path / "fsdp", "--fsdp", model=tied_llama, batch_quads=1, trainable="all", save_final=True,
             **COMMON)
    assert_same_run(tmp_path / "fsdp", tmp_path / "single", rtol=1e-5)
    assert "model.embed_tokens.weight" in weights(tmp_path / "fsdp")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "final").state_dict()
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=2e-6, msg=n)
    base = AutoModelForCausalLM.from_pretrained(tied_llama).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])

    # and its checkpoint resumes at 2 ranks, also when the reference pass runs again first (no
    # cache): FSDP2 leaves the root's weights gathered after a forward, which loading must survive
    cut = cut_back(tmp_path / "fsdp", tmp_path / "cut")
    shutil.rmtree(cut / "cache")
    torchrun(cut, "--fsdp", "--resume", model=tied_llama, batch_quads=1, trainable="all", save_final=False, **COMMON)
    assert_same_run(cut, tmp_path / "fsdp", rtol=1e-6)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc): torchrun's workers."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_a_rank_killed_mid_run_leaves_a_checkpoint_that_resumes_on_the_same_trajectory(tied_llama, tmp_path):
    """SIGKILL to rank 1 once a checkpoint exists: torchrun stops the other rank and fails (no
    hang), the latest checkpoint loads, and --resume continues as the uninterrupted run does."""
    import signal
    import time

    opts = dict(COMMON, max_steps=24, save_every=2, model=tied_llama, batch_quads=1, save_final=False)
    torchrun(tmp_path / "full", **opts)

    out = tmp_path / "killed"
    cmd, env = torchrun_command(out, **opts)
    log = tmp_path / "killed.log"  # a file, not a pipe: nothing blocks the run while this test waits
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        # alone: about 15 s to the first checkpoint; torchrun ends a few seconds after the kill
        latest, first_s, stop_s = out / "checkpoints" / "LATEST", 15, 5
        deadline = time.monotonic() + children.MARGIN * first_s
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not latest.exists() and proc.poll() is None:
            proc.kill()
            raise children.expired("the 2-rank run to be killed wrote no checkpoint", first_s, log.read_text()[-3000:])
        workers = sorted(_children(proc.pid))
        assert proc.poll() is None and len(workers) == 2, f"the run ended before a rank could be killed: {workers}"
        os.kill(workers[1], signal.SIGKILL)
        try:
            proc.wait(timeout=children.MARGIN * stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise children.expired("torchrun did not stop after a rank's SIGKILL", stop_s,
                                   log.read_text()[-3000:]) from None
    err = log.read_text()
    assert proc.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err, err[-3000:]
    killed_at = int(latest.read_text().removeprefix("step-"))
    assert 2 <= killed_at < 24, killed_at  # killed mid-run, after a checkpoint
    assert load_checkpoint(out)["step"] == killed_at  # the latest checkpoint is whole

    torchrun(out, "--resume", **opts)
    ra, rb = metrics(out), metrics(tmp_path / "full")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 25))
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "nll", "rewards/margins", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=MARGIN_ABS), (x["step"], key)


def test_data_order_is_a_function_of_seed_and_epoch():
    from clo.train import micro_batches

    cfg = TrainConfig(batch_quads=2, grad_accum=3, seed=7)
    n = 10
    one = [i for s in range(5) for mb in micro_batches(s, cfg, n, world=2) for i in mb]
    again = [i for s in range(5) for mb in micro_batches(s, cfg, n, world=2) for i in mb]
    assert one == again
    # a stream of epochs: each run of n positions is a permutation, and they differ
    epochs = [one[k:k + n] for k in range(0, 5 * 12 - n + 1, n)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    # 2 ranks x 2 quads see exactly what 1 process x 4 quads sees
    wide = TrainConfig(batch_quads=4, grad_accum=3, seed=7)
    assert one == [i for s in range(5) for mb in micro_batches(s, wide, n) for i in mb]
    # another seed, another order
    other = TrainConfig(batch_quads=2, grad_accum=3, seed=8)
    assert one != [i for s in range(5) for mb in micro_batches(s, other, n, world=2) for i in mb]


def test_lora_with_online_reference_under_ddp_and_fsdp2(tied_llama, tmp_path):
    """LoRA, reference from the adapters-disabled model inside the wrapped forward: DDP (merged
    final model) and FSDP2 (adapters gathered and saved) follow the one-process run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kw = dict(COMMON, max_steps=3, save_every=0, trainable="lora", ref="online", lora_r=4)
    single(tied_llama, tmp_path / "one", batch_quads=2, save_final=True, merge_lora=True, **kw)
    torchrun(tmp_path / "ddp", model=tied_llama, batch_quads=1, save_final=True, merge_lora=True, **kw)
    torchrun(tmp_path / "fsdp", "--fsdp", model=tied_llama, batch_quads=1, save_final=True, **kw)
    for run in ("ddp", "fsdp"):
        for x, y in zip(metrics(tmp_path / run), metrics(tmp_path / "one"), strict=True):
            for key in ("loss", "rewards/margins", "grad_norm"):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=MARGIN_ABS), (run, x["step"], key)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final").state_dict()
    fsdp = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_llama), tmp_path / "fsdp" / "final")
    fsdp = fsdp.merge_and_unload().state_dict()
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(one[q], AutoModelForCausalLM.from_pretrained(tied_llama).state_dict()[q])
    for n in one:
        torch.testing.assert_close(ddp[n], one[n], rtol=1e-4, atol=2e-6, msg=n)
        torch.testing.assert_close(fsdp[n], one[n], rtol=1e-4, atol=2e-6, msg=n)


def test_fsdp2_at_world_size_one_equals_the_plain_loop(tied_llama, tmp_path):
    """--fsdp without torchrun: a one-process group on an in-memory store, same trajectory."""
    single(tied_llama, tmp_path / "plain", batch_quads=2, save_final=False)
    single(tied_llama, tmp_path / "fsdp", batch_quads=2, fsdp=True, save_final=False)
    assert_same_run(tmp_path / "fsdp", tmp_path / "plain", rtol=1e-6)
    assert not dist.is_initialized()  # the group made for the run is gone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton loss under FSDP2 in bf16")
def test_fsdp2_single_gpu_with_the_triton_loss_matches_the_plain_loop(tied_llama, tmp_path):
    kw = dict(batch_quads=2, save_final=False, loss_impl="triton", device="cuda")
    single(tied_llama, tmp_path / "plain", **kw)
    single(tied_llama, tmp_path / "fsdp", fsdp=True, **kw)
    ra, rb = metrics(tmp_path / "fsdp"), metrics(tmp_path / "plain")
    for x, y in zip(ra, rb, strict=True):  # bf16 autocast on both; FSDP2 gathers bf16 weights, reduces in fp32
        for key in ("loss", "nll", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=2e-2), (x["step"], key)


def two_nodes(nodes: list[Path], *flags: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node-rank i -m clo train FLAGS` on two "nodes" (one rank each), each
    in its own folder, as on two machines that do not share files; relative paths in FLAGS are
    resolved on each node, and the run folder is node 0's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmds = [([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
              "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
              "-m", "clo", "train", *flags, "--output-dir", "out", "--no-progress"], dict(cwd=node, env=env))
            for rank, node in enumerate(nodes)]
    return children.run_together(cmds, what="two torchrun nodes of clo train", alone_s=30)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("clo train: error: ")]


@pytest.mark.parametrize("fault", ["data file missing", "bad row", "config file missing", "other rows"])
def test_an_error_one_node_alone_meets_ends_every_rank_with_the_same_line(tied_llama, tmp_path, fault):
    """Node 1's copy of a file is missing or has a bad row: both ranks end (no wait for the
    collective timeout) with torchrun failing and the same one-line error, naming rank 1 and the file.
    Node 1's copy holds other rows: the same, naming the fingerprints the ranks disagree on."""
    from clo.data import demo_path

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    rows = demo_path().read_text().splitlines()[:6]
    (nodes[0] / "quads.jsonl").write_text("\n".join(rows) + "\n")
    if fault == "bad row":
        (nodes[1] / "quads.jsonl").write_text("\n".join(rows[:3] + ["{not json"] + rows[3:]) + "\n")
    elif fault == "config file missing":
        (nodes[1] / "quads.jsonl").write_text("\n".join(rows) + "\n")
    elif fault == "other rows":
        (nodes[1] / "quads.jsonl").write_text("\n".join(rows[:5]) + "\n")
    flags = ["--model", tied_llama, "--data", "quads.jsonl", "--device", "cpu", "--max-steps", "2",
             "--max-length", "96", "--on-bad-row", "error", "--dist-timeout-min", "30"]
    if fault == "config file missing":
        (nodes[0] / "run.yaml").write_text("lr: 0.001\n")
        flags += ["--config", "run.yaml"]
    procs = two_nodes(nodes, *flags)
    lines = [error_lines(p) for p in procs]
    for p, found in zip(procs, lines, strict=True):
        assert p.returncode != 0 and len(found) == 1, p.stderr[-4000:]
    assert lines[0] == lines[1], lines
    if fault == "other rows":
        assert lines[0][0].startswith("clo train: error: ranks disagree on the model and data fingerprints")
        return
    expected = {"data file missing": "quads.jsonl", "bad row": "line 4", "config file missing": "run.yaml"}[fault]
    assert lines[0][0].startswith("clo train: error: rank 1 of 2: ") and expected in lines[0][0], lines[0]
    assert not (nodes[0] / "out").exists()  # refused before any file was written
