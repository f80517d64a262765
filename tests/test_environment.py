"""Where Triton is missing or cannot run, the library still imports and says why."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import children
import pytest
from conftest import HAVE_TRITON


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    return children.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                        what="a fresh interpreter importing the library", alone_s=15)


def test_import_and_torch_path_without_triton():
    res = _run("""
        import sys
        sys.modules["triton"] = None  # as on macOS / Windows: import triton fails
        import torch, clo_kernels as ck
        h = torch.randn(4, 6, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)
        y = torch.randint(0, 11, (4, 6)); c, r, m = ck.quad_pairs(1)
        out = ck.fused_linear_clo_loss(h, w, y, chosen=c, rejected=r, nll_mask=m)  # auto -> torch on CPU
        out.loss.backward()
        assert h.grad is not None and "triton" not in [k for k, v in sys.modules.items() if v is not None]
        try:
            ck.fused_linear_clo_loss(h, w, y, chosen=c, rejected=r, impl="triton")
        except ImportError as e:
            print("ImportError:", e)
    """)
    assert res.returncode == 0, res.stderr
    assert "impl='triton' needs the triton package" in res.stdout


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    res = _run("""
        import torch, clo_kernels as ck
        h = torch.randn(4, 6, 8); w = torch.randn(11, 8); y = torch.randint(0, 11, (4, 6))
        c, r, m = ck.quad_pairs(1)
        ck.fused_linear_clo_loss(h, w, y, chosen=c, rejected=r, impl="triton")
    """)
    assert res.returncode != 0
    assert "TRITON_INTERPRET=1" in res.stderr and "impl='torch'" in res.stderr


def test_import_does_not_touch_cuda():
    res = _run("""
        import torch
        calls = []
        torch.cuda.is_available = lambda: calls.append("is_available") or False
        torch.cuda.device_count = lambda: calls.append("device_count") or 0
        import clo_kernels
        print(calls)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_import_without_the_trainer_dependencies():
    """`import clo_kernels` needs torch only; the TRL drop-in says what to install."""
    res = _run("""
        import sys
        for name in ("trl", "transformers", "datasets", "peft", "accelerate"):
            sys.modules[name] = None  # not installed
        import torch, clo_kernels as ck
        h = torch.randn(4, 6, 8, requires_grad=True); w = torch.randn(11, 8)
        c, r, m = ck.quad_pairs(1)
        ck.fused_linear_clo_loss(h, w, torch.randint(0, 11, (4, 6)), chosen=c, rejected=r, nll_mask=m).loss.backward()
        try:
            import clo_kernels.integrations.trl
        except ImportError as e:
            print("ImportError:", e)
    """)
    assert res.returncode == 0, res.stderr
    assert "pip install 'clo-kernels[trl]'" in res.stdout


def test_the_library_imports_in_one_direction():
    """No import cycle among clo_kernels' modules, counting the imports inside functions too (only
    typing-only imports are left out): from the public functions down to the kernels."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "clo_kernels"
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
        graph[name] = deps
    graph = {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}
    graph["clo_kernels"] = set()  # the package's __init__ only re-exports

    def cycle_from(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    for module in graph:
        cycle = cycle_from(module, module, [module])
        assert cycle is None, " -> ".join(cycle)


def test_the_library_imports_nothing_from_the_app():
    """clo_kernels stands alone: with the app (`clo`) not installed, every module under it imports
    (one whose optional dependency, such as trl or triton, is missing is skipped) and none tries `clo`."""
    res = _run("""
        import importlib, json, pkgutil, sys
        from importlib.abc import MetaPathFinder

        class NoApp(MetaPathFinder):
            tried = []  # every attempt, so that one the library catches still shows

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "clo":
                    self.tried.append(name)
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoApp())
        skipped, app_errors = {}, []

        def failed(name, err):
            if (err.name or "").partition(".")[0] == "clo":
                app_errors.append(f"{name}: {err!r}")
            else:
                skipped[name] = repr(err)

        import clo_kernels

        names = ["clo_kernels"] + [m.name for m in pkgutil.walk_packages(
            clo_kernels.__path__, "clo_kernels.", onerror=lambda name: failed(name, sys.exc_info()[1]))]
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as err:
                failed(name, err)
        print(json.dumps({"modules": names, "skipped": skipped, "app_errors": app_errors, "tried": NoApp.tried}))
    """)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["app_errors"] == [] and out["tried"] == [], out
    root = Path(__file__).resolve().parent.parent
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
             for p in (root / "clo_kernels").rglob("*.py")}
    assert set(out["modules"]) == files  # the walk saw every module


def test_no_library_source_names_the_app():
    """No import of `clo` anywhere in clo_kernels' source, inside functions too (which the import
    test above does not run)."""
    root = Path(__file__).resolve().parent.parent / "clo_kernels"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.relative_to(root.parent)}:{node.lineno} {n}" for n in names
                      if n.partition(".")[0] == "clo"]
    assert not found, found
