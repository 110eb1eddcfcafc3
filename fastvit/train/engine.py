"""The training run of ``fastvit-train``: process group, model, optimiser, loop, evaluation,
checkpoints and the run directory. timm supplies the optimiser, schedule, EMA, Mixup and losses;
torchrun the processes; this file only wires them."""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fastvit
from fastvit.train import checkpoint as ckpt_io
from fastvit.train import data as data_mod

METRICS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "peak_mem_mb")


class ConfigError(ValueError):
    """An argument that cannot be used: the message names it."""


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """One process, or torchrun's (RANK / WORLD_SIZE / LOCAL_RANK): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is visible")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def finish(d: Dist) -> None:
    """Every rank waits here at the end of a run, before the process group is destroyed and Python exits.

    Gloo's worker threads drop a finished collective's tensors after waking the caller. A tensor made in
    Python (all_gather_object's buffers, all_sum's) then needs the GIL to be freed; if that happens while
    the interpreter is finalizing, the worker dies in "terminate called without an active exception"
    (seen once in CI, rank 1 of the FSDP run, which returns straight after its last all_gather_object).
    A barrier holds no Python tensor and lasts until the slowest rank is done saving and plotting.
    """
    if d.world > 1:
        dist.barrier()


def all_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def parse_kwargs(items: list[str] | None) -> dict:
    """``["depth=4", "qkv_bias=False"]`` -> ``{"depth": 4, "qkv_bias": False}`` (Python literals, else strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-kwargs {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def small_vit_defaults(img_size: int) -> dict:
    patch = 16 if img_size >= 64 else max(1, img_size // 4)
    return dict(patch_size=patch, dim=64, depth=4, heads=4, mlp_dim=128, dim_head=16)


def build_model(cfg: dict, num_classes: int, in_chans: int) -> nn.Module:
    """``vit`` / ``simple_vit`` (vit-pytorch's arguments), ``timm:<name>`` (through fastvit.optimize),
    or any fastvit.create_model name; ``--model-kwargs`` go to the constructor."""
    name, kw, img = cfg["model"], parse_kwargs(cfg["model_kwargs"]), cfg["img_size"]
    try:
        if name in ("vit", "simple_vit"):
            if cfg["drop_path"]:
                raise ConfigError(f"--drop-path: {name} (vit-pytorch's architecture) has no drop path")
            args = {**small_vit_defaults(img), **({"dropout": 0.1, "emb_dropout": 0.1} if name == "vit" else {}), **kw}
            cls = fastvit.ViT if name == "vit" else fastvit.SimpleViT
            return cls(image_size=img, num_classes=num_classes, channels=in_chans, **args)
        if name.startswith("timm:"):
            import timm

            base = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=cfg["drop_path"])
            try:
                model = timm.create_model(name[5:], img_size=img, **base, **kw)
            except TypeError:  # a timm model without an img_size argument
                model = timm.create_model(name[5:], **base, **kw)
            fastvit.optimize(model, backend=cfg["backend"])
            return model
        return fastvit.create_model(name, num_classes=num_classes, img_size=img, in_chans=in_chans,
                                    drop_path_rate=cfg["drop_path"], **kw)
    except ConfigError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"--model {name} --model-kwargs {' '.join(cfg['model_kwargs'] or [])}: {e}") from None


def load_trained(path: str | os.PathLike, argument: str = "checkpoint", ema: bool = True,
                 backend: str | None = None) -> tuple[nn.Module, dict]:
    """The model a fastvit-train checkpoint holds (its EMA weights when it kept them and ``ema``), in eval
    mode on the CPU, and the checkpoint (``config``, ``classes``, ...); ``backend`` replaces the one it was
    trained with (for ``timm:`` models, which optimize pins it). Errors name ``argument``. The file is
    unpickled: open only checkpoints you trust."""
    state = ckpt_io.load(path, argument)
    cfg = state["config"]
    in_chans = state.get("in_chans", 1 if cfg["data"] is None else 3)  # checkpoints before in_chans was saved
    model = build_model(dict(cfg, backend=backend or cfg.get("backend", "auto")), len(state["classes"]), in_chans)
    weights = state["ema"] if ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{argument} {path}: its weights do not fit the model its config builds ({e})") from None
    return model.eval(), state


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (FSDP shards each one)."""
    for path in ("blocks", "transformer.layers"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if isinstance(m, (nn.ModuleList, nn.Sequential)):  # vit-pytorch's layers are (attention, feed-forward) pairs
            return [b for layer in m for b in (layer if isinstance(layer, nn.ModuleList) else [layer])]
    raise ConfigError(f"--fsdp: {type(model).__name__} has no blocks / transformer.layers to shard")


def load_pretrained(model: nn.Module, path: str) -> None:
    from fastvit.models.convert import CheckpointError

    try:
        fastvit.load_checkpoint(model, path, filter_head=True)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--pretrained {path}: {e}") from None


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


class Meter:
    """Sums over an epoch: loss * n, top-1 and top-5 hits, n (reduced over ranks at the end)."""

    def __init__(self, state=None):
        self.loss, self.top1, self.top5, self.n = state or (0.0, 0.0, 0.0, 0.0)

    def add(self, loss: float, top1: float, top5: float, n: float) -> None:
        self.loss += loss * n
        self.top1 += top1
        self.top5 += top5
        self.n += n

    def state(self):
        return (self.loss, self.top1, self.top5, self.n)

    def result(self, d: Dist) -> tuple[float, float, float]:
        loss, top1, top5, n = all_sum(list(self.state()), d)
        n = max(n, 1.0)
        return loss / n, 100.0 * top1 / n, 100.0 * top5 / n


def hits(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 hits in a batch (timm's ``accuracy``, which caps k at the class count)."""
    from timm.utils import accuracy

    top1, top5 = accuracy(logits, target, topk=(1, 5))
    n = len(target) / 100.0
    return top1.item() * n, top5.item() * n


class Run:
    def __init__(self, cfg: dict, d: Dist):
        self.cfg, self.d = cfg, d
        self.dir = Path(cfg["output"])
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg["amp"]]
        torch.manual_seed(cfg["seed"])
        self.data = self._data()
        nc = cfg["num_classes"] or len(self.data.classes)
        if cfg["num_classes"] and cfg["num_classes"] != len(self.data.classes):
            source = (f"--checkpoint {cfg['checkpoint']}: its model has" if cfg["eval_only"] else
                      f"--num-classes {cfg['num_classes']}: asks for")
            raise ConfigError(f"{source} {cfg['num_classes']} classes but the data has {len(self.data.classes)}")
        cfg["num_classes"] = nc
        self.model = build_model(cfg, nc, self.data.in_chans)
        if cfg["pretrained"]:
            load_pretrained(self.model, cfg["pretrained"])
        self.model.to(d.device)
        self.raw = self.model
        torch.manual_seed(cfg["seed"] + 1_000 * d.rank)  # one init on every rank; dropout differs per rank
        self._wrap()
        if not cfg["eval_only"]:
            self._optimizer()

    # -- setup
    def _data(self):
        c = self.cfg
        if c["data"] is None:
            data = data_mod.digits(c["img_size"], seed=0)
        else:
            data = data_mod.image_folder(c["data"], c["img_size"], auto_augment=c["auto_augment"] or None,
                                         re_prob=c["reprob"])
        self.train_set = data_mod.SeededSamples(data.train, c["seed"])
        self.train_order = data_mod.ShardedOrder(len(data.train), shuffle=True, seed=c["seed"], rank=self.d.rank,
                                                 world_size=self.d.world, drop_last=True)
        self.val_set = data_mod.MaskedPadding(data.val)
        self.val_order = data_mod.ShardedOrder(len(data.val), shuffle=False, seed=0, rank=self.d.rank,
                                               world_size=self.d.world, pad_past_end=True)
        return data

    def _wrap(self):
        c, d = self.cfg, self.d
        if c["fsdp"]:
            from torch.distributed.fsdp import fully_shard

            if d.world == 1:
                raise ConfigError("--fsdp: run under torchrun with more than one process")
            for block in blocks_of(self.model):
                fully_shard(block)
            fully_shard(self.model)
        elif d.world > 1:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(self.model) if c["compile"] else self.model

    def _optimizer(self):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        c = self.cfg
        if c["layer_decay"] and not hasattr(self.raw, "group_matcher"):
            raise ConfigError(f"--layer-decay: {type(self.raw).__name__} has no group_matcher (timm's layer grouping)")
        self.optimizer = create_optimizer_v2(self.raw, opt=c["opt"], lr=c["lr"], weight_decay=c["weight_decay"],
                                             layer_decay=c["layer_decay"])
        if len(self.train_order) < c["batch_size"]:
            raise ConfigError(f"--batch-size {c['batch_size']}: larger than this process's {len(self.train_order)} "
                              f"training images")
        self.updates_per_epoch = len(self.train_order) // c["batch_size"] // c["grad_accum"]
        if self.updates_per_epoch == 0:
            raise ConfigError(f"--grad-accum {c['grad_accum']}: more micro-batches than an epoch has")
        if c["train_steps"]:
            self.updates_per_epoch = min(self.updates_per_epoch, c["train_steps"])
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=c["epochs"], warmup_epochs=c["warmup_epochs"],
            warmup_lr=c["lr"] * 0.01, min_lr=c["min_lr"], step_on_epochs=False, updates_per_epoch=self.updates_per_epoch,
        )
        self.scaler = torch.amp.GradScaler(self.d.device.type, enabled=c["amp"] == "fp16")
        self.ema = None
        if c["ema"]:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.raw, decay=c["ema"])
        self.mixup = None
        if (c["mixup"] or c["cutmix"]) and c["batch_size"] % 2:
            raise ConfigError(f"--batch-size {c['batch_size']}: Mixup / CutMix pair samples, so it must be even")
        if c["mixup"] or c["cutmix"]:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=c["mixup"], cutmix_alpha=c["cutmix"], label_smoothing=c["label_smoothing"],
                               num_classes=c["num_classes"])
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()
        elif c["label_smoothing"]:
            self.criterion = LabelSmoothingCrossEntropy(c["label_smoothing"])
        else:
            self.criterion = nn.CrossEntropyLoss()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype)

    # -- checkpoints
    def model_state(self, module: nn.Module | None = None) -> dict:
        module = module or self.raw
        if self.cfg["fsdp"] and module is self.raw:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def optimizer_state(self) -> dict:
        if self.cfg["fsdp"]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.raw, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save(self, name: str, position: dict, meter: Meter, best: float, history: list) -> None:
        model, opt = self.model_state(), self.optimizer_state()  # collectives: every rank
        per_rank = [(meter.state(), ckpt_io.rng_state())]
        if self.d.world > 1:
            per_rank = [None] * self.d.world
            dist.all_gather_object(per_rank, (meter.state(), ckpt_io.rng_state()))
        if not self.d.main:
            return
        state = {
            "config": self.cfg, "classes": self.data.classes, "in_chans": self.data.in_chans, "world_size": self.d.world,
            "model": model,
            "ema": None if self.ema is None else self.model_state(self.ema.module), "optimizer": opt,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ranks": per_rank, "position": position, "best_top1": best, "history": history,
        }
        ckpt_io.atomic_save(state, self.dir / name)

    def restore(self, state: dict) -> None:
        c = self.cfg
        if state["world_size"] != self.d.world:
            raise ConfigError(f"--resume {c['resume']}: the run used {state['world_size']} processes, this one has "
                              f"{self.d.world}: resume with the same torchrun --nproc_per_node")
        try:
            if c["fsdp"]:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.raw, state["model"], options=opts)
                set_optimizer_state_dict(self.raw, self.optimizer, state["optimizer"], options=opts)
            else:
                self.raw.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"--resume {c['resume']}: the checkpoint does not fit this model: {e}") from None
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["ranks"][self.d.rank][1])

    # -- the loop
    def train_epoch(self, epoch: int, start_batch: int, meter: Meter, updates: int, best: float, history: list):
        c, d = self.cfg, self.d
        self.model.train()
        self.train_set.epoch = epoch
        self.train_order.set_epoch(epoch, start_batch * c["batch_size"])
        batches = data_mod.loader(self.train_set, self.train_order, c["batch_size"], c["workers"],
                                  d.device.type == "cuda", drop_last=True)
        total = self.updates_per_epoch * c["grad_accum"]
        bar = None
        if d.main and c["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start_batch, desc=f"epoch {epoch + 1}/{c['epochs']}", leave=False,
                       dynamic_ncols=True)
        seen, t0 = 0, time.perf_counter()
        for i, (x, y) in enumerate(batches, start=start_batch):
            if i >= total:
                break
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            last_micro = (i + 1) % c["grad_accum"] == 0
            sync = contextlib.nullcontext()
            if isinstance(self.model, nn.parallel.DistributedDataParallel) and not last_micro:
                sync = self.model.no_sync()
            with sync:
                with self.autocast():
                    logits = self.forward(x)
                    loss = self.criterion(logits, target)
                self.scaler.scale(loss / c["grad_accum"]).backward()
            loss_value = loss.item()
            if math.isnan(loss_value):
                raise FloatingPointError(f"epoch {epoch + 1}, batch {i}: the loss is NaN (try a lower --lr or --amp off)")
            top1, top5 = (0.0, 0.0) if self.mixup is not None else hits(logits.detach(), y)
            meter.add(loss_value, top1, top5, len(y))
            seen += len(y)
            if last_micro:
                if c["clip_grad"]:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.raw.parameters(), c["clip_grad"])
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1
                self.scheduler.step_update(updates)
                if self.ema is not None:
                    self.ema.update(self.raw, step=updates)
                if c["ckpt_every"] and updates % c["ckpt_every"] == 0 and i + 1 < total:
                    self.save("last.pt", {"epoch": epoch, "batch": i + 1, "updates": updates}, meter, best, history)
                if c["max_updates"] and updates >= c["max_updates"] and i + 1 < total:
                    if bar is not None:
                        bar.close()
                    return {"stopped_at": i + 1, "updates": updates}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
        if bar is not None:
            bar.close()
        return {"updates": updates, "img_per_s": seen / max(time.perf_counter() - t0, 1e-9)}

    @torch.no_grad()
    def evaluate(self, module: nn.Module | None = None) -> tuple[float, float, float]:
        c, d = self.cfg, self.d
        module = module or self.forward
        module.eval()
        meter = Meter()
        loss_fn = nn.CrossEntropyLoss(reduction="none")
        batches = data_mod.loader(self.val_set, self.val_order, c["batch_size"], c["workers"], d.device.type == "cuda",
                                  drop_last=False)
        for i, (x, y, real) in enumerate(batches):
            if c["val_steps"] and i >= c["val_steps"]:
                break
            x, y, real = x.to(d.device), y.to(d.device), real.to(d.device)
            with self.autocast():
                logits = module(x)
            losses = loss_fn(logits.float(), y)
            keep = real.bool()
            n = keep.sum().item()
            if n:
                meter.add(losses[keep].mean().item(), *hits(logits[keep], y[keep]), n)
        return meter.result(d)

    def fit(self) -> dict:
        c, d = self.cfg, self.d
        epoch, start_batch, updates, best, history, meter = 0, 0, 0, -1.0, [], Meter()
        if c["resume"]:
            state = ckpt_io.load(Path(c["resume"]) / "last.pt", "--resume")
            self.restore(state)
            pos = state["position"]
            epoch, start_batch, updates = pos["epoch"], pos["batch"], pos["updates"]
            best, history, meter = state["best_top1"], state["history"], Meter(state["ranks"][d.rank][0])
        if d.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(json.dumps(self.cfg, indent=1, sort_keys=True) + "\n")
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        for epoch in range(epoch, c["epochs"]):
            out = self.train_epoch(epoch, start_batch, meter, updates, best, history)
            updates = out["updates"]
            if "stopped_at" in out:  # --max-updates reached mid-epoch: stop as if interrupted there
                self.save("last.pt", {"epoch": epoch, "batch": out["stopped_at"], "updates": updates}, meter, best,
                          history)
                return history[-1] if history else {}
            img_s = out["img_per_s"]
            start_batch = 0
            train_loss, train_top1, _ = meter.result(d)
            meter = Meter()
            val_loss, val_top1, val_top5 = self.evaluate(self.ema.module if self.ema is not None else None)
            row = {
                "epoch": epoch + 1, "train_loss": train_loss, "train_top1": None if self.mixup else train_top1,
                "val_loss": val_loss, "val_top1": val_top1, "val_top5": val_top5 if c["num_classes"] >= 5 else None,
                "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": img_s * d.world,
                "peak_mem_mb": torch.cuda.max_memory_allocated(d.device) / 2**20 if d.device.type == "cuda" else None,
            }
            history.append(row)
            improved = val_top1 > best
            best = max(best, val_top1)
            self.save("last.pt", {"epoch": epoch + 1, "batch": 0, "updates": updates}, meter, best, history)
            if improved:
                self.save("best.pt", {"epoch": epoch + 1, "batch": 0, "updates": updates}, meter, best, history)
            if d.main:
                write_metrics(self.dir, history)
                plot(self.dir, history)
                print(format_row(row, c["epochs"]), flush=True)
            if c["max_updates"] and updates >= c["max_updates"]:
                break
        return history[-1] if history else {}


# ------------------------------------------------------------------------------------------------
# the run directory
# ------------------------------------------------------------------------------------------------


def format_row(row: dict, epochs: int) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}  acc {pct(row['train_top1'])}  "
            f"val loss {row['val_loss']:.4f}  top-1 {pct(row['val_top1'])}  top-5 {pct(row['val_top5'])}  "
            f"lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s")


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row[k] is None else row[k]) for k in METRICS})
    os.replace(tmp, run_dir / "metrics.csv")


def plot(run_dir: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], label="train")
    a.plot(ep, [r["val_loss"] for r in history], label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    if history[0]["train_top1"] is not None:
        b.plot(ep, [r["train_top1"] for r in history], label="train top-1")
    b.plot(ep, [r["val_top1"] for r in history], label="val top-1")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
