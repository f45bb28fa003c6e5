"""Process set-up for experiment scripts: allocator settings and JAX's persistent compile cache.

On CPU, glibc's malloc maps and unmaps XLA's large scratch buffers on every call; the page faults
cost ~30% of a training step (``../shared/bench/CPU-NOTES.md``). The fix is three environment
variables, read by glibc at process start, so :func:`setup` re-executes the script once with them
set (before JAX is imported). Set ``RLHF_JAX_NO_REEXEC=1`` to opt out.
"""

from __future__ import annotations

import os
import sys

ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "xla")


def allocator_env_missing() -> dict[str, str]:
    return {k: v for k, v in ALLOCATOR_ENV.items() if os.environ.get(k) != v}


def reexec_with_allocator_env() -> None:
    """Re-execute this process with :data:`ALLOCATOR_ENV` unless already set (or opted out)."""
    missing = allocator_env_missing()
    if not missing or os.environ.get("RLHF_JAX_NO_REEXEC") == "1":
        return
    if "jax" in sys.modules:  # too late to matter for JAX's own buffers; do not restart silently
        print("rlhf_jax.launch: jax already imported; allocator settings not applied",
              file=sys.stderr)
        return
    env = dict(os.environ, **missing)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache (``RLHF_JAX_CACHE_DIR`` or ``~/.cache``)."""
    import jax

    path = path or os.environ.get("RLHF_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def cpu_record(path: str = "/proc/cpuinfo") -> dict:
    """The CPU a benchmark ran on, for its JSON: model name, SIMD / AMX feature flags, cores."""
    from rlhf_jax.precision import cpu_flags

    model = ""
    try:
        with open(path) as f:
            model = next((ln.partition(":")[2].strip() for ln in f
                          if ln.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags(path) or frozenset()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": model, "simd_flags": simd, "cpu_count": os.cpu_count()}


def setup() -> None:
    """Call first thing in an experiment script's ``__main__``: allocator re-exec + compile cache."""
    reexec_with_allocator_env()
    enable_compilation_cache()
