"""Build the interop tests' llama.cpp driver from llama-cpp-python's source distribution.

The sdist vendors llama.cpp (``vendor/llama.cpp``): its C++ library, its converters
(``convert_lora_to_gguf.py``) and its ``gguf-py``. Everything is cached under the test cache
(``tests/models.py``'s CACHE, ``llama-cpp-python-<version>/``): the sdist, the unpacked source
(without its docs and vocab models), the CMake build, and the driver binary keyed by a hash of
driver.cpp and CMakeLists.txt, so later runs cost nothing.

    python tests/llama_cpp_driver/build.py      # download if needed, build, print the driver's path

Set ADAPTEROPS_LLAMA_CPP_SDIST to use an sdist already on disk instead of downloading one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models import CACHE  # noqa: E402

VERSION = "0.3.36"  # llama-cpp-python; the driver uses this llama.cpp's C API
ROOT = CACHE / f"llama-cpp-python-{VERSION}"
SDIST_ENV = "ADAPTEROPS_LLAMA_CPP_SDIST"
_SKIPPED = ("models/", "docs/", "media/")  # large and not needed to build or convert


class Unavailable(RuntimeError):
    """llama.cpp could not be fetched or built here; the message says why."""


def _sdist() -> Path:
    given = os.environ.get(SDIST_ENV)
    if given:
        if not Path(given).is_file():
            raise Unavailable(f"{SDIST_ENV}={given}: no such file")
        return Path(given)
    found = sorted(ROOT.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    ROOT.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "-d", str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(ROOT.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if done.returncode or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"cannot download the llama-cpp-python {VERSION} sdist ({tail[0]})")
    return found[0]


def source() -> Path:
    """The vendored llama.cpp source tree, unpacked once."""
    src = ROOT / "llama.cpp"
    if (src / "include" / "llama.h").is_file():
        return src
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = ROOT / f"llama.cpp.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(_sdist()) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and not m.name[len(prefix):].startswith(_SKIPPED):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise Unavailable(f"{_sdist()}: no vendor/llama.cpp inside")
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(src)
    return src


def driver() -> Path:
    """Path of the built driver, building it (a few minutes on 2 cores) on first use."""
    digest = hashlib.sha256(b"".join((HERE / n).read_bytes() for n in ("driver.cpp", "CMakeLists.txt"))).hexdigest()[:12]
    binary = ROOT / f"adapterops_llama_driver-{digest}"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed; it is needed to build llama.cpp")
    src, build = source(), ROOT / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", *generator, "-S", str(HERE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DLLAMA_CPP_SOURCE={src}", "-DGGML_NATIVE=OFF"]
    compile_ = ["cmake", "--build", str(build), "--target", "adapterops_llama_driver", "--parallel", str(os.cpu_count() or 2)]
    for cmd in (configure, compile_):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            log = (done.stdout + done.stderr).strip().splitlines()[-20:]
            raise Unavailable("building llama.cpp failed:\n" + "\n".join(log))
    tmp = binary.with_name(binary.name + f".tmp-{os.getpid()}")
    shutil.copy2(build / "adapterops_llama_driver", tmp)
    os.replace(tmp, binary)
    return binary


if __name__ == "__main__":
    start = time.perf_counter()
    try:
        path = driver()
    except Unavailable as exc:
        sys.exit(f"llama.cpp driver: {exc}")
    print(f"{path} ({time.perf_counter() - start:.0f} s)")
