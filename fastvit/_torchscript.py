"""TorchScript is not supported (PyTorch has deprecated it): scripting a fastvit module, or a model that
holds one, raises one clear error that says what to use instead."""

from __future__ import annotations

MESSAGE = (
    "{name}: fastvit's fused ops do not support TorchScript (torch.jit.script), which PyTorch has deprecated. "
    "Use torch.export.export(model, args) (or torch.compile) instead; for a timm / vit-pytorch / T2T-ViT model "
    "passed through fastvit.optimize, fastvit.restore(model) gives back its original, scriptable modules."
)


def not_scriptable(self):
    """``__prepare_scriptable__`` of fastvit's modules: torch.jit.script calls it on every submodule first."""
    raise RuntimeError(MESSAGE.format(name=type(self).__name__))
