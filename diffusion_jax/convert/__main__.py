"""`python -m diffusion_jax.convert <command> --flags`: runs the converter's command line, `cli.main`.

absl's `--help` prints the docstring of the `__main__` module, so this module
takes the command's documentation, `cli`'s docstring, as its own.
"""

from diffusion_jax.convert import cli

__doc__ = cli.__doc__

if __name__ == "__main__":
  cli.main()
