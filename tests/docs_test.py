"""The documented commands use flags and config fields that exist, and the links between the pages resolve.

Every `python -m diffusion_jax.<module> ...` command of README.md, docs/*.md and benchmarks/README.md, in fenced
code blocks and in inline code, is checked without running it:

* each `--flag` against the absl flags the module defines (read from `absl.flags.FLAGS` after importing the
  module in a fresh interpreter, so the modules' flags do not meet in one registry), with enum values and
  positional commands (`diffusion_jax.convert`'s `COMMANDS`) checked too;
* `--config=` names a config file of the repository, and each `--config.a.b=value` names a field of that config
  (after `config_base.upgrade`) and parses as `ml_collections.config_flags` parses it on the command line.

Placeholders such as `<workdir>` or `…` are accepted as values, never as flag names or config paths.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys
import warnings

import pytest
from absl import flags
from ml_collections import config_flags

from diffusion_jax import config_base

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md")

_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
_INLINE = re.compile(r"(`+)(.+?)\1", re.S)
# `python -m diffusion_jax...` (the package's commands in general) is prose, not a command.
_COMMAND = re.compile(r"python -m (diffusion_jax(?:\.[A-Za-z_]\w*)*)(\.\.\.|…)?")
_PLACEHOLDER = re.compile(r"<([A-Za-z][\w.-]*)>")
_PLACEHOLDER_MARKS = ("«", "…", "...")
_SHELL_OPERATORS = set(";&|<>()")


@dataclasses.dataclass(frozen=True)
class Command:
  where: str  # file:line
  module: str
  args: tuple[str, ...]

  def __str__(self):
    return f"{self.where}: python -m {self.module} {shlex.join(self.args)}"


def _split(text: str) -> list[str]:
  """Shell words of `text` up to the first operator (`&&`, `;`, `|`, a redirection) or comment."""
  text = _PLACEHOLDER.sub(r"«\1»", text)  # <workdir> is a placeholder, not a redirection
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = "#"
  words = []
  for word in lexer:
    if set(word) <= _SHELL_OPERATORS:
      break
    words.append(word)
  return words


def _commands_in(text: str, where: str) -> list[Command]:
  found = []
  for match in _COMMAND.finditer(text):
    if match.group(2):
      continue
    found.append(Command(where, match.group(1), tuple(_split(text[match.end() :]))))
  return found


def extract_commands(text: str, name: str) -> list[Command]:
  """The `python -m diffusion_jax...` commands of a Markdown text: fenced blocks line by line, then inline code."""
  commands = []
  for block in _FENCE.finditer(text):
    first = text.count("\n", 0, block.start(2)) + 1
    lines = block.group(2).split("\n")
    i = 0
    while i < len(lines):
      start, line = i, lines[i]
      while line.endswith("\\") and i + 1 < len(lines):  # a command continued on the next line
        i += 1
        line = line[:-1] + " " + lines[i]
      commands += _commands_in(line, f"{name}:{first + start}")
      i += 1
  # Inline code outside the fenced blocks (blanked out, keeping the line numbers); a span may wrap lines.
  prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  for span in _INLINE.finditer(prose):
    line = prose.count("\n", 0, span.start()) + 1
    commands += _commands_in(span.group(2).replace("\n", " "), f"{name}:{line}")
  return commands


def _is_placeholder(value: str) -> bool:
  return any(mark in value for mark in _PLACEHOLDER_MARKS)


# Runs `python -m <module> --helpfull` in a fresh interpreter: the command defines its flags as it always does and
# stops while parsing them, before it does anything, so every flag it accepts is then in `absl.flags.FLAGS`
# (absl's own, such as --verbosity, included). Positional commands: a `COMMANDS` tuple of the module or its
# submodules (diffusion_jax.convert's tf2jax, ...).
_SPEC_SCRIPT = r"""
import contextlib, io, json, runpy, sys
from absl import flags
name = sys.argv[1]
sys.argv = [name, "--helpfull"]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
  try:
    runpy.run_module(name, run_name="__main__", alter_sys=True)
  except SystemExit:
    pass
spec = {}
for flag_name in flags.FLAGS:
  flag = flags.FLAGS[flag_name]
  spec[flag_name] = {
    "boolean": bool(flag.boolean),
    "enum": sorted(getattr(flag.parser, "enum_values", None) or []) or None,
    "config": type(flag).__name__ == "_ConfigFlag",
  }
commands = [
  c for key, module in sorted(sys.modules.items()) if key == name or key.startswith(name + ".")
  for c in getattr(module, "COMMANDS", ())
]
print(json.dumps({"flags": spec, "commands": commands}))
"""


@functools.cache
def module_spec(module: str) -> dict:
  """The flags (name -> boolean, enum values, config file) and positional commands of a module's command line."""
  run = subprocess.run(
    [sys.executable, "-c", _SPEC_SCRIPT, module], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  if run.returncode:
    raise AssertionError(f"python -m {module} --helpfull failed: {run.stderr.strip().splitlines()[-3:]}")
  return json.loads(run.stdout.strip().splitlines()[-1])


@functools.cache
def load_config(path: str):
  """The config of a file in configs/, in this version's schema."""
  spec = importlib.util.spec_from_file_location(f"docs_test_config_{pathlib.Path(path).stem}", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_base.upgrade(module.get_config())


def _has_path(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    try:
      if part not in node:
        return False
    except TypeError:  # a leaf value
      return False
    node = node[part]
  return True


def _parse_overrides(config_file: str, overrides: list[tuple[str, str]]) -> str | None:
  """Parses the overrides as the command line would (types, literals); the error, or None."""
  argv = ["docs_test", f"--config={REPO / config_file}", *(f"--config.{k}={v}" for k, v in overrides)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)  # config_flags' file loader
      values(argv)
      values.config  # noqa: B018 - loads the file and applies the overrides
  except Exception as e:  # noqa: BLE001 - any failure to parse is the finding
    return f"{type(e).__name__}: {e}"
  return None


def check_command(command: Command, spec: dict) -> list[str]:
  """What is wrong with a documented command, against its module's flags and its config; [] if nothing."""
  known = spec["flags"]
  errors = []
  config_file = None
  overrides = []
  args = list(command.args)
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg == "--":
      positional = args[i:]
      errors += [f"unexpected argument {a!r}" for a in positional if a not in spec["commands"]]
      break
    if not arg.startswith("-") or arg == "-":
      if arg not in spec["commands"]:
        expected = f"one of {spec['commands']}" if spec["commands"] else "none"
        errors.append(f"unexpected argument {arg!r} (positional arguments: {expected})")
      continue
    name, has_value, value = arg.lstrip("-").partition("=")
    head = name.split(".", 1)[0]
    if "." in name and head in known and known[head]["config"]:
      if not has_value and i < len(args) and not args[i].startswith("-"):
        value, i = args[i], i + 1
      overrides.append((name.split(".", 1)[1], value))
      continue
    if name not in known:
      if name.startswith("no") and known.get(name[2:], {}).get("boolean") and not has_value:
        continue
      errors.append(f"--{name} is not a flag of {command.module}")
      continue
    flag = known[name]
    if flag["boolean"]:
      if has_value and value.lower() not in ("true", "false", "1", "0"):
        errors.append(f"--{name} is a boolean flag, got {value!r}")
      continue
    if not has_value:
      if i >= len(args):
        errors.append(f"--{name} needs a value")
        continue
      value, i = args[i], i + 1
    if flag["enum"] and not _is_placeholder(value) and value not in flag["enum"]:
      errors.append(f"--{name}={value} is not one of {flag['enum']}")
    if flag["config"]:
      config_file = value.split(":", 1)[0]
  if overrides and config_file is None:
    errors.append("--config.* overrides without --config=")
  if config_file is not None and config_file.endswith(".json"):
    # A workdir's config.json (written by a run, not in the repository): overrides name fields of the schema.
    from diffusion_jax import config_base  # noqa: PLC0415

    schema = config_base.get_base_config()
    errors += [f"--config.{k}: the config schema has no field {k}" for k, _ in overrides if not _has_path(schema, k)]
  elif config_file is not None:
    if _is_placeholder(config_file) or not (REPO / config_file).is_file():
      errors.append(f"--config={config_file}: no such file in the repository")
    else:
      config = load_config(config_file)
      errors += [f"--config.{k}: {config_file} has no field {k}" for k, _ in overrides if not _has_path(config, k)]
      if not errors:
        error = _parse_overrides(config_file, [(k, v) for k, v in overrides if not _is_placeholder(v)])
        if error:
          errors.append(error)
  return errors


COMMANDS = [
  command
  for path in DOC_FILES
  for command in sorted(
    extract_commands(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix()),
    key=lambda c: int(c.where.rsplit(":", 1)[1]),
  )
]


def inline_overrides(text: str, name: str) -> list[tuple[str, str]]:
  """(where, field) of the `--config.a.b=...` overrides quoted on their own in inline code (not in a command)."""
  prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  found = []
  for span in _INLINE.finditer(prose):
    code = span.group(2).replace("\n", " ")
    if code.startswith("--config.") and "python -m" not in code:
      line = prose.count("\n", 0, span.start()) + 1
      found += [
        (f"{name}:{line}", w[len("--config.") :].split("=", 1)[0]) for w in _split(code) if w.startswith("--config.")
      ]
  return found


def test_the_docs_have_commands():
  """The extraction finds the commands (a check that finds none would pass on anything)."""
  modules = {c.module for c in COMMANDS}
  assert {"diffusion_jax.main", "diffusion_jax.convert"} <= modules, modules
  assert len(COMMANDS) >= 20, [str(c) for c in COMMANDS]
  assert any(c.where.startswith("README.md:") for c in COMMANDS)
  assert any(c.where.startswith("docs/") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_documented_command(command):
  errors = check_command(command, module_spec(command.module))
  assert not errors, f"{command}\n  " + "\n  ".join(errors)


def test_inline_overrides_name_fields_of_the_schema():
  """`--config.a.b=...` quoted in the prose names a field of the config schema (config_base, every entry upgraded)."""
  schema = config_base.upgrade(config_base.get_base_config())
  quoted = [
    found
    for path in DOC_FILES
    for found in inline_overrides(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())
  ]
  assert len(quoted) >= 5, quoted
  fields = [(where, field) for where, field in quoted if re.fullmatch(r"\w+(\.\w+)+", field)]  # not `--config.*`
  unknown = [f"{where}: --config.{field}" for where, field in fields if not _has_path(schema, field)]
  assert not unknown, unknown


@pytest.mark.parametrize(
  ("args", "error"),
  [
    ("--config=configs/digits.py --workdir=runs/digits --mdoe=sample", "--mdoe is not a flag"),
    ("--config=configs/digits.py --workdir=runs/digits --mode=smaple", "is not one of"),
    ("--config=configs/digits.py --workdir=x --config.training.batch_sise=8", "has no field training.batch_sise"),
    ("--config=configs/digits.py --workdir=x --config.training.batch_size=eight", "IllegalFlagValueError"),
    ("--config=configs/digit.py --workdir=x", "no such file"),
    ("--config=configs/<name>.py --workdir=x", "no such file"),
    ("--workdir=x --config.training.batch_size=8", "without --config="),
    ("--config=configs/digits.py --workdir=x extra", "unexpected argument"),
    ("--config=runs/x/config.json --workdir=runs/x --config.eval.metrix=fid", "schema has no field eval.metrix"),
  ],
)
def test_a_wrong_command_is_caught(args, error):
  errors = check_command(Command("test", "diffusion_jax.main", tuple(_split(args))), module_spec("diffusion_jax.main"))
  assert any(error in e for e in errors), errors


def test_a_wrong_convert_command_is_caught():
  spec = module_spec("diffusion_jax.convert")
  good = "tf2jax --checkpoint=ckpt --config=configs/cifar.py --out=out --raw --noraw --step=3"
  assert check_command(Command("test", "diffusion_jax.convert", tuple(_split(good))), spec) == []
  for args, error in [("tf2jx --out=o", "unexpected argument 'tf2jx'"), ("tf2jax --ckeckpoint=c", "--ckeckpoint")]:
    errors = check_command(Command("test", "diffusion_jax.convert", tuple(_split(args))), spec)
    assert any(error in e for e in errors), errors


def test_extraction():
  text = """Train with `python -m diffusion_jax.main --config=configs/digits.py
--workdir=<workdir>`; every `python -m diffusion_jax...` command starts alike.

```bash
python -m diffusion_jax.main --config=configs/cifar.py --workdir=runs/cifar \\
  --mode=eval   # bits/dim
DIFFUSION_JAX_XLA_FLAGS=0 python -m diffusion_jax.convert tf2jax --out=o && ls o
```
"""
  assert extract_commands(text, "t.md") == [
    Command("t.md:5", "diffusion_jax.main", ("--config=configs/cifar.py", "--workdir=runs/cifar", "--mode=eval")),
    Command("t.md:7", "diffusion_jax.convert", ("tf2jax", "--out=o")),
    Command("t.md:1", "diffusion_jax.main", ("--config=configs/digits.py", "--workdir=«workdir»")),
  ]
  assert _split("--config.model.attn_resolutions='(16,)' --x=1") == ["--config.model.attn_resolutions=(16,)", "--x=1"]


# ----------------------------------------------------------------------------
# Links between the pages.
# ----------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors of a Markdown file."""
  text = _FENCE.sub("", path.read_text(encoding="utf-8"))
  seen: dict[str, int] = {}
  anchors = set()
  for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", text, re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
  text = _FENCE.sub("", path.read_text(encoding="utf-8"))
  text = _INLINE.sub("", text)
  broken = []
  for target in _LINK.findall(text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
      continue
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(f"{target}: no such file")
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      broken.append(f"{target}: no heading with that anchor")
  assert not broken, broken


_INSTALL = re.compile(r"pip install[^\n]*")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_install_lines_hold_no_placeholders(path):
  """A `pip install` line a reader copies must run as written: no `<org>`-style placeholder in it."""
  bad = [line for line in _INSTALL.findall(path.read_text(encoding="utf-8")) if _PLACEHOLDER.search(line)]
  assert not bad, bad
