"""The fence around dependency details (diffusion_jax/compat.py): each test fails, naming the dependency, when a
release changes the detail the package relies on; and no other module reaches into a dependency's internals."""

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import compat

PACKAGE = pathlib.Path(compat.__file__).resolve().parent


def _save_and_truncate(tmp_path):
  """A small Orbax checkpoint whose largest data file is cut in half; returns (directory, that file)."""
  directory = tmp_path / "ckpt"
  tree = {"a": jnp.arange(4096, dtype=jnp.float32), "b": {"c": jnp.ones((64, 64), jnp.float32)}}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree)
  data = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data, f"Orbax no longer writes OCDBT data files under d/: {sorted(directory.rglob('*'))}"
  damaged = max(data, key=lambda p: p.stat().st_size)
  with open(damaged, "r+b") as f:
    f.truncate(damaged.stat().st_size // 2)
  return directory, tree, damaged


def test_tensorstore_still_names_the_array_and_the_truncated_file(tmp_path):
  directory, tree, damaged = _save_and_truncate(tmp_path)
  compat.quiet_abandoned_reads()
  with pytest.raises(Exception) as info:  # noqa: PT011 - whatever Orbax raises; its text is what is checked
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.restore(directory, jax_tree_like(tree))
  described = compat.describe_restore_error(info.value)
  # The structured description, not the fallback (the error's first line): if this fails, TensorStore or Orbax
  # changed the text compat._READ_ERROR / compat._VALUE_SIZE read.
  assert re.fullmatch(
    r"array \S+ cannot be read: the data file (\S+) holds [\d,]+ bytes, but the array is stored up to byte [\d,]+ "
    r"\(the file is truncated\)",
    described,
  ), described
  assert described.split("the data file ")[1].split(" holds")[0] == str(damaged)


def jax_tree_like(tree):
  import jax  # noqa: PLC0415

  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def test_orbax_still_reads_each_array_in_the_coroutine_whose_reports_are_dropped():
  spec = importlib.util.find_spec("orbax.checkpoint")
  root = pathlib.Path(spec.origin).parent
  pattern = re.compile(rf"^\s*async def {compat.ABANDONED_READ}\(", re.M)
  found = [p for p in root.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8", errors="replace"))]
  assert found, (
    f"orbax-checkpoint no longer defines the coroutine {compat.ABANDONED_READ}: update compat.ABANDONED_READ "
    "(the reports of reads a failed restore abandons would reach the console again)"
  )


def test_cloud_tpu_vm_detection(monkeypatch):
  have_libtpu = importlib.util.find_spec("libtpu") is not None
  if not have_libtpu:
    assert not compat.on_cloud_tpu_vm()
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    compat.importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real_find_spec(name, *a)
  )
  monkeypatch.setattr(compat.glob, "glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern else [])
  assert compat.on_cloud_tpu_vm()
  monkeypatch.setattr(compat.glob, "glob", lambda pattern: [])
  assert not compat.on_cloud_tpu_vm()


def test_libtpu_without_tpu(monkeypatch):
  # libtpu installed, no TPU driver device files, no accelerator plugin in jax_plugins: the command line leaves
  # the TPU out of JAX's platforms (tests/plan_test.py: test_command_line_with_libtpu_and_no_tpu_is_quiet).
  real_find_spec = importlib.util.find_spec
  plugins = {"jax_plugins": None}

  def find_spec(name, *a):
    if name == "libtpu":
      return object()
    if name == "jax_plugins":
      return plugins["jax_plugins"]
    return real_find_spec(name, *a)

  monkeypatch.setattr(compat.importlib.util, "find_spec", find_spec)
  monkeypatch.setattr(compat.glob, "glob", lambda pattern: [])
  assert compat.libtpu_without_tpu()
  monkeypatch.setattr(compat.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
  assert not compat.libtpu_without_tpu()  # a TPU VM
  monkeypatch.setattr(compat.glob, "glob", lambda pattern: [])
  # An accelerator plugin (jax-cuda12-plugin installs jax_plugins.xla_cuda12): JAX's platforms are left alone.
  fake = types.ModuleType("jax_plugins")
  fake.__path__ = []
  plugins["jax_plugins"] = object()
  monkeypatch.setitem(sys.modules, "jax_plugins", fake)
  monkeypatch.setattr(compat.pkgutil, "iter_modules", lambda path: iter([("finder", "xla_cuda12", True)]))
  assert not compat.libtpu_without_tpu()
  monkeypatch.setattr(compat.pkgutil, "iter_modules", lambda path: iter([]))
  assert compat.libtpu_without_tpu()


def _calls_and_imports(path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.lineno, f"from {node.module} import"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, f"import {alias.name}"
    elif isinstance(node, (ast.Assign, ast.AugAssign)):
      for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
        yield node.lineno, ast.unparse(target)


def test_no_module_outside_compat_reaches_into_dependency_internals():
  private = re.compile(r"(^from (jax|jaxlib|flax|optax|orbax|tensorstore|grain)\S*\._)|(\b_src\b)")
  patched = re.compile(r"^sys\.(modules\[|unraisablehook$|excepthook$)")
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name == "compat.py":
      continue
    for lineno, text in _calls_and_imports(path):
      if private.search(text) or patched.search(text):
        offenders.append(f"{path.relative_to(PACKAGE)}:{lineno}: {text}")
  assert not offenders, offenders


def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise():
  """cli.limit_malloc_arenas (resident memory stays flat over many checkpoints: benchmarks/soak.py)."""
  code = "from diffusion_jax import cli; print(cli.limit_malloc_arenas())"
  env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
  assert out.strip() == "True"
  env["MALLOC_ARENA_MAX"] = "4"  # the user's own setting wins
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
  assert out.strip() == "False"
