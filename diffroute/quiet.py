"""Silence library log messages a diffroute user cannot act on (and only those, only while they would appear)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_loading():
    """Raise transformers' and diffusers' log level to ERROR for the duration of the block.

    Used around (a) importing diffusers' pipeline classes: on a CPU-only install transformers warns that its
    image processors fall back from torchvision to PIL, which is right here (torchvision has no CPU build);
    (b) loading the emoji model, whose text encoder is deliberately MiniLM, not the T5 that PixArt expects.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(saved[0])
        dlog.set_verbosity(saved[1])
