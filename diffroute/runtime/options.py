"""How a pipeline runs: device, dtype, attention back-end and torch.compile, set once for the CLI and the app."""

from __future__ import annotations

from dataclasses import dataclass

from diffroute.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Runtime:
    """Run options of one loaded pipeline (defaults: as the model loads, default attention, eager)."""

    device: str | None = None
    dtype: str | None = None  # one of DTYPES, None: as loaded
    attention: str = "default"  # see attention.ATTENTION_HELP
    compile: str = "none"  # see compiling.COMPILE_MODES
    threads: int | None = None  # intra-op CPU threads per process; None: as launched (see set_threads)

    def torch_dtype(self):
        import torch

        if self.dtype is None:
            return None
        if self.dtype not in DTYPES:
            raise InputError(f"Unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}.")
        return getattr(torch, self.dtype)

    def check(self) -> None:
        """Refuse unknown names before any model loads."""
        from diffroute.runtime.attention import check_attention_name
        from diffroute.runtime.compiling import COMPILE_MODES

        self.torch_dtype()
        if self.compile not in COMPILE_MODES:
            raise InputError(f"Unknown compile mode {self.compile!r}; known: {', '.join(COMPILE_MODES)}.")
        check_attention_name(self.attention)
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise InputError(f"threads must be a positive integer, got {self.threads!r}.")


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op CPU threads in this process (None: leave torch's setting) and return the count in force.

    On some CPUs the bits of a CPU result depend on this count: MKL and oneDNN choose their GEMM and convolution
    kernels by it (an Intel Xeon here gave different pixels with 1 and 2 threads; an AMD EPYC did not). accelerate
    gives every process it launches on a CPU one thread by default, while a lone process uses every core, so images
    made by 1 and N processes are bitwise equal only when each process uses the same count: pass the same --threads.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_with(model: str, runtime: Runtime):
    """`load_pipeline(model)` on the runtime's device and dtype, its attention back-end set and its transformer
    compiled as asked (compilation happens lazily, at the first call)."""
    from diffroute.runtime.attention import set_attention
    from diffroute.runtime.compiling import compile_transformer
    from diffroute.zoo import load_pipeline

    runtime.check()
    set_threads(runtime.threads)
    pipe = load_pipeline(model, device=runtime.device, dtype=runtime.torch_dtype())
    set_attention(pipe, runtime.attention)
    compile_transformer(pipe, runtime.compile)
    return pipe
