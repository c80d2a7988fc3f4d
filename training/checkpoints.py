"""Checkpoints: the run configs every checkpoint carries, its schema, atomic saving, safe loading, and rebuilding the
exact model (and the data it was trained on) from the file alone.

A checkpoint is a dict saved with torch.save and loaded with weights_only=True, so a file someone hands you cannot
run code; every key it must hold is then checked for its type, its configs are rebuilt field by field with their
types checked, and its weights must fit the model its own config describes and be finite.
"""
import io
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dataset import DATASETS, DEMO_MARKER, build_dataset, default_demo_root, generate_demo
from denoising.noise import is_noise_spec
from imaging.slices import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, SLICE_AXES
from modules import (
    PRESETS,
    VQVAE,
    Prior,
    PriorConfig,
    SegmenterConfig,
    UNet,
    VQVAEConfig,
    build_prior,
    config_from_dict,
    first_failure,
)
from utils import DEVICES, MAX_BATCH_SIZE, PRECISIONS, DataError, UserError, one_line_reason, write_atomically

CHECKPOINT_FORMAT = "vqvae-mri/1"
SCHEDULES = ("constant", "cosine")
MIRRORS = {"none": None, "rows": -2, "columns": -1}  # train_prior.py --mirror: the image axis flipped, if any


# ---------------------------------------------------------------------------------------------------------
# Run configs
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything train.py needs besides the model config; one flag per field."""
    dataset: str = "OASIS"            # OASIS, ADNI, demo or nifti (a folder of .nii/.nii.gz volumes)
    data_root: str | None = None      # the dataset's folder or zip; default for demo: data/demo beside the code
    image_size: int | None = None     # centre-crop to a square, resize to this (NIfTI: crop/pad); default: own size
    val_fraction: float = 0.1         # ADNI: share of train patients held out for validation; NIfTI: share of subjects
    test_fraction: float = 0.1        # NIfTI: share of subjects held out for testing
    slice_axis: str = "axial"         # NIfTI: cut the volumes across this anatomical axis (axial, coronal or sagittal)
    clip_percentile: float = 0.5      # NIfTI: clip each volume to its [p, 100 - p] percentiles, then scale to 8 bits
    min_brain_fraction: float = 0.05  # NIfTI: skip slices with a smaller share of nonzero pixels after that
    skip_bad: bool = False            # skip unreadable or odd-sized image files or bad volumes instead of stopping
    preset: str = "default"           # seed, default or hq: the model and its optimiser settings
    epochs: int = 40                  # epochs to train (with --max-minutes: at most)
    batch_size: int | None = None     # images per step and process; default: the preset's
    lr: float | None = None           # Adam learning rate; default: the preset's
    lr_schedule: str | None = None    # constant or cosine (after warmup); default: the preset's
    warmup_steps: int | None = None   # linear learning-rate warmup; default: the preset's
    grad_clip: float | None = None    # clip the gradient norm to this (0: no clipping); default: the preset's
    precision: str = "auto"           # auto (bf16 where the hardware has it), bf16 or fp32
    channels_last: bool = True        # channels_last memory format (faster convolutions on CPU and GPU)
    compile: bool = False             # torch.compile the model (one CUDA GPU: with CUDA graphs) and the CPU SSIM
    images_on_device: bool = True     # CUDA: keep the decoded uint8 images on the GPU (else pinned host memory)
    sync_bn: bool = False             # SyncBatchNorm under DDP on CUDA (seed preset)
    max_minutes: float = 0.0          # the command's time, setup included; the LR schedule fitted to it (0: none)
    tensorboard: bool = False         # also log to <run>/tensorboard/ (needs: pip install tensorboard)
    seed: int = 0                     # initial weights, shuffling, the ADNI validation split and the training noise
    device: str = "auto"              # auto, cpu or cuda
    out: str | None = None            # run folder; default runs/<dataset>-<preset>-NNN
    resume: str | None = None         # a checkpoint to continue from, or its run folder (its last.pt)
    train_noise: str | None = None    # denoise: noisy input, clean target (rician:0.1, or rician:0.03-0.25 per image)
    train_crop: int | None = None     # train on random crops of this side if smaller (0: none); default: the preset's

    CHOICES = {"dataset": DATASETS, "preset": tuple(PRESETS), "lr_schedule": SCHEDULES, "precision": PRECISIONS,
               "device": DEVICES, "slice_axis": SLICE_AXES}

    def __post_init__(self):
        first_failure(self, {
            "dataset": self.dataset in DATASETS, "preset": self.preset in PRESETS,
            "epochs": 1 <= self.epochs <= 100000,
            "batch_size": self.batch_size is None or 1 <= self.batch_size <= MAX_BATCH_SIZE,
            "lr": self.lr is None or 0 < self.lr < math.inf,
            "lr_schedule": self.lr_schedule is None or self.lr_schedule in SCHEDULES,
            "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0,
            "grad_clip": self.grad_clip is None or 0 <= self.grad_clip < math.inf,
            "precision": self.precision in PRECISIONS,
            "image_size": self.image_size is None or MIN_IMAGE_SIDE <= self.image_size <= MAX_IMAGE_SIDE,
            "val_fraction": 0 < self.val_fraction < 1, "max_minutes": 0 <= self.max_minutes < math.inf,
            "test_fraction": 0 <= self.test_fraction < 1 - self.val_fraction,
            "slice_axis": self.slice_axis in SLICE_AXES,
            "clip_percentile": 0 <= self.clip_percentile < 50, "min_brain_fraction": 0 <= self.min_brain_fraction < 1,
            "seed": 0 <= self.seed < 2**63, "device": self.device in DEVICES,
            "train_noise": self.train_noise is None or is_noise_spec(self.train_noise),
            "train_crop": self.train_crop in (None, 0) or MIN_IMAGE_SIDE <= self.train_crop <= MAX_IMAGE_SIDE,
        }, "training config")

    def data_options(self) -> dict:
        """The keyword arguments of dataset.build_dataset that this config sets: every split of a run, in training
        and afterwards, is read the same way."""
        return dict(image_size=self.image_size, val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                    seed=self.seed, skip_bad=self.skip_bad, slice_axis=self.slice_axis,
                    clip_percentile=self.clip_percentile, min_brain_fraction=self.min_brain_fraction)

    def resolved(self) -> "TrainConfig":
        """The optimiser settings left unset filled from the preset."""
        recipe = PRESETS[self.preset]
        return replace(self, **{k: getattr(recipe, k) for k in ("lr", "lr_schedule", "warmup_steps", "grad_clip",
                                                                "batch_size", "train_crop")
                                if getattr(self, k) is None})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return config_from_dict(cls, values, legacy={"weight_decay": 0.0})


@dataclass(frozen=True)
class PriorTrainConfig:
    """Everything train_prior.py needs besides the prior's config; one flag per field."""
    vqvae: str | None = None          # the VQ-VAE checkpoint (or run folder: its best.pt) whose codes are modelled
    data_root: str | None = None      # where the VQ-VAE's dataset is now, if it moved after training
    conditional: bool = False         # condition on the class (needs a dataset with classes: ADNI's AD / NC)
    mirror: str = "none"              # also train on each train slice flipped: rows (OASIS' midline) or columns
    epochs: int = 30                  # epochs to train
    max_minutes: float = 0.0          # the command's time, setup included; the LR schedule fitted to it (0: none)
    batch_size: int = 32              # code maps per step
    lr: float = 1e-3                  # Adam learning rate
    lr_schedule: str = "cosine"       # constant or cosine (after warmup)
    warmup_steps: int = 0             # linear learning-rate warmup
    grad_clip: float = 1.0            # clip the gradient norm to this (0: no clipping)
    precision: str = "auto"           # auto (bf16 where the hardware has it), bf16 or fp32
    compile: bool = False             # torch.compile the prior's training steps (validation and sampling run eagerly)
    epoch_samples: int = 16           # slices sampled for samples/epoch_NNN.png (0: none)
    tensorboard: bool = False         # also log to <run>/tensorboard/ (needs: pip install tensorboard)
    seed: int = 0                     # initial weights, shuffling and the samples drawn each epoch
    device: str = "auto"              # auto, cpu or cuda
    out: str | None = None            # run folder; default: prior/ in the VQ-VAE's run folder
    resume: str | None = None         # a prior checkpoint to continue from, or its run folder (its last.pt)

    CHOICES = {"mirror": tuple(MIRRORS), "lr_schedule": SCHEDULES, "precision": PRECISIONS, "device": DEVICES}

    def __post_init__(self):
        first_failure(self, {
            "mirror": self.mirror in MIRRORS, "epochs": 1 <= self.epochs <= 100000,
            "max_minutes": 0 <= self.max_minutes < math.inf,
            "batch_size": 1 <= self.batch_size <= MAX_BATCH_SIZE,
            "lr": 0 < self.lr < math.inf, "lr_schedule": self.lr_schedule in SCHEDULES,
            "warmup_steps": self.warmup_steps >= 0, "grad_clip": 0 <= self.grad_clip < math.inf,
            "precision": self.precision in PRECISIONS, "epoch_samples": 0 <= self.epoch_samples <= 1024,
            "seed": 0 <= self.seed < 2**63, "device": self.device in DEVICES,
        }, "prior training config")

    @classmethod
    def from_dict(cls, values: dict) -> "PriorTrainConfig":
        return config_from_dict(cls, values, legacy={"weight_decay": 0.0})


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """Everything segment.py train needs besides the U-Net's config; one flag per field."""
    dataset: str = "OASIS"            # OASIS or demo: the datasets with tissue masks
    data_root: str | None = None      # the dataset's folder or zip; default for demo: data/demo beside the code
    skip_bad: bool = False            # skip slices whose image or tissue mask is missing, unreadable or odd
    epochs: int = 20                  # epochs to train (with --max-minutes: at most)
    epoch_slices: int = 0             # train slices drawn (without replacement) per epoch (0: the whole split)
    val_slices: int = 0               # validate on this many slices spread evenly over the split (0: all)
    batch_size: int = 8               # slices per step
    lr: float = 2e-3                  # Adam learning rate
    lr_schedule: str = "cosine"       # constant or cosine (after warmup)
    warmup_steps: int = 50            # linear learning-rate warmup
    grad_clip: float = 1.0            # clip the gradient norm to this (0: no clipping)
    precision: str = "auto"           # auto (bf16 where the hardware has it), bf16 or fp32
    channels_last: bool = True        # channels_last memory format (faster convolutions on CPU and GPU)
    max_minutes: float = 0.0          # the command's time, setup included; the LR schedule fitted to it (0: none)
    seed: int = 0                     # initial weights and the slices drawn each epoch
    device: str = "auto"              # auto, cpu or cuda
    out: str | None = None            # run folder; default runs/segmenter-<dataset>-NNN
    resume: str | None = None         # a checkpoint to continue from, or its run folder (its last.pt)

    CHOICES = {"dataset": ("OASIS", "demo"), "lr_schedule": SCHEDULES, "precision": PRECISIONS, "device": DEVICES}

    def __post_init__(self):
        first_failure(self, {
            "dataset": self.dataset in self.CHOICES["dataset"], "epochs": 1 <= self.epochs <= 100000,
            "epoch_slices": 0 <= self.epoch_slices, "val_slices": 0 <= self.val_slices,
            "batch_size": 1 <= self.batch_size <= MAX_BATCH_SIZE, "lr": 0 < self.lr < math.inf,
            "lr_schedule": self.lr_schedule in SCHEDULES, "warmup_steps": self.warmup_steps >= 0,
            "grad_clip": 0 <= self.grad_clip < math.inf, "precision": self.precision in PRECISIONS,
            "max_minutes": 0 <= self.max_minutes < math.inf, "seed": 0 <= self.seed < 2**63,
            "device": self.device in DEVICES,
        }, "segmenter training config")

    def data_options(self) -> dict:
        """The keyword arguments of dataset.build_dataset this config sets (as TrainConfig.data_options)."""
        return dict(skip_bad=self.skip_bad)

    @classmethod
    def from_dict(cls, values: dict) -> "SegmenterTrainConfig":
        return config_from_dict(cls, values)


# ---------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------

NUMBER = (int, float)
# kind -> key -> the type its value must have. What a checkpoint of that kind always holds.
SCHEMA = {
    "vqvae": {"model": dict, "model_config": dict, "train_config": dict, "epoch": int, "best_val_loss": NUMBER,
              "metrics": dict, "world_size": int, "demo_settings": (dict, type(None))},
    "prior": {"model": dict, "model_config": dict, "train_config": dict, "epoch": int, "best_val_bits": NUMBER,
              "metrics": dict, "vqvae_checkpoint": str, "vqvae_epoch": int, "vqvae_model_config": dict,
              "vqvae_codebook": torch.Tensor, "class_names": list},
    "segmenter": {"model": dict, "model_config": dict, "train_config": dict, "epoch": int, "best_val_dice": NUMBER,
                  "metrics": dict, "demo_settings": (dict, type(None))},
    "hyperprior": {"model": dict, "model_config": dict, "train_config": dict, "epoch": int, "step": int,
                   "seconds": NUMBER, "metrics": dict, "optimizer": dict, "aux_optimizer": dict},
}
# kind -> key -> type of what a checkpoint of that kind may hold (newer keys; older files lack them), and its fields
OPTIONAL_SCHEMA = {"vqvae": {"time_budget": dict}, "prior": {"time_budget": dict}, "segmenter": {"time_budget": dict},
                   "hyperprior": {"time_budget": dict}}
TIME_BUDGET_SCHEMA = {"seconds_left": (int, float, type(None)), "done": bool}
# What a resume reads on top: the optimiser, its schedule and the random streams.
RESUME_SCHEMA = {"optimizer": dict, "scheduler": dict, "rng": dict}
RNG_SCHEMA = {"torch": torch.Tensor, "python": tuple, "numpy": dict}
SCRIPT = {"vqvae": "train.py", "prior": "train_prior.py", "segmenter": "segment.py train",
          "hyperprior": "hyperprior.py train"}


def save_checkpoint(state: dict, path: Path, *also: Path):
    """Write atomically (utils.write_atomically): serialised in memory first, then a temp file beside the target,
    fsynced and renamed over it. Each path in `also` then becomes another name of the same file (a hard link, put
    in place by an atomic rename too), so an epoch's epoch/best/last checkpoints cost one write."""
    buffer = io.BytesIO()  # serialised first: torch.save into a file reports a failed write as a vague RuntimeError
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    try:
        write_atomically(path, buffer.getbuffer())
        for other in also:
            write_atomically(other, buffer.getbuffer(), link_from=path)
    except OSError as e:
        raise UserError(f"could not write checkpoint {e.filename or path}: {e.strerror or e}; free disk space or "
                        f"choose another --out, then resume from the last checkpoint") from None


def checkpoint_file(path, resume: bool = False) -> Path:
    """The one rule for every checkpoint argument: a .pt file as given, or a run folder, meaning its best.pt (the
    model to use) or, to resume training, its last.pt."""
    path = Path(path)
    return path / ("last.pt" if resume else "best.pt") if path.is_dir() else path


def default_prior(vqvae_checkpoint) -> Path:
    """Where train_prior.py writes a VQ-VAE's prior unless told otherwise (its run folder prior/ in the VQ-VAE's
    run folder), and so where the commands that need a prior look first: prior/best.pt."""
    return run_dir_of(vqvae_checkpoint) / "prior" / "best.pt"


def load_checkpoint(path, kind: str = "vqvae", resume: bool = False) -> dict:
    """A checkpoint of `kind` ("vqvae", "prior", "segmenter" or "hyperprior") loaded with weights_only=True and its
    keys' types checked (with `resume`, also what a resume reads); UserError naming the file and the problem
    otherwise. `path` as checkpoint_file reads it."""
    path = checkpoint_file(path, resume)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass a .pt file, or a run folder holding best.pt")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by {SCRIPT[kind]}")
    state = _load_weights_only(path, kind)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}); use one written "
                        f"by {SCRIPT[kind]}")
    if state.get("kind", "vqvae") != kind:
        raise UserError(f"{path} holds a {state.get('kind')} checkpoint, but a {kind} checkpoint is needed here")
    try:
        _check_types(state, {**SCHEMA[kind], **(RESUME_SCHEMA if resume else {})})
        _check_types(state, {k: t for k, t in OPTIONAL_SCHEMA[kind].items() if k in state})
        if "time_budget" in state:
            _check_types(state["time_budget"], TIME_BUDGET_SCHEMA, "time_budget.")
        if resume:
            _check_types(state["rng"], RNG_SCHEMA, "rng.")
            if not state["optimizer"].get("state") or not state["optimizer"].get("param_groups"):
                raise ValueError("its optimizer state is empty")
    except ValueError as e:
        raise UserError(f"{path} is not a complete {kind} checkpoint ({e}); use another checkpoint of the run, "
                        f"or one written by {SCRIPT[kind]}") from None
    return state


def _load_weights_only(path: Path, kind: str) -> dict:
    try:
        with warnings.catch_warnings():  # e.g. torch's note on an unusual pickle protocol: the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file at all
        text = str(e).lower()
        reason = one_line_reason(e, 160)
        if path.stat().st_size == 0 or isinstance(e, EOFError):
            reason = "the file is empty or cut short"
        elif "unsupported global" in text or "unsupported operand" in text:
            reason = "it contains objects other than tensors and plain data, which could run code when loaded"
        elif "central directory" in text or "pytorchstreamreader" in text:
            reason = "the file is truncated or corrupt (an incomplete torch archive)"
        elif any(s in text for s in ("invalid load key", "legacy .tar format", "magic number", "weights_only")):
            reason = "it is not a file written by torch.save"
        raise UserError(f"cannot load checkpoint {path}: {reason}; use a checkpoint written by this project's "
                        f"{SCRIPT[kind]}") from None


def _check_types(values: dict, schema: dict, prefix: str = ""):
    for key, kind in schema.items():
        if key not in values:
            raise ValueError(f"missing {prefix}{key}")
        if not isinstance(values[key], kind) or (kind is int and isinstance(values[key], bool)):
            raise ValueError(f"{prefix}{key} is a {type(values[key]).__name__}")


def _fit_weights(model: torch.nn.Module, weights: dict):
    """load_state_dict, then every floating-point tensor must be finite: a diverged or tampered file is refused
    here rather than producing NaN images and scores."""
    model.load_state_dict(weights)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{bad[0]} holds NaN or infinite values")


def rebuild_vqvae(state: dict, path) -> tuple[VQVAE, TrainConfig]:
    """The exact VQ-VAE and training config a loaded checkpoint describes (on the CPU, train mode)."""
    try:
        model = VQVAE(VQVAEConfig.from_dict(state["model_config"]))
        _fit_weights(model, state["model"])
        cfg = TrainConfig.from_dict(state["train_config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match the model it describes ({one_line_reason(e)}); use a checkpoint "
                        f"written by this project's train.py") from None
    return model, cfg


def rebuild_prior(state: dict, path) -> tuple[Prior, PriorTrainConfig]:
    """The exact prior and training config a loaded prior checkpoint describes (on the CPU, train mode)."""
    try:
        prior = build_prior(config_from_dict(PriorConfig, state["model_config"]))
        _fit_weights(prior, state["model"])
        cfg = PriorTrainConfig.from_dict(state["train_config"])
        vqvae_config = VQVAEConfig.from_dict(state["vqvae_model_config"])
        codebook = state["vqvae_codebook"]
        if codebook.shape != (vqvae_config.codebook_size, vqvae_config.embedding_dim):
            raise ValueError(f"vqvae_codebook has shape {tuple(codebook.shape)}, not that of its VQ-VAE config")
        if prior.config.codebook_size != vqvae_config.codebook_size:
            raise ValueError("the prior's codebook size is not its VQ-VAE's")
        if len(state["class_names"]) < max(1, prior.config.num_classes):
            raise ValueError("class_names has fewer names than the prior has classes")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match the prior it describes ({one_line_reason(e)}); use a checkpoint "
                        f"written by this project's train_prior.py") from None
    return prior, cfg


def load_vqvae(path, device: torch.device) -> tuple[VQVAE, TrainConfig, dict]:
    """(model on `device` in eval mode, its training config, the whole checkpoint) from a train.py checkpoint (a .pt
    file, or a run folder: its best.pt)."""
    state = load_checkpoint(path, "vqvae")
    model, cfg = rebuild_vqvae(state, path)
    return model.to(device).eval(), cfg, state


def load_prior(path, device: torch.device) -> tuple[Prior, PriorTrainConfig, dict]:
    """(prior on `device` in eval mode, its training config, the whole checkpoint) from a train_prior.py checkpoint
    (a .pt file, or a prior run folder: its best.pt)."""
    state = load_checkpoint(path, "prior")
    prior, cfg = rebuild_prior(state, path)
    return prior.to(device).eval(), cfg, state


def rebuild_segmenter(state: dict, path) -> tuple[UNet, SegmenterTrainConfig]:
    """The exact U-Net and training config a loaded segmenter checkpoint describes (on the CPU, train mode)."""
    try:
        model = UNet(config_from_dict(SegmenterConfig, state["model_config"]))
        _fit_weights(model, state["model"])
        cfg = SegmenterTrainConfig.from_dict(state["train_config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match the segmenter it describes ({one_line_reason(e)}); use a checkpoint "
                        f"written by this project's segment.py train") from None
    return model, cfg


def load_segmenter(path, device: torch.device) -> tuple[UNet, SegmenterTrainConfig, dict]:
    """(U-Net on `device` in eval mode, its training config, the whole checkpoint) from a segment.py checkpoint;
    a run folder stands for its best.pt (checkpoint_file)."""
    path = checkpoint_file(path)
    state = load_checkpoint(path, "segmenter")
    model, cfg = rebuild_segmenter(state, path)
    return model.to(device).eval(), cfg, state


def check_prior_fits(prior_state: dict, vqvae: VQVAE, prior_path, vqvae_path):
    """A prior models the codes of one VQ-VAE: the very codebook it was trained on, or UserError."""
    if not torch.equal(vqvae.quantizer.codebook.detach().cpu(), prior_state["vqvae_codebook"]):
        raise UserError(f"{prior_path} was trained on the codes of another VQ-VAE ({prior_state['vqvae_checkpoint']}, "
                        f"epoch {prior_state['vqvae_epoch']}), not on those of {vqvae_path}; pass that one, or "
                        f"train a new prior")


def run_dir_of(checkpoint) -> Path:
    """The run folder a checkpoint belongs to: its folder, or the one above checkpoints/ (a run folder: itself)."""
    checkpoint = checkpoint_file(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    candidates = sorted(runs.glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"no {runs}/*/best.pt found; train first (python train.py ...) or pass --checkpoint")
    return candidates[-1]


# ---------------------------------------------------------------------------------------------------------
# The data a checkpoint was trained on
# ---------------------------------------------------------------------------------------------------------

DATA_ROOT_HINTS = {
    "OASIS": "the folder holding keras_png_slices_train/_validate/_test, its parent, or keras_png_slices_data.zip",
    "ADNI": "the AD_NC folder (holding train/, and test/ if you have it), its parent, or the AD_NC zip",
    "nifti": "the folder of .nii/.nii.gz volumes (searched recursively; a BIDS dataset works)",
}


def load_split(cfg: TrainConfig, split: str, data_root: str | None = None, skip_bad: bool | None = None,
               demo: dict | None = None, dataset: str | None = None, verbose: bool = True, masks: bool | str = False):
    """One split of the dataset a VQ-VAE was trained on, as its training config records it: the same image size,
    ADNI validation carving and skipping rule. `data_root` if the data moved; `dataset` (with `data_root`) scores
    the model on another dataset's split instead, at the image size it was trained on. Demo data that is gone is
    made again with `demo` (the checkpoint's "demo_settings"). With `masks`, each slice's tissue mask too
    (dataset.WHERE_SHIPPED: where the dataset ships them)."""
    name = dataset or cfg.dataset
    root = data_root or (cfg.data_root if name == cfg.dataset else None)
    if name == "demo":
        folder = Path(root).expanduser() if root else default_demo_root()
        if not (folder / DEMO_MARKER).is_file():
            how = f"with the settings it was made with ({', '.join(f'{k} {v}' for k, v in (demo or {}).items())})"
            print(f"the demo data of this checkpoint is not at {folder}; making it again there "
                  f"{how if demo else 'with the default settings'}")
            generate_demo(folder, **(demo or {}))
        root = str(folder)
    if name in DATA_ROOT_HINTS and (root is None or not Path(root).expanduser().exists()):
        where = (f"--data-root {data_root} does not exist" if data_root else
                 f"this checkpoint was trained on {name} at {root}, which is not there now" if root else
                 f"pass --data-root for the {name} data" if name != cfg.dataset else
                 f"this checkpoint does not record where its {name} data is")
        raise UserError(f"{where}; pass --data-root pointing at {DATA_ROOT_HINTS[name]}")
    try:
        return build_dataset(name, root, split, **{**cfg.data_options(), "verbose": verbose, "masks": masks,
                                                   "skip_bad": cfg.skip_bad if skip_bad is None else skip_bad})
    except DataError as e:
        raise UserError(f"the {name} {split} data is not readable: {e}") from None
