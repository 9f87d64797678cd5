"""edgec: a graph-rewriting compiler that makes ONNX models small and fast for edge devices.

Python API::

    import edgec
    result = edgec.compile("model.onnx", "out.onnx", target="cpu", verify=True)
    print(result.report["after"]["params"])

    ir = edgec.load("model.onnx")                      # the IR (onnx-graphsurgeon underneath)
    edgec.run_passes(ir, ["fold_batchnorm", "eliminate_dead"])
    edgec.save(ir, "out.onnx")
"""

__version__ = "0.1.0"

from .errors import EdgecError, InternalError, UserError, VerificationError  # noqa: E402
from .ir import IR  # noqa: E402
from .loader import from_model, load, save  # noqa: E402
from .pipeline import FixedPoint, Pass, PassManager, get_pass, register, registry, run_passes  # noqa: E402
from .api import compile, inspect  # noqa: E402

__all__ = ["IR", "EdgecError", "FixedPoint", "InternalError", "Pass", "PassManager", "UserError",
           "VerificationError", "compile", "from_model", "get_pass", "inspect", "load", "register",
           "registry", "run_passes", "save", "__version__"]
