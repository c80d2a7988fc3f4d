"""Train a tissue segmenter (a small U-Net) on slices and their masks, and score it on a split: Dice per tissue
(CSF, grey matter, white matter) and their mean. It judges reconstructions, codec output and samples from outside
the VQ-VAE (predict.py --segmenter, compress.py rd --segmenter).

    python segment.py train --dataset OASIS --data-root ~/data/keras_png_slices_data --max-minutes 30
    python segment.py train --dataset demo --epochs 3
    python segment.py train --resume runs/segmenter-OASIS-000          # continue an interrupted run
    python segment.py score --checkpoint runs/segmenter-OASIS-000/best.pt --split test

A training run folder holds config.json, metrics.csv, checkpoints/epoch_NNN.pt, best.pt (highest validation mean
Dice), last.pt and dice.png (validation Dice per epoch, drawn when the run ends). Scoring writes per_slice.csv,
summary.json, segmentations.png (slice / true mask / predicted mask, the worst slices first) and dice_hist.png into
<run>/score_<split> (or --out).
"""
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from anatomy.tissues import (
    check_segmenter_fits,
    dice_columns,
    dice_summary,
    dice_table,
    segment_images,
    worst_first,
)
from anatomy.vocabulary import TISSUES
from dataset import build_dataset, demo_settings
from imaging.slices import to_float
from modules import SegmenterConfig, UNet
from training.checkpoints import SegmenterTrainConfig, load_segmenter, load_split, rebuild_segmenter, run_dir_of
from training.flags import config_or_error, parse_config_flags, split_subcommand
from training.protocol import EpochRun, SavedEpochs, run_epochs
from training.runs import reserve_run_folder, restore_training, resume_checkpoint, resumed_config
from training.schedule import TimeBudget, schedule_done
from training.steps import adam_and_schedule, check_one_batch, on_device, optimizer_step, speed_settings
from utils import (
    ArgumentParser,
    UserError,
    add_runtime_flags,
    add_shared_flag,
    apply_runtime_flags,
    autocast,
    choose_device,
    claim_outputs,
    exits_with_one_line,
    plot_curves,
    plot_histograms,
    plot_image_rows,
    read_csv,
    seed_everything,
    set_rng_state,
    stop_on_interrupts,
    use_bf16,
    write_csv,
    write_json,
)

# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "device", "max_minutes", "data_root", "resume")


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def load_data(cfg: SegmenterTrainConfig, model_cfg: SegmenterConfig):
    """The train split and the validation slices (all, or cfg.val_slices spread evenly), with their masks."""
    train_data, val_data = (build_dataset(cfg.dataset, cfg.data_root, split, skip_bad=cfg.skip_bad, masks=True)
                            for split in ("train", "validate"))
    try:
        model_cfg.check_fits(*train_data.image_shape)
        model_cfg.check_fits(*val_data.image_shape)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_one_batch("the train split's slices", len(train_data), cfg.batch_size)
    if cfg.val_slices and cfg.val_slices < len(val_data):
        keep = torch.linspace(0, len(val_data) - 1, cfg.val_slices).round().long().unique()
        val_data.images, val_data.masks = val_data.images[keep], val_data.masks[keep]
    return train_data, val_data


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice) averaged over the three tissues: cross-entropy alone is dominated by the
    background, which is most of a slice; the Dice term weighs each tissue as the score does."""
    logits = logits.float()  # (B, 4, H, W)
    probs = logits.softmax(1)[:, 1:]  # (B, 3, H, W)
    truth = F.one_hot(masks.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    overlap = (probs * truth).sum((0, 2, 3))
    soft_dice = (2 * overlap + 1) / (probs.sum((0, 2, 3)) + truth.sum((0, 2, 3)) + 1)
    return F.cross_entropy(logits, masks.long()) + (1 - soft_dice).mean()


def train_epoch(model, opt, scheduler, data, cfg, device, amp, budget, progress) -> tuple[float, int]:
    """One epoch: cfg.epoch_slices slices (or all) in a fresh random order, drawn from torch's global generator, so
    a resumed run (which restores it) draws the same ones. Returns the mean loss and the slices seen."""
    model.train()
    n = min(cfg.epoch_slices or len(data), len(data))
    order = torch.randperm(len(data))[:n]
    steps_per_epoch = n // cfg.batch_size
    total, seen = torch.zeros((), dtype=torch.float64), 0
    for step in range(steps_per_epoch):
        pick = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = to_float(data.images[pick].unsqueeze(1).to(device))  # (B, 1, H, W)
        y = data.masks[pick].to(device)  # (B, H, W)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            loss = segmentation_loss(model(x), y)
        optimizer_step(loss, model, opt, scheduler, cfg.grad_clip)
        total += loss.detach().double().cpu() * len(pick)
        seen += len(pick)
        progress.update(1)
        if step % 25 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        budget.observe(scheduler, steps_per_epoch, device)
        if schedule_done(scheduler) or (budget and step % 10 == 9 and budget.up(device)):
            break
    return float(total) / max(seen, 1), seen


def validate(model, data, cfg, device, amp) -> dict:
    """Per-tissue and mean Dice over the validation slices, per slice then averaged."""
    pred = segment_images(model, data.images, device, amp, 2 * cfg.batch_size)
    summary = dice_summary(dice_table(pred, data.masks))
    return {f"val_{c}": summary[c]["mean"] for c in summary}


def open_run_folder(cfg: SegmenterTrainConfig, model_cfg: SegmenterConfig, train_data, val_data, device,
                    start_epoch: int):
    """Reserve and lock the run folder (training/runs.py), write config.json and say what the run is; only once
    the data and the model are known to work, so a bad flag or file leaves nothing behind."""
    folder, lock = reserve_run_folder(cfg.out, Path("runs"), f"segmenter-{cfg.dataset}", "segment.py",
                                      resuming=cfg.resume is not None)
    cfg = replace(cfg, out=str(folder))
    (folder / "checkpoints").mkdir(exist_ok=True)
    write_json(folder / "config.json", {"train": asdict(cfg), "model": asdict(model_cfg)})
    print(f"run {folder}: {cfg.dataset} {'x'.join(map(str, train_data.image_shape))}, train {len(train_data)} / "
          f"validate {len(val_data)} slices; U-Net {model_cfg.base_channels} channels x {model_cfg.levels} levels; "
          f"{device}, {'bf16' if use_bf16(cfg.precision, device) else 'fp32'}, epochs {start_epoch}..{cfg.epochs}")
    return cfg, lock


def train(cfg: SegmenterTrainConfig, model_cfg: SegmenterConfig, state: dict | None = None,
          started: float | None = None) -> Path:
    """`started`: time.monotonic() when the command started, where --max-minutes' clock starts (default: now)."""
    device = choose_device(cfg.device)
    speed_settings(device)
    seed_everything(cfg.seed)

    # Data
    train_data, val_data = load_data(cfg, model_cfg)
    slices = min(cfg.epoch_slices or len(train_data), len(train_data))
    steps_per_epoch = slices // cfg.batch_size

    # Model, optimiser and schedule; a resumed run's state
    model, opt, scheduler = segmenter_and_optimiser(cfg, model_cfg, device, cfg.epochs * steps_per_epoch)
    start_epoch, best_dice = 1, None
    if state is not None:
        restore_training(state, model, opt, scheduler, cfg.epochs * steps_per_epoch, cfg.resume)
        set_rng_state(state["rng"])
        start_epoch, best_dice = state["epoch"] + 1, state["best_val_dice"]

    # Run folder, reserved and locked only now
    cfg, lock = open_run_folder(cfg, model_cfg, train_data, val_data, device, start_epoch)

    # Loop: the epoch protocol
    run_epochs(SegmenterRun(cfg, model_cfg, model, opt, train_data, val_data, device,
                            saved=SavedEpochs("segment.py train", Path(cfg.out), start_epoch, cfg.resume),
                            lock=lock, budget=TimeBudget(cfg.max_minutes, len(val_data), cfg.batch_size, verbose=True,
                                                         started=started),
                            best=best_dice, scheduler=scheduler, steps_per_epoch=steps_per_epoch))
    return Path(cfg.out)


def segmenter_and_optimiser(cfg, model_cfg: SegmenterConfig, device, total_steps: int):
    """A new U-Net (on `device`, channels_last unless --no-channels-last), its Adam optimiser and LR schedule."""
    model = on_device(UNet(model_cfg), device, cfg.channels_last)
    return (model, *adam_and_schedule(model, cfg, total_steps))


class SegmenterRun(EpochRun):
    """The segmenter's epochs, as the epoch protocol (training/protocol.py) runs them: best.pt has the highest
    validation mean Dice."""
    BEST_COLUMN, HIGHER_IS_BETTER = "val_dice_mean", True

    def __init__(self, cfg, model_cfg, model, opt, train_data, val_data, device, **protocol):
        super().__init__(device=device, epochs=cfg.epochs, **protocol)
        self.cfg, self.model_cfg, self.model, self.opt = cfg, model_cfg, model, opt
        self.train_data, self.val_data, self.amp = train_data, val_data, autocast(cfg.precision, device)

    def train_and_validate(self, epoch: int):
        cfg, scheduler = self.cfg, self.scheduler
        t0, first_step = time.perf_counter(), scheduler.last_epoch
        with tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                  dynamic_ncols=True) as progress:
            loss, seen = train_epoch(self.model, self.opt, scheduler, self.train_data, cfg, self.device, self.amp,
                                     self.budget, progress)
        train_seconds = time.perf_counter() - t0
        self.saved.check_finite(epoch, "train loss", loss, cfg)  # before anything of it is saved
        t_val = time.perf_counter()
        scores = validate(self.model, self.val_data, cfg, self.device, self.amp)
        timing = (train_seconds / max(1, scheduler.last_epoch - first_step), time.perf_counter() - t_val)
        return {"epoch": epoch, "train_loss": loss, **scores, "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": time.perf_counter() - t0, "train_img_per_s": seen / train_seconds}, timing

    def checkpoint(self, row: dict, stopping: bool) -> dict:
        cfg = self.cfg
        return {"kind": "segmenter", "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best_val_dice": self.best,
                "model_config": asdict(self.model_cfg), "train_config": asdict(cfg), "metrics": row,
                "time_budget": self.budget.state(done=stopping),
                "demo_settings": demo_settings(cfg.data_root) if cfg.dataset == "demo" else None}

    def report(self, row: dict, best: bool, stopping: bool):
        """dice.png when the run ends; the epoch's log line."""
        if stopping or row["epoch"] == self.epochs:
            plot_curves(read_csv(self.saved.run_dir / "metrics.csv"), "epoch",
                        {f"val_dice_{t.lower()}": t for t in TISSUES} | {"val_dice_mean": "mean"},
                        self.saved.run_dir / "dice.png", "Validation Dice", "Dice")
        tqdm.write(f"epoch {row['epoch']:3d} | train loss {row['train_loss']:.4f} | val Dice CSF "
                   f"{row['val_dice_csf']:.4f} GM {row['val_dice_gm']:.4f} WM {row['val_dice_wm']:.4f} mean "
                   f"{row['val_dice_mean']:.4f} | lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s "
                   f"{row['train_img_per_s']:.1f} img/s" + (" *" if best else ""))


def configs_from_args(run_args: dict, model_args: dict):
    """The configs of a new run, or of a resumed one (its saved configs, with the flags a resume may change)."""
    if "resume" in run_args:
        path, state = resume_checkpoint(run_args, model_args, RESUMABLE_OVERRIDES, "segmenter")
        model, saved_cfg = rebuild_segmenter(state, path)
        return resumed_config(saved_cfg, run_args, path, state), model.config, state
    cfg = config_or_error(SegmenterTrainConfig, **run_args)
    if cfg.epoch_slices:
        check_one_batch("--epoch-slices", cfg.epoch_slices, cfg.batch_size,
                        "raise --epoch-slices or lower --batch-size (--epoch-slices 0: the whole split)")
    return cfg, config_or_error(SegmenterConfig, **model_args), None


# ---------------------------------------------------------------------------------------------------------
# Scoring a split
# ---------------------------------------------------------------------------------------------------------

def parse_score_args(argv):
    p = ArgumentParser(prog="segment.py score", description="Score a trained segmenter on a split: Dice per tissue "
                       "and their mean, per slice and summarised, and figures.")
    add_shared_flag(p, "--checkpoint", "the segmenter, written by segment.py train", required=True)
    add_shared_flag(p, "--split", "the one scored (default: test)", default="test")
    add_shared_flag(p, "--data-root")
    p.add_argument("--skip-bad", action="store_true", help="skip slices whose image or mask is missing or bad")
    add_shared_flag(p, "--out", "default: <run>/score_<split>")
    add_runtime_flags(p, batch_size=32)
    return p.parse_args(argv)


SCORE_OUTPUTS = ("per_slice.csv", "summary.json", "segmentations.png", "dice_hist.png")  # in score's --out


def score(args) -> dict:
    device = apply_runtime_flags(args)
    model, cfg, state = load_segmenter(args.checkpoint, device)
    data = load_split(cfg, args.split, args.data_root, args.skip_bad, state["demo_settings"], masks=True)
    check_segmenter_fits(model, data.image_shape, f"{data.name} {args.split}")
    out = claim_outputs(args.out or run_dir_of(args.checkpoint) / f"score_{args.split}", SCORE_OUTPUTS,
                        "segment.py score")

    pred = segment_images(model, data.images, device, autocast(args.precision, device), args.batch_size,
                          desc="segmenting")
    table = dice_table(pred, data.masks)
    write_csv(out / SCORE_OUTPUTS[0], [{"file": f, **d} for f, d in zip(data.files, dice_columns(table))])
    summary = {"checkpoint": str(args.checkpoint), "epoch": state["epoch"], "dataset": data.name,
               "split": args.split, "slices": len(data), "dice": dice_summary(table, pred, data.masks),
               "dice_of_a_tissue_in_neither_mask": 1.0}
    write_json(out / SCORE_OUTPUTS[1], summary)
    draw_scores(data, pred, table, out, f"{data.name} {args.split}")
    d = summary["dice"]
    print(f"{data.name} {args.split}: {len(data)} slices | Dice CSF {d['dice_csf']['mean']:.4f} GM "
          f"{d['dice_gm']['mean']:.4f} WM {d['dice_wm']['mean']:.4f} mean {d['dice_mean']['mean']:.4f} (pooled "
          f"{d['pooled']['dice_mean']:.4f}) | written to {out}")
    return summary


def draw_scores(data, pred, table, out: Path, what: str):
    """segmentations.png: slice / true mask / prediction for the 4 worst slices and 4 spread over the split;
    dice_hist.png: the per-slice Dice of each tissue."""
    picks = list(dict.fromkeys(worst_first(table, 4) + torch.linspace(0, len(data) - 1, 4).long().tolist()))
    rows = [[(to_float(data.images[i]), Path(data.files[i]).name[:28]), (data.masks[i], "true mask"),
             (pred[i], f"predicted (Dice {table[i, -1]:.3f})")] for i in picks]
    plot_image_rows(rows, out / SCORE_OUTPUTS[2])
    plot_histograms({t: table[:, k] for k, t in enumerate(TISSUES)}, out / SCORE_OUTPUTS[3],
                    f"Per-slice Dice on {what}", "Dice")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

COMMANDS = {"train": "train the tissue segmenter on a dataset's masks", "score": "score a split's Dice"}


def main(argv=None):
    started = time.monotonic()  # --max-minutes' clock: loading the data and a resume's reload are spent from it
    stop_on_interrupts()  # a scheduler's SIGTERM stops like Ctrl-C, and a second signal cannot change what it reports
    argv = sys.argv[1:] if argv is None else list(argv)
    with exits_with_one_line(interrupted="interrupted; nothing was saved"):
        command, flags = split_subcommand(argv, "segment.py", COMMANDS, "train --dataset demo")
        if command == "score":
            return score(parse_score_args(flags))
        cfg, model_cfg, state = configs_from_args(*parse_config_flags(
            flags, "segment.py train", __doc__, SegmenterTrainConfig, SegmenterConfig, "model (SegmenterConfig)"))
        return train(cfg, model_cfg, state, started)


if __name__ == "__main__":
    main()
