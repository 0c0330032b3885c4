"""The package's floors: a module imports only from its own floor or below (docs/code_layout.md)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusion_jax"

# Floors bottom up; a module is matched by its dotted name (prefix match for packages).
FLOORS = [
  ("math", ["errors", "xla_flags", "schedules", "diffusion", "conditioning", "distillation", "samplers"]),
  ("network", ["models"]),
  ("runtime", ["runtime", "compat", "images", "config_base"]),
  ("data", ["data_sources", "input_pipeline"]),
  ("state", ["optimizer", "train_step", "distill_step", "workdirs", "checkpointing", "metric_writer"]),
  ("inference", ["inference"]),
  ("evaluation", ["evaluation"]),
  ("loop", ["faults", "train"]),
  (
    "face",
    ["main", "cli", "api", "commands", "distill_rounds", "workdir_config", "sampling", "convert", "plan", "__init__"],
  ),
]


def _floor(module: str) -> int:
  for level, (_, names) in enumerate(FLOORS):
    for name in names:
      if module == name or module.startswith(name + "."):
        return level
  raise AssertionError(f"diffusion_jax.{module} is on no floor; add it to FLOORS and to docs/code_layout.md's table.")


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
      parts = parts[:-1]
    yield ".".join(parts), path


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion_jax"):
      base = node.module[len("diffusion_jax") :].lstrip(".")
      for alias in node.names:
        yield f"{base}.{alias.name}".lstrip(".") if not base else base, node.lineno
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("diffusion_jax."):
          yield alias.name[len("diffusion_jax.") :], node.lineno


@pytest.mark.parametrize("module,path", list(_modules()), ids=[m for m, _ in _modules()])
def test_imports_go_down_only(module, path):
  if module == "__init__":
    return  # the public API re-exports lazily, by name
  level = _floor(module)
  for imported, line in _imports(path):
    if imported.startswith("models.") or imported == "models":
      imported = "models"
    target = _floor(imported)
    assert target <= level, (
      f"{path.name}:{line}: diffusion_jax.{module} ({FLOORS[level][0]}) imports "
      f"diffusion_jax.{imported} ({FLOORS[target][0]}), a higher floor."
    )


def test_evaluation_imports_nothing_from_the_face():
  for module, path in _modules():
    if module.startswith("evaluation"):
      for imported, _ in _imports(path):
        assert _floor(imported) < len(FLOORS) - 1, (module, imported)


# The evaluators (evaluation/evaluators/): the protocol and its machinery, one module per kind, and the running of
# them. A kind module imports no other kind, except the one it is made from.
EVALUATOR_PROTOCOL = ("base", "registry", "samples", "results")
EVALUATOR_KINDS = {"bpd": (), "rate_distortion": ("bpd",), "fid": (), "digits": (), "ode_bpd": ()}
EVALUATOR_RUNNER = "run"


def _imported_names(path: pathlib.Path):
  """Every `diffusion_jax` module or name that `path` imports, dotted, without the package prefix."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion_jax"):
      base = node.module[len("diffusion_jax") :].lstrip(".")
      for alias in node.names:
        yield f"{base}.{alias.name}".lstrip(".")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("diffusion_jax."):
          yield alias.name[len("diffusion_jax.") :]


def test_evaluators_sit_on_top_of_the_metrics():
  for module, path in _modules():
    if module.startswith("evaluation.") and not module.startswith("evaluation.evaluators"):
      for imported in _imported_names(path):
        assert not imported.startswith("evaluation.evaluators"), f"{path.name}: a metric imports {imported}"


def test_each_evaluator_kind_is_a_module_of_its_own():
  prefix = "evaluation.evaluators."
  for module, path in _modules():
    if not module.startswith(prefix):
      continue
    name = module[len(prefix) :]
    assert name in (*EVALUATOR_PROTOCOL, *EVALUATOR_KINDS, EVALUATOR_RUNNER), (
      f"evaluators/{name}.py is new: add it to EVALUATOR_PROTOCOL, EVALUATOR_KINDS or EVALUATOR_RUNNER here and "
      "to docs/code_layout.md."
    )
    kinds = {i[len(prefix) :].split(".")[0] for i in _imported_names(path) if i.startswith(prefix)} & set(
      EVALUATOR_KINDS
    )
    if name in EVALUATOR_PROTOCOL:
      assert not kinds, f"evaluators/{name}.py (the protocol) imports the kinds {kinds}"
    elif name in EVALUATOR_KINDS:
      assert kinds <= set(EVALUATOR_KINDS[name]), f"evaluators/{name}.py imports the kinds {kinds}"
      assert "registry.register" in path.read_text(), f"evaluators/{name}.py registers no evaluator"


def test_only_the_runtime_calls_apply_or_builds_meshes():
  for module, path in _modules():
    if (
      module in ("runtime",)
      or module.startswith("models")
      or module in ("evaluation.inception", "evaluation.fid", "evaluation.digits_metric")
    ):
      continue  # the runtime; the networks themselves; Inception and the digit classifier are not the U-Net
    text = path.read_text()
    for needle in ("Mesh(", ".apply({", "unet.from_config(", "diffusion_lib.from_config(", "diffusion.from_config("):
      assert needle not in text, f"{path.name} contains {needle!r}: use diffusion_jax.runtime"
