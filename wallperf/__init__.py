"""wallperf: an MLPerf-style LoadGen harness and SUT for LLM inference, measured
against the memory wall.

Everything imports as `wallperf.<package>`. In a checkout the sub-packages are
the repository's top-level folders (setup.cfg maps them): wallperf/ itself holds
the top layer (the command line, the run driver, benchmarks, tools), then
audit/, harness/ (LoadGen, hardware and config mechanics), sut/, kernels/.
"""
from pathlib import Path as _Path

# In a checkout, the sub-packages are this folder's siblings: found here even
# without an install (a child process given only PYTHONPATH). An installed
# wheel has them inside this folder and no setup.cfg beside it.
_root = _Path(__file__).resolve().parent.parent
if (_root / "setup.cfg").is_file() and (_root / "sut").is_dir() and str(_root) not in __path__:
    __path__.append(str(_root))
del _Path, _root
