"""Where the benchmarks keep their inputs and scratch space: ``bench/.data/``, made on first
use, so every benchmark runs from a fresh clone (the big layer is built once, then reused)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Inputs (the benchmark layer, extracted copies) and per-run scratch directories.
DATA = HERE / ".data"
#: The layer the benchmarks read by default, made by make_layer.py from /usr/lib.
DEFAULT_LAYER = DATA / "usrlib.tar.gz"


def data_dir() -> Path:
    """``bench/.data``, created if missing (it is not in git)."""
    DATA.mkdir(parents=True, exist_ok=True)
    return DATA


def ensure_layer(path: str | Path = DEFAULT_LAYER) -> Path:
    """The benchmark layer at ``path``, made with make_layer.py first if it does not exist."""
    data_dir()
    layer = Path(path)
    if not layer.exists():
        print(f"{layer} does not exist yet: making it from /usr/lib with bench/make_layer.py "
              "(once; a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, str(HERE / "make_layer.py"), str(layer)], check=True)
    return layer


def require_modules(*names: str) -> None:
    """Stop at start-up, with how to install them, if baseline libraries are missing (they are
    the ``bench`` extra, not dependencies of soci)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise SystemExit(f"this benchmark's baselines need {', '.join(missing)}: "
                         "pip install -e '.[bench]' (or pip install " + " ".join(missing) + ")")
