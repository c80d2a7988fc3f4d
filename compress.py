"""The command line of the .vqz codec (codec/vqz.py, which also documents the file format): one small file per slice
holding its VQ-VAE code map, entropy-coded with the prior's probabilities; and the rate-distortion study against
the classical codecs.

    python compress.py encode --checkpoint runs/X/best.pt --prior runs/X/prior/best.pt slices/ --out coded/
    python compress.py encode --checkpoint runs/X/best.pt --split test --out coded/      # a split, no prior
    python compress.py encode --checkpoint runs/A --prior runs/A/prior/best.pt --checkpoint runs/B --prior none \
        --max-bytes 600 --split test --out coded/     # per slice the best of A's and B's files that fits
    python compress.py decode --checkpoint runs/X/best.pt --prior runs/X/prior/best.pt coded/ --out decoded/
    python compress.py rd --checkpoint runs/A/best.pt --checkpoint runs/B/best.pt --split test
    python compress.py encode --ladder runs/ladder --max-bytes 1024 --split test --out coded/   # ladder.py's points

encode: PNG/JPEG files, folders of them, or (--split) a split of the dataset the checkpoint records -> one
<name>.vqz per slice. decode: .vqz files or folders of them -> 8-bit grey <name>.png, the VQ-VAE's reconstruction
of the slice that was encoded. rd: bytes per slice against SSIM and PSNR (over the whole slice and inside the
brain) for each VQ-VAE (fixed-length, static and prior coding) and for JPEG, WebP, JPEG 2000, AVIF and JPEG XL
searched per image to fit byte budgets, and per budget the best VQ-VAE file of each slice that fits (the ladder);
writes rd.csv, rd.json, rd.png (the curves) and rd_slice.png (one slice at equal bytes under every codec).

"""
import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anatomy.brain import brain_masks
from anatomy.tissues import check_segmenter_fits, segment_images
from codec.classical import CLASSICAL_CODECS, available_codecs, classical_codec
from codec.ladder import Ladder, read_ladder
from codec.study import RdStudy, dice_against, dice_rows, plot_rd, rate_distortion, rd_subset, slice_figure
from codec.vqz import CODER_NAMES, HEADER, PRIOR_CODERS, SUFFIX, Codec, load_codec, parse_header, read_vqz
from dataset import WHERE_SHIPPED, class_index, read_slice
from imaging.slices import IMAGE_SUFFIXES, natural_key
from training.checkpoints import default_prior, load_segmenter, load_split, run_dir_of
from utils import (
    ArgumentParser,
    UserError,
    add_runtime_flags,
    add_shared_flag,
    apply_runtime_flags,
    autocast,
    check_at_least,
    exits_with_one_line,
    write_csv,
    write_json,
)


def expand_inputs(paths: list[Path], suffixes: tuple, what: str) -> list[Path]:
    """Files as given, and the files with one of `suffixes` directly inside each folder given, in natural order."""
    files = []
    for path in paths:
        if path.is_dir():
            inside = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes),
                            key=lambda p: natural_key(p.name))
            if not inside:
                raise UserError(f"folder {path} holds no {what} ({', '.join(suffixes)} files)")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; pass {what} or folders of them")
    return files


def output_paths(out: Path, names: list[str], suffix: str) -> list[Path]:
    """One output file per input name (its name without the last suffix, + `suffix`) in `out`; refuses names that
    collide and files that already exist, before anything is written."""
    targets = [out / (Path(n).stem + suffix) for n in names]
    seen = {}
    for name, target in zip(names, targets):
        if target in seen:
            raise UserError(f"{seen[target]} and {name} would both be written to {target}; encode them into "
                            f"different --out folders")
        seen[target] = name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    existing = [t for t in targets if t.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists ({len(existing)} of the outputs do); compress.py never "
                        f"overwrites files: choose a new --out folder or remove them")
    return targets


def write_new(path: Path, data: bytes):
    with open(path, "xb") as f:  # never over a file that appeared since the check
        f.write(data)


def resolve_class(codec: Codec, class_name: str | None, n: int):
    index = class_index(class_name, codec.class_names, codec.prior is not None and bool(codec.prior.config.num_classes))
    return None if index is None else torch.full((n,), index, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------

def cmd_encode(args, device):
    check_encode_flags(args)
    loaded = [load_codec(c, p, device, args.batch_size, args.precision)
              for c, p in zip(args.checkpoints, paired_priors(args.checkpoints, args.priors, default=False))]
    codec, cfg, state = loaded[0]
    if args.coder == "prior" and codec.prior is None:
        raise UserError("--coder prior needs a --prior")
    images, names, labels = encode_inputs(args, codec, cfg, state)
    h, w = codec.code_grid(images.shape[1:])
    targets = output_paths(args.out, names, SUFFIX)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files, picked = encode_slices(args, [c for c, _, _ in loaded], images, labels)
    seconds = time.perf_counter() - t0
    for target, data in zip(targets, files):
        write_new(target, data)
    sizes = np.array([len(f) for f in files])
    if args.max_bytes is not None:
        counts = np.bincount(picked, minlength=len(loaded))
        what = "operating points " + ", ".join(f"{c} ({n} slices)" for c, n in zip(args.checkpoints, counts))
    else:
        coders = sorted({CODER_NAMES[f[4]] for f in files})
        what = (f"{h}x{w} codes, K={codec.k}, the {'/'.join(coders)} coder, "
                f"{(sizes.mean() - HEADER.size) * 8 / (h * w):.3f} bits per code in the payload")
    print(f"encoded {len(files)} slices of {images.shape[1]}x{images.shape[2]} ({what}): {sizes.mean():.1f} bytes per "
          f"slice on average, {len(files) / seconds:.2f} slices/s | written to {args.out}")


def check_encode_flags(args):
    if not args.inputs and args.split is None:
        raise UserError("nothing to encode: pass image files or folders, or --split")
    if args.inputs and args.split is not None:
        raise UserError("pass either image files/folders or --split, not both")
    if args.data_root is not None and args.split is None:
        raise UserError("--data-root says where --split's dataset is; it does not go with image files")
    if len(args.checkpoints) > 1 and args.max_bytes is None:
        raise UserError("several --checkpoint are operating points of --max-bytes: pass --max-bytes N, or one "
                        "--checkpoint")
    if args.max_bytes is not None and (args.max_bytes < 1 or args.coder != "auto"):
        raise UserError("--max-bytes must be a positive byte count, and picks each point's coder itself (no --coder)")


def encode_inputs(args, codec: Codec, cfg, state) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """(uint8 slices, their names, each one's class label or None) of --split or of the image files given."""
    conditional = codec.prior is not None and codec.prior.config.num_classes
    if args.split is not None:
        data = load_split(cfg, args.split, args.data_root, demo=state["demo_settings"])
        images, names = data.images, [Path(f).name for f in data.files]
        labels = data.labels if conditional else None
        if args.class_name is not None:
            labels = resolve_class(codec, args.class_name, len(images))
    else:
        images, names = read_images(expand_inputs(args.inputs, IMAGE_SUFFIXES, "images"), cfg.image_size)
        labels = resolve_class(codec, args.class_name, len(images))
    if conditional and labels is None:
        raise UserError("this prior is class-conditional: pass --class with one of "
                        f"{', '.join(codec.class_names)}")
    return images, names, labels


def read_images(files: list[Path], size) -> tuple[torch.Tensor, list[str]]:
    """Image files of one size as uint8 slices, read as the checkpoint's data was (`size`), and their names."""
    decoded = []
    for f in tqdm(files, desc="reading", leave=False, disable=len(files) < 50):
        try:
            decoded.append(read_slice(f.read_bytes(), str(f), size))
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror or e}") from None
    shapes = {a.shape for a in decoded}
    if len(shapes) > 1:
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted(shapes))
        raise UserError(f"the images have {len(shapes)} different sizes ({sizes}); encode each size separately")
    return torch.from_numpy(np.stack(decoded)), [f.name for f in files]


def encode_slices(args, codecs: list[Codec], images: torch.Tensor, labels) -> tuple[list[bytes], list[int] | None]:
    """(.vqz file contents, with --max-bytes the index of each one's codec): the first codec's files, or with
    --max-bytes per slice the best file of all codecs that fits."""
    with tqdm(total=len(images) * len(codecs), desc="encoding", unit="slice", leave=False) as bar:
        if args.max_bytes is not None:
            return Ladder(codecs).encode_within(images, args.max_bytes, labels, bar)
        codec = codecs[0]
        codes = codec.codes(images)
        if codec.prior is None or args.coder in ("fixed", "static"):
            bar.update(len(images))
        return codec.encode_codes(codes, tuple(images.shape[1:]), labels, args.coder,
                                  progress=bar if codec.prior is not None else None), None


def cmd_decode(args, device):
    files = expand_inputs(args.files, (SUFFIX,), ".vqz files")
    ladder = Ladder([load_codec(c, p, device, args.batch_size, args.precision)[0]
                     for c, p in zip(args.checkpoints, paired_priors(args.checkpoints, args.priors, default=False))])
    blobs = [read_vqz(f) for f in files]
    headers = [parse_header(b, str(f)) for b, f in zip(blobs, files)]
    codecs = []
    for header, f in zip(headers, files):
        codec = ladder.codec_for(header, str(f))
        if header.coder in PRIOR_CODERS and codec.prior is None and header.vqvae_hash == codec.vqvae_hash:
            raise UserError(f"{f} was coded with a prior (hash {header.prior_hash.hex()}); pass the --prior it was "
                            f"encoded with")
        codec.check(header, str(f))
        codecs.append(codec)
    targets = output_paths(args.out, [f.name for f in files], ".png")
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    groups = {}
    for index, header in enumerate(headers):
        groups.setdefault((id(codecs[index]), header.image_shape, header.grid), []).append(index)
    t0 = time.perf_counter()
    with tqdm(total=len(files), desc="decoding", unit="slice", leave=False) as bar:
        for indices in groups.values():
            _, images = codecs[indices[0]].decode([blobs[i] for i in indices], [str(files[i]) for i in indices], bar)
            for i, image in zip(indices, images):
                buffer = io.BytesIO()
                Image.fromarray(image.numpy(), "L").save(buffer, "PNG")
                write_new(targets[i], buffer.getvalue())
    seconds = time.perf_counter() - t0
    print(f"decoded {len(files)} slices, {len(files) / seconds:.2f} slices/s | written to {args.out}")


# ---------------------------------------------------------------------------------------------------------
# Rate-distortion study
# ---------------------------------------------------------------------------------------------------------

DEFAULT_BUDGETS = (256, 320, 400, 512, 640, 800, 1024, 1280, 1536, 2048, 3072, 4096)


def cmd_rd(args, device):
    budgets, codecs, priors = rd_settings(args)
    out = args.out or run_dir_of(args.checkpoints[0]) / f"rd_{args.split}"
    outputs = {name: out / name for name in ("rd.csv", "rd.json", "rd.png", "rd_slice.png")
               + (ANATOMY_OUTPUTS if args.segmenter else ())}
    segmenter = load_segmenter(args.segmenter, device) if args.segmenter else None
    existing = [p for p in outputs.values() if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists; compress.py never overwrites files: choose a new --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    loaded = [load_codec(c, p, device, args.batch_size, args.precision) for c, p in zip(args.checkpoints, priors)]
    slices, brain = rd_study_slices(args, loaded)
    masks = rd_masks(segmenter, args, loaded[0][1:], slices) if segmenter else None
    figure_slice = len(slices[0]) // 2 if args.figure_slice is None else args.figure_slice
    if not 0 <= figure_slice < len(slices[0]):
        raise UserError(f"--figure-slice {figure_slice} is outside 0..{len(slices[0]) - 1}")
    models = [(f"{cfg.preset} ({run_dir_of(ckpt).name})", codec,
               {"checkpoint": str(ckpt), "prior": str(prior) if prior else None, "epoch": state.get("epoch")})
              for ckpt, prior, (codec, cfg, state) in zip(args.checkpoints, priors, loaded)]
    study = rate_distortion(models, slices, brain, codecs, budgets, args.workers, args.verify, args.peers or ())

    out.mkdir(parents=True, exist_ok=True)
    write_csv(outputs["rd.csv"], study.table())
    summary = {"split": args.split, **study.summary()}
    write_json(outputs["rd.json"], summary)
    height, width = study.images.shape[1:]
    plot_rd(study.rows, outputs["rd.png"], f"{args.split}: {len(study.images)} slices of {height}x{width}")
    slice_figure(study, outputs["rd_slice.png"], figure_slice)
    if segmenter:
        summary["anatomy"] = anatomy_rd(segmenter, args, device, masks, study, outputs)
    print_rd(study.rows, summary["speed"], study.brain_mask, out, tuple(outputs))
    return summary


def rd_study_slices(args, loaded: list) -> tuple[tuple, tuple[torch.Tensor, str]]:
    """((uint8 images, labels, file names) of --split's rd_subset as the first --checkpoint records it, which every
    other one must record too; their brain masks, bool (N, H, W), and the rule that made them): the split's true
    tissue masks where its dataset ships them, else computed from the slices (load_split says why in one line where
    a dataset that ships them has none here)."""
    slices = brain = None
    for ckpt, (_, cfg, state) in zip(args.checkpoints, loaded):
        data = rd_subset(load_split(cfg, args.split, args.data_root, demo=state["demo_settings"],
                                    masks=WHERE_SHIPPED if slices is None else False), args.max_images)
        if slices is None:
            slices, brain = (data.images, data.labels, list(data.files)), brain_masks(data)
        elif slices[0].shape != data.images.shape or not torch.equal(slices[0], data.images):
            raise UserError(f"{ckpt} records other {args.split} images than {args.checkpoints[0]}; compare "
                            f"checkpoints trained on the same dataset")
    return slices, brain


def rd_settings(args) -> tuple[list[int], list[str], list[Path | None]]:
    """rd's budgets, classical codecs and the prior of each --checkpoint (default_prior where none is given and one
    is there), checked before anything is loaded."""
    budgets = sorted(set(args.budgets))
    if not budgets or min(budgets) < 1:
        raise UserError("--budgets must be positive byte counts, e.g. 320,640,1280")
    if args.codecs is None:
        codecs = available_codecs()
        if "jpegxl" not in codecs:
            print("JPEG XL left out: it needs the optional imagecodecs package (pip install imagecodecs)")
    else:
        codecs = list(dict.fromkeys(args.codecs))
    for name in codecs:
        classical_codec(name).settings(1 << 16)  # an unknown name, or JPEG XL without imagecodecs, fails here
    check_at_least("--max-images", args.max_images)
    check_at_least("--workers", args.workers)
    return budgets, codecs, paired_priors(args.checkpoints, args.priors, default=True)


def paired_priors(checkpoints: list[Path], priors: list[str] | None, default: bool) -> list[Path | None]:
    """The prior of each --checkpoint: the --prior flags in order ("none" for none); without any, each run's
    prior/best.pt where there is one (`default`), or none."""
    if priors and len(priors) != len(checkpoints):
        raise UserError(f"give one --prior per --checkpoint ({len(checkpoints)}), 'none' for no prior, or no "
                        f"--prior" + (" to use each run's prior/best.pt where there is one" if default else ""))
    if priors:
        return [None if str(p).lower() == "none" else Path(p) for p in priors]
    return [default_prior(c) if default and default_prior(c).is_file() else None for c in checkpoints]


def print_rd(rows: list[dict], speeds: dict, brain_mask: str, out: Path, written: tuple):
    for r in rows:
        # a learned peer's row has no in-brain score
        ssim = f"SSIM {r['mean_ssim']:.4f}" + (f" (brain {r['mean_ssim_brain']:.4f})" if "mean_ssim_brain" in r else "")
        if r["codec"].startswith("VQ-VAE"):
            print(f"{r['codec']} {r['setting']}: {r['mean_bytes']:.1f} bytes/slice ({r['mean_payload_bytes']:.1f} "
                  f"payload) | {ssim} | PSNR {r['mean_psnr']:.2f} dB")
        else:
            budget = f"<= {r['budget_bytes']} B" if isinstance(r["budget_bytes"], int) else r["setting"]
            print(f"{r['codec']} {budget}: {r['images_fit']} fit, {r['images_over_budget']} over | "
                  f"{r['mean_bytes']:.1f} bytes | {ssim} | PSNR {r['mean_psnr']:.2f} dB")
    print(f"brain masks of the in-brain scores: {brain_mask}")
    print(f"speed: {speeds}")
    print(f"written to {out} ({', '.join(written)})")


ANATOMY_OUTPUTS = ("rd_anatomy.csv", "rd_anatomy.json")


def rd_masks(segmenter, args, trained, slices) -> torch.Tensor:
    """rd --segmenter, before anything is measured: the true tissue masks of the study's slices, in their order,
    from the split as the first --checkpoint records it; UserError where the split has none or the segmenter does
    not take slices of their size."""
    cfg, state = trained
    check_segmenter_fits(segmenter[0], slices[0].shape[1:], f"the {args.split} slices")
    data = load_split(cfg, args.split, args.data_root, demo=state["demo_settings"], masks=True, verbose=False)
    where = {f: i for i, f in enumerate(data.files)}
    return data.masks[[where[f] for f in slices[2]]]


def anatomy_rd(segmenter, args, device, masks: torch.Tensor, study: RdStudy, outputs) -> dict:
    """rd --segmenter: the segmenter's tissue Dice against the true masks (`masks`: rd_masks') (dice_mean: the mean
    of CSF, GM and WM) for the originals, each VQ-VAE (its one reconstruction, at the mean file size of each of its
    coders), the ladder at each budget and each classical codec at each budget (each slice at the best quality that
    fits; slices that fit in no file are left out and counted, as in rd.csv) -> rd_anatomy.csv and
    rd_anatomy.json, returned too."""
    model, _, seg_state = segmenter
    segment = lambda images: segment_images(model, images, device, autocast(args.precision, device),  # noqa: E731
                                            args.batch_size)
    table = dice_rows(segment, masks, study)
    result = {"segmenter": str(args.segmenter), "segmenter_epoch": seg_state["epoch"], "rows": table,
              "dice_minus_jpeg2000_at_320_bytes": dice_against(table, "jpeg2000", 320)}
    write_csv(outputs["rd_anatomy.csv"], table)
    write_json(outputs["rd_anatomy.json"], result)
    for r in table:
        print(f"tissue Dice | {r['codec']} {r['setting']}" + (f" <= {r['budget_bytes']} B" if r["budget_bytes"] else "")
              + f": {r['images_fit']}/{r['images']} slices, mean Dice {r['dice_mean']:.4f} (CSF {r['dice_csf']:.4f}"
              f" GM {r['dice_gm']:.4f} WM {r['dice_wm']:.4f})")
    return result


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(prog="compress.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    add_encode_parser(sub)
    add_decode_parser(sub)
    add_rd_parser(sub)
    return with_ladder(p.parse_args(argv))


def add_model_flags(q, checkpoint_note: str, prior_note: str):
    """--checkpoint, --prior (each repeatable, in pairs) and --ladder."""
    add_shared_flag(q, "--checkpoint", checkpoint_note, dest="checkpoints", action="append", default=[])
    add_shared_flag(q, "--prior", prior_note, dest="priors", action="append")
    q.add_argument("--ladder", type=Path, help="a folder trained by ladder.py: each of its points (VQ-VAE and "
                   "prior) as one more --checkpoint")


def add_encode_parser(sub):
    e = sub.add_parser("encode", help="images -> .vqz files", description="Encode slices into .vqz files.")
    add_model_flags(e, "repeat for several operating points of --max-bytes", "code with its probabilities; one per "
                    "--checkpoint, none for none (default: no prior, static or fixed-length coding)")
    add_runtime_flags(e, batch_size=64, batch_help="slices per pass of the models")
    e.add_argument("inputs", nargs="*", type=Path, help="PNG/JPEG files or folders of them")
    add_shared_flag(e, "--split", "encode this split instead of files")
    add_shared_flag(e, "--data-root", "with --split")
    add_shared_flag(e, "--out", "the .vqz files go here", required=True)
    e.add_argument("--coder", default="auto", choices=("auto", "prior", "static", "fixed"),
                   help="auto: per slice the smallest of prior (with --prior) or static, and fixed-length")
    e.add_argument("--class", dest="class_name", help="the class of every slice, for a class-conditional prior")
    e.add_argument("--max-bytes", type=int, help="per slice the file, of every --checkpoint's, whose reconstruction "
                   "is best among those of at most this many bytes")


def add_decode_parser(sub):
    d = sub.add_parser("decode", help=".vqz files -> PNGs", description="Decode .vqz files into 8-bit PNGs.")
    add_model_flags(d, "the one the files were encoded with; repeat for files of several", "the one the files were "
                    "encoded with (needed for prior-coded files); one per --checkpoint, none for none")
    add_runtime_flags(d, batch_size=64, batch_help="slices per pass of the models")
    d.add_argument("files", nargs="+", type=Path, help=".vqz files or folders of them")
    add_shared_flag(d, "--out", "the PNGs go here", required=True)


def add_rd_parser(sub):
    r = sub.add_parser("rd", help="rate-distortion study against JPEG, WebP, JPEG 2000, AVIF and JPEG XL",
                       description="Bytes per slice against SSIM and PSNR for VQ-VAEs and classical codecs.")
    add_model_flags(r, "repeat for several (e.g. default and hq)", "the prior of each --checkpoint in order, or "
                    "none (default: <run>/prior/best.pt if present)")
    add_shared_flag(r, "--split", "the split to measure (default: test)", default="test")
    add_shared_flag(r, "--data-root")
    r.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",") if v], default=list(DEFAULT_BUDGETS),
                   help=f"byte budgets for the classical codecs (default: {','.join(map(str, DEFAULT_BUDGETS))})")
    r.add_argument("--codecs", type=lambda s: [v for v in s.split(",") if v],
                   help=f"classical codecs to compare, of {','.join(CLASSICAL_CODECS)} (default: all; jpegxl where "
                        f"imagecodecs is installed)")
    r.add_argument("--max-images", type=int, help="use this many slices spread over the split (default: all)")
    r.add_argument("--peer", dest="peers", type=Path, action="append", help="a learned peer's rate points on the "
                   "same slices (rd_hyperprior.json of hyperprior.py rd): added to the table, curves and BD-rates")
    r.add_argument("--workers", type=int, default=1, help="processes for the classical codecs' searches (default: 1)")
    r.add_argument("--figure-slice", type=int, help="index of the slice in rd_slice.png (default: the middle one)")
    r.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="decode every prior-coded file and check it gives the same codes and image (default: on)")
    r.add_argument("--segmenter", type=Path, help="a tissue segmenter .pt written by segment.py train, or its run "
                   "folder: also the tissue Dice at every budget (rd_anatomy.csv, rd_anatomy.json)")
    add_shared_flag(r, "--out", "default: rd_<split> in the first checkpoint's run")
    add_runtime_flags(r, batch_size=64, batch_help="slices per pass of the models")


def with_ladder(args):
    """--ladder's points appended to --checkpoint, each with its prior (the --checkpoint ones keep their pairing)."""
    if args.ladder is None:
        if not args.checkpoints:
            raise UserError("pass --checkpoint (a VQ-VAE run) or --ladder (a folder trained by ladder.py)")
        return args
    points = read_ladder(args.ladder)
    given = paired_priors(args.checkpoints, args.priors, default=args.command == "rd")
    args.checkpoints = args.checkpoints + [c for c, _ in points]
    args.priors = [str(p) if p else "none" for p in given + [p for _, p in points]]
    return args


def main(argv=None):
    with exits_with_one_line(interrupted="interrupted; the files written so far are complete, the rest were not "
                                         "written"):
        args = parse_args(argv)
        device = apply_runtime_flags(args)
        return {"encode": cmd_encode, "decode": cmd_decode, "rd": cmd_rd}[args.command](args, device)


if __name__ == "__main__":
    main()
