"""``fastvit-train`` / ``python -m fastvit.train``: train and evaluate ViTs with fastvit's kernels.

With no arguments it trains a small ViT on scikit-learn's bundled handwritten digits. ``--data DIR``
takes an ImageFolder tree (``DIR/train/<class>/*``, ``DIR/val/<class>/*``). ``torchrun
--nproc_per_node N -m fastvit.train ...`` runs DDP (or FSDP2 with ``--fsdp``). A run directory holds
``config.json``, ``metrics.csv``, ``curves.png``, ``last.pt`` and ``best.pt``; ``--resume RUN_DIR``
continues it exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "parse_args"]

DIGITS_DEFAULTS = dict(img_size=8, epochs=30, batch_size=64, lr=2e-3, warmup_epochs=2, workers=0)
FOLDER_DEFAULTS = dict(img_size=224, epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5, workers=4)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvit-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: sklearn's digits)")
    g.add_argument("--img-size", type=int, default=None, help="images are resized to this (digits: 8, folders: 224)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (digits: 0, folders: 4)")
    g.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('' for none)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (folders)")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit",
                   help="vit, simple_vit, a fastvit.create_model name (vit_*, deit_*, t2t_vit_*), or timm:<name>")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="constructor arguments")
    g.add_argument("--num-classes", type=int, default=None, help="default: the data's class count")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local checkpoint (timm, vit-pytorch or T2T-ViT layout); the head is reset when it differs")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--backend", default="auto", help="fastvit backend: auto, eager, triton, cuda, or family=name,...")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="per process, per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--warmup-epochs", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms, biases and embeddings")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay (timm's group_matcher)")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.9998)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None, help="default: bf16 on a GPU, off on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-steps", type=int, default=None, help="cap optimiser steps per epoch (quick runs)")
    g.add_argument("--val-steps", type=int, default=None, help="cap validation batches (quick runs)")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="run directory (default: runs/<time>-<model>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR from its last.pt")
    g.add_argument("--ckpt-every", type=int, default=0, metavar="N", help="also save last.pt every N optimiser steps")
    g.add_argument("--max-updates", type=int, default=None, metavar="N",
                   help="stop after N optimiser steps in all (a time-boxed run; --resume continues it)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the validation set")
    g.add_argument("--checkpoint", default=None, metavar="PATH", help="the checkpoint --eval-only evaluates")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per block) under torchrun")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """The run's configuration: defaults filled in for the dataset (digits or a folder)."""
    from fastvit.train.engine import ConfigError

    cfg = vars(args).copy()
    for k, v in (DIGITS_DEFAULTS if cfg["data"] is None else FOLDER_DEFAULTS).items():
        if cfg[k] is None:
            cfg[k] = v
    if cfg["amp"] is None:
        import torch

        cfg["amp"] = "bf16" if (cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") \
            else "off"
    for name in ("epochs", "batch_size", "grad_accum", "img_size"):
        if cfg[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {cfg[name]}")
    if cfg["workers"] < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg['workers']}")
    if cfg["eval_only"] and not cfg["checkpoint"]:
        raise ConfigError("--eval-only needs --checkpoint PATH")
    if cfg["fsdp"] and cfg["ema"]:
        raise ConfigError("--ema is not supported with --fsdp (the EMA copy would be sharded)")
    if cfg["output"] is None:
        cfg["output"] = str(Path(cfg["resume"]) if cfg["resume"] else
                            Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg['model'].replace(':', '_')}")
    return cfg


def parse_args(argv=None) -> dict:
    return resolve(parser().parse_args(argv))


def main(argv=None) -> int:
    import fastvit
    from fastvit.train import checkpoint as ckpt_io
    from fastvit.train import engine
    from fastvit.train.data import DataError

    try:
        cfg = parse_args(argv)
        if cfg["resume"]:
            saved = json.loads((Path(cfg["resume"]) / "config.json").read_text()) \
                if (Path(cfg["resume"]) / "config.json").is_file() else None
            if saved is None:
                raise engine.ConfigError(f"--resume {cfg['resume']}: no config.json there (not a fastvit-train run)")
            keep = {k: cfg[k] for k in ("resume", "progress", "max_updates", "workers", "device")}
            cfg = {**saved, **keep, "output": cfg["resume"]}
        d = engine.setup_distributed(cfg["device"])
        try:
            fastvit.use_backend(cfg["backend"])
        except (ValueError, TypeError, fastvit.BackendUnavailableError) as e:
            raise engine.ConfigError(f"--backend {cfg['backend']}: {e}") from None
        if cfg["eval_only"]:
            state = ckpt_io.load(cfg["checkpoint"], "--checkpoint")
            for k in ("model", "model_kwargs", "img_size", "num_classes"):
                if k in state["config"]:
                    cfg[k] = state["config"][k]
            run = engine.Run(cfg, d)
            try:
                run.raw.load_state_dict(state["model"])
            except RuntimeError as e:
                raise engine.ConfigError(f"--checkpoint {cfg['checkpoint']}: does not fit the model: {e}") from None
            loss, top1, top5 = run.evaluate()
            if d.main:
                print(f"{cfg['checkpoint']}: val loss {loss:.4f}  top-1 {top1:.2f}%  top-5 {top5:.2f}%", flush=True)
            engine.finish(d)
            return 0
        run = engine.Run(cfg, d)
        if d.main and run.data.skipped:
            print(f"skipped {run.data.skipped} files that are not readable images", file=sys.stderr)
        final = run.fit()
        if d.main and final:
            print(f"done: val top-1 {final['val_top1']:.2f}% after {final['epoch']} epochs; "
                  f"{cfg['output']}/metrics.csv, curves.png, last.pt, best.pt", flush=True)
        engine.finish(d)
        return 0
    except (engine.ConfigError, DataError, FileNotFoundError) as e:
        print(f"fastvit-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
