"""The seam, as the code's own structure: no import circle (function-local imports included) and no module
outside a family's file naming its class."""
import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lidit_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
  """{module: lidit_jax modules it imports anywhere in its body}."""
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lidit_jax"):
        deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                    for a in node.names)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in files)
    graph[name] = deps & set(files) - {name}
  return graph


def cycles(graph: dict) -> list:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, found = {}, {}, [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_no_import_circle():
  graph = import_graph()
  assert "lidit_jax.configs" in graph["lidit_jax.model"]  # the graph is read at all
  assert cycles(graph) == []
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and would be caught


def test_only_the_family_names_its_class():
  named = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
           if re.search(r"\bLIDiT\b", p.read_text(encoding="utf-8"))]
  assert named == ["denoisers/lidit.py"]


SHARED = ("train", "sample", "pipeline", "evaluate", "plan", "state", "model", "export", "configs", "checkpoint",
          "benchmark", "validation", "train_step")


def plugin_mentions(source: str) -> list[str]:
  """Where `source` names a plugin: a denoiser family, conditioner, objective or autoencoder kind as a string, one
  of their own config sections (`config.unet`, `config.model.refiner`, ...) or an import of a member module."""
  from lidit_jax import conditioners, denoisers, objectives
  registries = (denoisers.FAMILIES, conditioners.CONDITIONERS, objectives.OBJECTIVES)
  names = {n for r in registries for n in r} | {"patches", "vae", "dc_ae"}
  members = {m.rsplit(".", 1)[1] for r in registries for m in r.values()}
  own = {"unet", "pixart", "flow", "ddpm"}  # top-level plugin sections
  nested = {"refiner", "cam", "diff", "patch_size", "width", "depth"}  # plugin fields inside model / conditioner
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
      found.append(f"line {node.lineno}: {node.value!r}")
    elif isinstance(node, ast.Attribute) and (node.attr in own or node.attr in nested and isinstance(
        node.value, ast.Attribute) and node.value.attr in ("model", "conditioner")):
      found.append(f"line {node.lineno}: .{node.attr}")
    elif isinstance(node, ast.ImportFrom) and re.match(r"lidit_jax\.(denoisers|conditioners|objectives)\b",
                                                       node.module or ""):
      if {node.module.rsplit(".", 1)[1], *(a.name for a in node.names)} & members:
        found.append(f"line {node.lineno}: imports {node.module}")
  return found


def test_shared_code_names_no_plugin():
  """The seam: the trainer, sampler, Pipeline, evaluator, planner, state, model, exporter, configs and checkpoints
  see plugins through their registries only (defaults, checks and migrations live in each plugin's file)."""
  assert {f: plugin_mentions((PACKAGE / f"{f}.py").read_text(encoding="utf-8")) for f in SHARED} == {f: [] for f in SHARED}
  caught = plugin_mentions('from lidit_jax.denoisers import unet\nx = c.model.patch_size + c.ddpm.eta\nk = "vae"\n')
  assert sorted(caught) == ["line 1: imports lidit_jax.denoisers", "line 2: .ddpm", "line 2: .patch_size",
                            "line 3: 'vae'"]  # and would be caught


def test_imports_are_at_the_top_but_heavy_optional_ones():
  """A function imports only what most runs never load (TensorFlow datasets, torch, matplotlib, TPU kernels, ...),
  each marked `# local: why` or with its own comment; every lidit_jax import is at the top of its module."""
  local = []
  for path in PACKAGE.rglob("*.py"):
    lines = path.read_text(encoding="utf-8").split("\n")
    for fn in ast.walk(ast.parse("\n".join(lines))):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        local += [(path.name, lines[n.lineno - 1].strip()) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
  assert local and all("#" in line and "lidit_jax" not in line for _, line in local), [x for x in local if "#" not in x[1]]
