"""`clo` shows a user's mistake (a clo.errors.UserError) as one line on stderr and exits with 2,
as argparse does for a bad flag; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import children
import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD = dict(id="a", prompt_en="Hi", response_en="Hello there.", prompt_tgt="Hallo", response_tgt="Hallo du.")


def clo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return children.run([sys.executable, "-m", "clo", *args], cwd=cwd, env=env, what=f"clo {' '.join(args)}",
                        alone_s=6)


def one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
    """The error line, after checking exit code 2, no traceback and the argparse-like form."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"clo {command}: error: "), proc.stderr[-3000:]
    return last


def test_train_on_a_broken_data_file(tmp_path):
    data = tmp_path / "quads.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + '{"id": "b", "prompt_en": "Hi",\n')
    proc = clo("train", "--data", str(data), "--on-bad-row", "error", "--max-quads", "1", "--no-progress",
               "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    last = one_line_error(proc, "train")  # before any model loads: the default need not be installed
    assert f"{data} line 3: malformed JSON" in last, last


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--beta", "-1", "beta must be > 0"), ("--unlikelihood", "-0.5", "unlikelihood must be a finite weight >= 0")])
def test_train_with_a_bad_option_value(tmp_path, flag, value, named):
    proc = clo("train", flag, value, "--max-quads", "1", "--no-progress", "--output-dir", str(tmp_path / "run"),
               cwd=tmp_path)
    assert named in one_line_error(proc, "train")


def test_train_with_an_unknown_config_option(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_stepz: 3\n")
    proc = clo("train", "--config", str(cfg), cwd=tmp_path)
    assert f"--config {cfg}: unknown option(s) ['max_stepz']" in one_line_error(proc, "train")


@pytest.mark.parametrize(("text", "named"), [("max_steps: [3\n", "not valid YAML"),
                                             ("- max_steps\n", "expected a mapping of options, got list"),
                                             (None, "cannot be read")])
def test_train_with_a_bad_config_file(tmp_path, text, named):
    cfg = tmp_path / "run.yaml"
    if text is not None:
        cfg.write_text(text)
    proc = clo("train", "--config", str(cfg), "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert f"--config {cfg}: {named}" in one_line_error(proc, "train")
    assert not (tmp_path / "run").exists()


def test_eval_without_a_model(tmp_path):
    proc = clo("eval", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "no --model and no trained model in" in one_line_error(proc, "eval")


def test_compare_refuses_bad_evaluation_options_before_training(tmp_path):
    proc = clo("compare", "--max-new-tokens", "0", "--output-dir", str(tmp_path / "cmp"), cwd=tmp_path)
    assert "--max-new-tokens must be >= 1, got 0" in one_line_error(proc, "compare")
    assert not (tmp_path / "cmp").exists()


def test_eval_refuses_bad_options_before_loading_a_model(tmp_path):
    # No model exists in the run folder: the option error must come first.
    proc = clo("eval", "--max-new-tokens", "0", "--limit", "0", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "--max-new-tokens must be >= 1, got 0; --limit must be >= 1, got 0" in one_line_error(proc, "eval")


def test_other_exceptions_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import clo.train as T
    from clo.cli import main
    from clo.errors import UserError

    def fails(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(T, "train", fails)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--output-dir", str(tmp_path)])

    def refuses(cfg):
        raise UserError("bad run folder\nsecond line")

    monkeypatch.setattr(T, "train", refuses)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "clo train: error: bad run folder second line\n"


class _RunsCode:
    """Pickles as a call of os.mkdir: loading it with weights_only=False would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_resume_from_a_checkpoint_that_would_run_code(tmp_path):
    """A run folder from someone else: its state.pt (and a reference cache) would run code when
    unpickled. --resume refuses it by name, nothing runs; the loader refuses the cache the same way."""
    import torch

    from clo.checkpoints import load_checkpoint
    from clo.errors import UserError
    from clo.files import load_tensors

    marker = tmp_path / "code-ran"
    folder = tmp_path / "run" / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    torch.save({"step": 2, "world_size": 1, "trainable": {}, "payload": _RunsCode(marker)}, folder / "state.pt")
    (folder.parent / "LATEST").write_text(folder.name)
    data = tmp_path / "quads.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    proc = clo("train", "--resume", "--data", str(data), "--max-quads", "1", "--no-progress", "--output-dir",
               str(tmp_path / "run"), cwd=tmp_path)
    last = one_line_error(proc, "train")
    assert f"{folder / 'state.pt'} holds more than tensors" in last and "refused" in last, last
    with pytest.raises(UserError, match="holds more than tensors"):
        load_checkpoint(tmp_path / "run")
    cache = tmp_path / "ref.pt"
    torch.save(_RunsCode(marker), cache)
    with pytest.raises(UserError, match=f"{cache} holds more than tensors"):
        load_tensors(cache)
    assert not marker.exists()
    torch.save({"ok": torch.ones(2)}, cache)
    assert torch.equal(load_tensors(cache)["ok"], torch.ones(2))  # plain tensors still load


def test_a_benchmark_input_that_would_run_code_is_refused(tmp_path, monkeypatch):
    """bench_loss's batches cross into its memory subprocesses as files: read with weights_only."""
    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from loss_inputs import load_batch

    marker, path = tmp_path / "code-ran", tmp_path / "batch.pt"
    torch.save({"tensors": {}, "softcap": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=f"{path} holds more than tensors"):
        load_batch(path)
    assert not marker.exists()
