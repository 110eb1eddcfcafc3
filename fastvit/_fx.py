"""FX symbolic tracing (``torch.fx.symbolic_trace``, torchvision's feature extraction, timm's FX
features): fastvit's ops, and the helpers that look at shapes or dtypes, are leaf functions.

A traced graph holds one ``call_function`` node per op call, with the op's public front as its
target: running the graph runs the op (checks, autocast rule, backend selection) on real tensors.
Outside FX tracing a leaf is its function plus one flag check.
"""

from __future__ import annotations

import functools

from torch.fx import Proxy
try:  # torch >= 2.7; is_fx_tracing is also true under torch.export (and warns)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _tracing
except ImportError:  # pragma: no cover
    from torch.fx._symbolic_trace import is_fx_tracing as _tracing
from torch.fx.node import map_aggregate


def _find_proxy(args, kwargs) -> Proxy | None:
    found = []

    def visit(a):
        if not found and isinstance(a, Proxy):
            found.append(a)
        return a

    map_aggregate((args, kwargs), visit)
    return found[0] if found else None


def leaf(fn):
    """Make ``fn`` a leaf of FX traces: called on Proxies it records itself instead of running."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _tracing():
            proxy = _find_proxy(args, kwargs)
            if proxy is not None:
                return proxy.tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper
