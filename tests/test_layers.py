"""The shape of rcm_core (issue 21): subpackages whose imports run one way.

Reads every module under rcm_core/ with ``ast`` (nothing is imported or run), builds the module import graph
(relative imports resolved, imports inside functions included) and checks it against facts written here:

* no import cycle among the modules that hold code (the old-path shims are replaced by what they re-export);
* the layers: an import goes down or sideways, never up (two known exceptions, listed);
* nothing in rcm_core imports rcm_steps or flows;
* rcm_kernels is imported by the attention op only (rcm_core/nets/attention*.py);
* no file in rcm_core/ is over 600 lines;
* the old import paths that are shims are exactly the ones listed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "rcm_core"
MAX_LINES = 600

# Layer of each subpackage / top-level module, bottom (0) to top: an import may not go to a higher layer.
LAYERS = {
    "rcm_core.method": 0,        # TrigFlow maths, losses, samplers, EMA, RNG, config, stages
    "rcm_core.nets": 1,          # denoiser, the attention op (-> rcm_kernels), LoRA, base
    "rcm_core.parallel": 2,      # FSDP2 + AC, Ulysses context parallelism
    "rcm_core.teachers": 3,      # teacher contract, registry, embedded / real / Gaussian / mixture teachers
    "rcm_core.io": 4,            # files, checkpoints (DCP)
    "rcm_core.export": 4,        # diffusers export, model card, scheduler
    "rcm_core.train": 5,         # RCMTrainer in parts: setup, schedule, update, student, critic, checkpoint
    "rcm_core.trainer": 5,       # the old path of RCMTrainer (re-exports rcm_core.train, forwards monkeypatches)
    "rcm_core.cli": 6,
}
# Imports that go up a layer, on purpose: the samplers call the denoiser wrapper; the analytic Gaussian teacher
# fits its student with the trainer (inside a function).
UPWARD = {
    ("rcm_core.method.sampling", "rcm_core.nets.denoiser"),
    ("rcm_core.teachers.gaussian", "rcm_core.trainer"),
}
# The modules that only re-export: the old module paths (an alias of the new module, or re-exports).
SHIMS = {
    "rcm_core.trigflow", "rcm_core.losses", "rcm_core.sampling", "rcm_core.ema", "rcm_core.rng", "rcm_core.config",
    "rcm_core.stages", "rcm_core.denoiser", "rcm_core.attention", "rcm_core.lora", "rcm_core.context_parallel",
    "rcm_core.gaussian", "rcm_core.mixture", "rcm_core.scheduler", "rcm_core.checkpoint",
    "rcm_core.embedded", "rcm_core.embedded.data", "rcm_core.embedded.dit", "rcm_core.embedded.preview",
    "rcm_core.embedded.text", "rcm_core.embedded.train",
    "rcm_core.real", "rcm_core.real.attention", "rcm_core.real.fast_vae", "rcm_core.real.loading",
    "rcm_core.real.memory", "rcm_core.real.specs", "rcm_core.real.time_embedding",
    # packages that keep the API of the module they replace
    "rcm_core.parallel", "rcm_core.teachers", "rcm_core.export", "rcm_core.io",
    "rcm_core.teachers.real",    # re-exports its parts (as before the move)
    "rcm_core.train",            # the package re-exports RCMTrainer from train/trainer.py
}
KERNEL_USERS = {"rcm_core.nets.attention", "rcm_core.nets.rope", "rcm_core.nets.block_ops"}   # the ops with their own forward-mode rules
FORBIDDEN = ("rcm_steps", "flows")


def _modules() -> dict:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, tree: ast.AST) -> list:
    """(imported dotted name, line) for every import in the module, at any depth; names of rcm_core modules
    resolved to the module (``from pkg import mod`` -> pkg.mod, ``from mod import obj`` -> mod)."""
    here = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
    return out


def _owner(dotted: str):
    """The rcm_core module an imported name lives in (longest prefix that is a module), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def _is_shim(tree: ast.Module) -> bool:
    """Imports and only a docstring, ``__all__``, ``sys.modules[__name__] = ...`` and a ``__main__`` guard besides."""
    if not any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body):
        return False                   # an empty package __init__ holds no code but re-exports nothing either
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            t = node.targets[0]
            if isinstance(t, ast.Name) and t.id == "__all__":
                continue
            if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "sys.modules":
                continue
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            continue
        return False
    return True


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
RAW = {name: _imports(name, tree) for name, tree in TREES.items()}
FOUND_SHIMS = {name for name, tree in TREES.items() if _is_shim(tree)}


def _targets(name: str, seen=()) -> set:
    """The code modules behind ``name``: itself, or for a shim what it imports (through shims)."""
    if name not in FOUND_SHIMS:
        return {name}
    out = set()
    for dotted, _ in RAW[name]:
        owner = _owner(dotted)
        if owner and owner != name and owner not in seen:
            out |= _targets(owner, (*seen, name))
    return out


GRAPH = {name: sorted({t for dotted, _ in RAW[name] if (o := _owner(dotted)) and o != name for t in _targets(o)}
                      - {name})
         for name in MODULES if name not in FOUND_SHIMS}


def _layer(name: str):
    for prefix, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if name == prefix or name.startswith(prefix + "."):
            return layer
    return None


def test_the_shims_are_the_old_paths():
    assert FOUND_SHIMS == SHIMS


def test_subpackages_exist():
    for pkg in ("method", "nets", "parallel", "teachers", "teachers.embedded", "teachers.real", "export", "io", "train"):
        assert f"rcm_core.{pkg}" in MODULES and _is_package(f"rcm_core.{pkg}"), pkg


def test_no_cycles():
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in GRAPH.get(n, ()):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2
    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer_and_imports_go_down():
    bad = []
    for name, deps in GRAPH.items():
        if name == "rcm_core":
            continue
        assert _layer(name) is not None, f"{name} is in no layer"
        for d in deps:
            if d != "rcm_core" and _layer(d) > _layer(name) and (name, d) not in UPWARD:
                bad.append(f"{name} (layer {_layer(name)}) -> {d} (layer {_layer(d)})")
    assert not bad, "imports going up: " + "; ".join(bad)


def test_the_layer_exceptions_are_still_there():
    # when one goes away, drop it from UPWARD
    for a, b in UPWARD:
        assert b in GRAPH[a], (a, b)


@pytest.mark.parametrize("top", FORBIDDEN)
def test_nothing_imports_the_pipeline(top):
    hits = [f"{name}:{line} {dotted}" for name, imps in RAW.items() for dotted, line in imps
            if dotted == top or dotted.startswith(top + ".")]
    assert not hits


def test_only_the_kernel_backed_ops_import_the_kernels():
    """The Triton kernels are reached through the ops that give them their rules: attention and RoPE (nets/)."""
    users = {name for name, imps in RAW.items() for dotted, _ in imps
             if dotted == "rcm_kernels" or dotted.startswith("rcm_kernels.")}
    assert users == KERNEL_USERS
    assert all(MODULES[u].parent.name == "nets" and MODULES[u].stem in ("attention", "rope", "block_ops") for u in users)


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
