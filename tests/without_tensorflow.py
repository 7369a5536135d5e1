"""Runs a module as `python -m MODULE ARGS...` would, in an interpreter where TensorFlow is absent.

    python tests/without_tensorflow.py MODULE [ARGS...]

Every import finder is wrapped so that `tensorflow` and its submodules are not found: `import
tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec("tensorflow")` is None, as
when the package is not installed (libraries that check for it take their TF-free paths). At
exit it fails if a module named tensorflow was loaded anyway.
"""

import runpy
import sys


class _WithoutTensorflow:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, name):  # invalidate_caches, find_distributions, ...
        return getattr(self._finder, name)


def main() -> None:
    sys.meta_path[:] = [_WithoutTensorflow(finder) for finder in sys.meta_path]
    module, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = "."  # as `python -m` has it: the working directory, not tests/
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        loaded = [name for name in sys.modules if name.partition(".")[0] == "tensorflow"]
        if loaded:
            print(f"tensorflow was imported: {loaded[:3]}", file=sys.stderr)
            sys.exit(3)


if __name__ == "__main__":
    main()
