"""The SITCOM_* environment variables, read in one place.

    SITCOM_CACHE              model cache (default ~/.cache/sitcom)
    SITCOM_BACKEND            auto | torch | llamacpp (sitcom.model.serving)
    SITCOM_THREADS            auto | N: threads for decoding (sitcom.decoding.threads)
    SITCOM_PRECISION          auto | fp32 | bf16: autocast (sitcom.decoding.generation)
    SITCOM_LLAMA_EXTRA_BUFTS  auto | on | off: llama.cpp's repacked/AMX kernels
                              (sitcom.model.llamacpp_check)

sitcom_config() reads them as they are now (a test or a start may change the environment);
each value is checked where it is used, with that variable's own one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SitcomConfig:
    cache: Path  # SITCOM_CACHE, ~ expanded
    backend: str  # SITCOM_BACKEND, stripped and lower-cased
    threads: str  # SITCOM_THREADS, stripped and lower-cased; "auto" when empty
    precision: str  # SITCOM_PRECISION as given
    llama_extra_bufts: str  # SITCOM_LLAMA_EXTRA_BUFTS as given (its error shows it)


def sitcom_config(environ: Mapping[str, str] | None = None) -> SitcomConfig:
    """The SITCOM_* settings from `environ` (default: os.environ), defaults filled in."""
    env = os.environ if environ is None else environ
    return SitcomConfig(
        cache=Path(env.get("SITCOM_CACHE") or Path.home() / ".cache" / "sitcom").expanduser(),
        backend=env.get("SITCOM_BACKEND", "auto").strip().lower(),
        threads=env.get("SITCOM_THREADS", "auto").strip().lower() or "auto",
        precision=env.get("SITCOM_PRECISION", "auto"),
        llama_extra_bufts=env.get("SITCOM_LLAMA_EXTRA_BUFTS", "auto"),
    )
