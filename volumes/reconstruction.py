"""predict.py --volumes, and predict.py on a NIfTI dataset's split: reconstruct and score volume by volume, and write
each reconstruction back as a volume on its input's affine and header (per_volume.csv, volumes/<name>_recon.nii.gz).
The functions take predict.py's flags as `args` (volumes, skip_bad, the runtime flags)."""
from pathlib import Path

import torch

from evaluation.metrics import SplitScores, score_split
from imaging.slices import to_uint8
from utils import autocast, write_csv
from volumes.nifti import SliceOptions, check_replaceable, load_files, volume_stem, write_reconstruction

VOLUME_TABLE = "per_volume.csv"  # in predict.py's --out, beside volumes/


def load_volume_files(args, cfg):
    """--volumes: the files, sliced as the model's training config says (a model trained on slice images: along
    the default axial axis), with --skip-bad as given or as in training."""
    options = SliceOptions(cfg.slice_axis, cfg.clip_percentile, cfg.min_brain_fraction, cfg.image_size)
    return load_files(args.volumes, options, cfg.skip_bad if args.skip_bad is None else args.skip_bad)


def reconstruction_paths(out: Path, volumes) -> list[Path]:
    """Where each volume's reconstruction goes, out/volumes/<name>_recon.nii.gz; DataError for one that holds a file
    predict.py did not write (nifti.check_replaceable): call it before anything is written into `out`."""
    paths = [out / "volumes" / f"{name}_recon.nii.gz" for name in output_names(volumes)]
    for path in paths:
        check_replaceable(path)
    return paths


def score_volumes(model, data, brain, device, args, out: Path, paths: list[Path]) -> tuple[SplitScores, list[dict]]:
    """Reconstruct and score NIfTI slices volume by volume: each volume is written to its path of `paths`
    (reconstruction_paths) as a .nii.gz on the input's affine and header (nifti.write_reconstruction), its mean SSIM
    and PSNR over its slices (whole, and inside the bool (N, H, W) `brain` masks) go to out/per_volume.csv.
    Returns the slices' scores and the first 64 slices for the figures, as score_split would, and the rows of
    per_volume.csv."""
    amp = autocast(args.precision, device)
    scored = {"ssim": [], "psnr": [], "ssim_brain": [], "psnr_brain": []}  # SplitScores' per-image fields, in order
    codes, shown, rows = [], {"inputs": [], "outputs": []}, []
    for volume, path in zip(data.volumes, paths):
        scores = score_split(model, data.images[volume.rows], device, amp, args.batch_size,
                             compiled_ssim=args.compile, keep=len(volume.kept), progress=f"reconstructing {path.name}",
                             brain=brain[volume.rows])
        images = to_uint8(scores.outputs[:, 0]).numpy()
        write_reconstruction(volume, images, path)
        for key, values in scored.items():
            values.append(getattr(scores, key))
        codes.append(scores.indices)
        for key, kept in shown.items():
            kept.append(getattr(scores, key)[:64 - sum(len(k) for k in kept)])
        rows.append({"volume": volume.path, "subject": volume.subject, "slices": len(volume.kept),
                     **{key: float(values[-1].nanmean()) for key, values in scored.items()},
                     "reconstruction": str(path)})
        print(f"{volume.path}: {len(volume.kept)} {volume.axis} slices | SSIM {rows[-1]['ssim']:.4f} (brain "
              f"{rows[-1]['ssim_brain']:.4f}) | PSNR {rows[-1]['psnr']:.2f} dB | written to {path}")
    write_csv(out / VOLUME_TABLE, rows)
    return SplitScores(*(torch.cat(v) for v in scored.values()), {}, *(torch.cat(v) for v in shown.values()),
                       torch.cat(codes)), rows


def output_names(volumes) -> list[str]:
    """A file name stem per volume: its file name without the extension, numbered where two volumes share one."""
    names, taken = [], set()
    for volume in volumes:
        stem = volume_stem(Path(volume.path).name)
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        names.append(name)
    return names
