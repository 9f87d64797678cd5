"""edgec: a graph-rewriting compiler that makes ONNX models small and fast for edge devices.

Python API::

    import edgec
    result = edgec.compile("model.onnx", "out.onnx", target="cpu", verify=True)
    print(result.report["after"]["params"])

    ir = edgec.load("model.onnx")                      # the IR (onnx-graphsurgeon underneath)
    edgec.run_passes(ir, ["fold_batchnorm", "eliminate_dead"])
    edgec.save(ir, "out.onnx")

Importing ``edgec`` is cheap: the API (and onnx, ONNX Runtime, numpy behind it) is imported on
first use, so the command line can handle Ctrl-C during those imports like anywhere else.
"""

__version__ = "0.1.0"

from .errors import EdgecError, InternalError, UserError, VerificationError  # noqa: E402

_LAZY = {
    "IR": "ir", "from_model": "loader", "load": "loader", "save": "loader",
    "FixedPoint": "pipeline", "Pass": "pipeline", "PassManager": "pipeline", "get_pass": "pipeline",
    "register": "pipeline", "registry": "pipeline", "run_passes": "pipeline",
    "compile": "api", "inspect": "api",
}

__all__ = ["IR", "EdgecError", "FixedPoint", "InternalError", "Pass", "PassManager", "UserError",
           "VerificationError", "compile", "from_model", "get_pass", "inspect", "load", "register",
           "registry", "run_passes", "save", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        if _LAZY[name] == "pipeline":  # the pass registry holds the built-in passes once they are imported
            importlib.import_module(".passes", __name__)
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgec' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
