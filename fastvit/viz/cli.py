"""``fastvit-viz`` (``python -m fastvit.viz``): attention maps, position-embedding similarity and patch
filters of a model, as PNGs. ``--model`` is a ``fastvit.create_model`` name (random weights unless
``--weights``) or a fastvit-train checkpoint; without ``--image`` it uses a picture an installed package
ships (scikit-learn's sample photo, or a digit for a model trained on the digits), so it runs offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fastvit
from fastvit.viz.maps import attention_maps
from fastvit.viz.plots import plot_attention, plot_patch_embed_filters, plot_pos_embed_similarity

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class CliError(Exception):
    """A bad argument: printed as ``fastvit-viz: error: ...``, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvit-viz", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, out):
        s.add_argument("--model", required=True, help="a fastvit.create_model name, or a fastvit-train checkpoint (.pt; "
                                                      "it is unpickled: only files you trust)")
        s.add_argument("--weights", help="a local timm / vit-pytorch / T2T-ViT checkpoint for a --model name")
        s.add_argument("--img-size", type=int, help="the model's image size (a --model name; default: its own)")
        s.add_argument("--out", default=out, help=f"the PNG to write (default: {out})")
        s.add_argument("--dpi", type=int, default=100)

    a = sub.add_parser("attention", help="where the class token looks, and the attention rollout, over an image")
    common(a, "attention.png")
    a.add_argument("--image", help="an image file (default: a picture an installed package ships)")
    a.add_argument("--layer", type=int, help="the last attention layer to show (default: the last one; negative "
                                             "counts from the end)")
    a.add_argument("--discard-ratio", type=float, default=0.9, help="rollout: the share of weakest links dropped")
    a.add_argument("--head-fusion", choices=("mean", "max", "min"), default="max")
    s = sub.add_parser("pos-embed", help="cosine similarity of the patches' position embeddings")
    common(s, "pos_embed.png")
    f = sub.add_parser("filters", help="the first principal components of the patch-embedding filters")
    common(f, "filters.png")
    f.add_argument("--components", type=int, default=28)
    return p


def load_model(spec: str, weights: str | None = None, img_size: int | None = None) -> tuple[torch.nn.Module, dict]:
    """The model ``--model`` names, in eval mode, and how it reads images: ``img_size``, ``in_chans``,
    ``mean`` / ``std``, ``digits`` (trained on fastvit-train's built-in digits)."""
    path = Path(spec)
    if path.suffix in (".pt", ".pth") or path.is_file():
        from fastvit.train.engine import load_trained

        if weights or img_size:
            raise CliError("--weights and --img-size go with a --model name; a checkpoint holds its own")
        try:
            model, state = load_trained(path, "--model", backend="auto")
        except (FileNotFoundError, ValueError) as e:
            raise CliError(str(e)) from None
        cfg = state["config"]
        digits = cfg["data"] is None
        in_chans = state.get("in_chans", 1 if digits else 3)
        mean, std = ((0.5,) * in_chans, (0.5,) * in_chans) if digits else IMAGENET
        return model, dict(img_size=cfg["img_size"], in_chans=in_chans, mean=mean, std=std, digits=digits)
    kwargs = {} if img_size is None else {"img_size": img_size}
    try:
        model = fastvit.create_model(spec, pretrained=weights is not None, checkpoint_path=weights, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise CliError(f"--model {spec}: {e}") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = img_size or _model_img_size(model) or cfg.get("input_size", (3, 224, 224))[-1]
    return model.eval(), dict(img_size=size, in_chans=getattr(model, "in_chans", 3), mean=cfg.get("mean", IMAGENET[0]),
                              std=cfg.get("std", IMAGENET[1]), digits=False)


def _model_img_size(model) -> int | None:
    for owner in (getattr(model, "patch_embed", None), getattr(model, "tokens_to_token", None)):
        size = getattr(owner, "img_size", None)
        if size is not None:
            return int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    return None


def _resize_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) in [0, 1]: the shorter side resized to ``size`` (bicubic, antialiased), centre-cropped square."""
    H, W = img.shape[-2:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    img = torch.nn.functional.interpolate(img[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top: top + size, left: left + size].clamp(0, 1)


def load_image(path: str | None, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input (C, S, S), normalised; the same picture in [0, 1] to show) for the model ``info`` describes."""
    size, chans = info["img_size"], info["in_chans"]
    if path is None:
        if info["digits"] or chans == 1:
            from sklearn.datasets import load_digits

            img = torch.tensor(load_digits().images[0], dtype=torch.float32)[None] / 16.0
        else:
            from sklearn.datasets import load_sample_image

            img = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float() / 255.0
    else:
        try:
            from PIL import Image

            import numpy as np

            with Image.open(path) as im:
                pixels = np.asarray(im.convert("L" if chans == 1 else "RGB"), dtype=np.float32)
            img = torch.from_numpy(pixels.reshape(pixels.shape[0], pixels.shape[1], -1)).permute(2, 0, 1) / 255.0
        except (OSError, ValueError) as e:
            raise CliError(f"--image {path}: not a readable image ({type(e).__name__}: {e})") from None
    if img.shape[0] != chans:
        img = img.mean(0, keepdim=True) if chans == 1 else img.expand(chans, -1, -1)
    shown = _resize_crop(img, size)
    mean = torch.tensor(info["mean"], dtype=torch.float32)[:chans, None, None]
    std = torch.tensor(info["std"], dtype=torch.float32)[:chans, None, None]
    return (shown - mean) / std, shown


def run(argv: list[str] | None = None) -> Path:
    """Run the command line; returns the PNG written. Raises CliError on bad arguments."""
    args = _parser().parse_args(argv)
    model, info = load_model(args.model, args.weights, args.img_size)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out {args.out}: the picture is written as PNG: give a path ending in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "attention":
            x, shown = load_image(args.image, info)
            layers = None
            if args.layer is not None:
                from fastvit.viz.maps import _select, attention_layers

                count = len(attention_layers(model))
                last = _select("--layer", args.layer, count, "attention layers")[0] if count else 0
                layers = list(range(last + 1))
            maps = attention_maps(model, x, layers=layers)
            plot_attention(shown, maps, args.discard_ratio, args.head_fusion, out=out, dpi=args.dpi)
        elif args.command == "pos-embed":
            plot_pos_embed_similarity(model, out=out, dpi=args.dpi)
        else:
            plot_patch_embed_filters(model, args.components, out=out, dpi=args.dpi)
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        out = run(argv)
    except CliError as e:
        print(f"fastvit-viz: error: {e}", file=sys.stderr)
        return 2
    print(f"fastvit-viz: wrote {out}")
    return 0
