"""The rate-distortion study, written once for every study that compares codecs on slices: `rate_distortion` runs
it (each VQ-VAE measured as a codec: its files under every coder, decoded again, their speed; per budget the best
VQ-VAE file of each slice that fits, as a ladder encodes; the classical codecs searched per slice at every byte
budget, in worker processes) and returns plain rows of rd.csv with what the figures need; then the tissue Dice per
codec and budget, the targets and BD-rates as measured, and the figures (rd.png: every curve; rd_slice.png: one
slice under every codec at equal bytes). Every row scores its slices over the whole slice and inside the brain
(mean_ssim_brain, mean_psnr_brain: imaging.quality's SSIM and PSNR within each slice's brain mask, anatomy.brain's).
compress.py rd is its command line.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anatomy.tissues import DICE_COLUMNS, dice_table
from codec.classical import BudgetSearch, classical_codec
from codec.vqz import HEADER, Codec
from imaging.quality import psnr, ssim
from imaging.slices import uint8_to_unit
from utils import UserError, one_line_reason, pyplot, read_json


def scores(decoded: np.ndarray, original: np.ndarray, brain: np.ndarray | None = None) -> tuple[float, float]:
    """SSIM and PSNR of one uint8 (H, W) slice against its original; inside `brain` (bool (H, W)) where given."""
    x = uint8_to_unit(torch.from_numpy(np.array(decoded)))[None, None]
    y = uint8_to_unit(torch.from_numpy(np.array(original)))[None, None]
    mask = None if brain is None else torch.from_numpy(brain)[None, None]
    return float(ssim(x, y, mask=mask)[0]), float(psnr(x, y, mask=mask)[0])


def mean_scores(decoded: torch.Tensor, originals: torch.Tensor,
                brain: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice SSIM and PSNR of uint8 (N, H, W) slices against their originals -> two (N,) arrays; inside `brain`
    (bool (N, H, W)) where given, NaN for a slice whose mask is empty."""
    s, p = [], []
    for start in range(0, len(decoded), 64):
        x, y = (uint8_to_unit(a[start:start + 64])[:, None] for a in (decoded, originals))  # (B, 1, H, W)
        mask = None if brain is None else brain[start:start + 64, None]
        s.append(ssim(x, y, mask=mask))
        p.append(psnr(x, y, mask=mask))
    return torch.cat(s).numpy(), torch.cat(p).numpy()


def nan_mean(values) -> float:
    """The mean of the values that are not NaN (in-brain scores of slices with an empty brain mask are); NaN where
    none is left."""
    values = np.asarray(values, dtype=np.float64)
    scored = values[~np.isnan(values)]
    return float(scored.mean()) if len(scored) else float("nan")


BRAIN_COLUMNS = ("mean_ssim_brain", "mean_psnr_brain")  # rd.csv's in-brain scores, its last columns


# ---------------------------------------------------------------------------------------------------------
# What the study measures
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VqvaeFiles:
    """A VQ-VAE's files under one coder, per slice: the file's size and its reconstruction's SSIM and PSNR, over the
    slice and inside the brain (one reconstruction under every coder). The ladder picks among these, and the
    classical codecs are measured at these sizes."""
    codec: str                # its row's codec: "VQ-VAE <label>"
    coder: str                # its row's setting
    sizes: np.ndarray         # (N,) bytes
    ssim: np.ndarray          # (N,)
    psnr: np.ndarray          # (N,)
    ssim_brain: np.ndarray    # (N,) NaN for a slice whose brain mask is empty
    psnr_brain: np.ndarray    # (N,) likewise

    @property
    def name(self) -> str:
        return f"{self.codec} {self.coder}"


@dataclass
class MeasuredVqvae:
    """One VQ-VAE measured as a codec."""
    rows: list[dict]          # its rows of rd.csv, one per coder
    files: list[VqvaeFiles]   # the same, per slice
    speed: dict               # slices per second of its encoder, decoder and prior coding
    figure: dict              # {"coder": its coder of the smallest files, "files": those files, "recon": its images}
    model: dict               # its grid, K and weights hashes, and what the caller records of it


@dataclass
class RdStudy:
    """What `rate_distortion` measured."""
    images: torch.Tensor                # uint8 (N, H, W): the slices measured
    files: list[str]                    # their file names
    codecs: list[str]                   # the classical codecs compared
    budgets: list[int]
    rows: list[dict]                    # rd.csv: the VQ-VAEs, the classical codecs, the ladder, the learned peers
    models: dict[str, MeasuredVqvae]    # by label
    ladder_picks: dict                  # budget -> per slice the label of the VQ-VAE the ladder picked, or None
    brain_mask: str                     # the rule of the brain masks of the in-brain scores (anatomy.brain)

    def figures(self) -> dict:
        return {label: m.figure for label, m in self.models.items()}

    def summary(self) -> dict:
        """rd.json, less what the command adds."""
        return {"images": len(self.images), "image_size": list(self.images.shape[1:]), "header_bytes": HEADER.size,
                "budgets": self.budgets, "codecs": self.codecs,
                "models": {label: m.model for label, m in self.models.items()}, "rows": self.rows,
                "speed": {label: m.speed for label, m in self.models.items()}, "targets": targets(self.rows),
                "about": "bytes are whole .vqz files (38-byte header included) and whole classical files "
                         "(JPEG 2000 as a raw codestream, without the JP2 container); classical means are over the "
                         "images that fit the budget, images_over_budget counts the others",
                "brain_mask": self.brain_mask}

    def table(self) -> list[dict]:
        """rd.csv's rows: every row with every column (empty where it has none: a learned peer's in-brain scores),
        the in-brain ones (BRAIN_COLUMNS) last, as they came last to the table."""
        columns = [*dict.fromkeys(k for r in self.rows for k in r if k not in BRAIN_COLUMNS), *BRAIN_COLUMNS]
        return [{c: r.get(c, "") for c in columns} for r in self.rows]


def rate_distortion(models, slices: tuple, brain: tuple[torch.Tensor, str], codecs: list[str], budgets: list[int],
                    workers: int = 1, verify: bool = True, peers=()) -> RdStudy:
    """The study on `slices` (rd_slices' images, labels, files), scored over each slice and inside its brain mask
    (`brain`: bool (N, H, W) masks and their rule, anatomy.brain.brain_masks'): each of `models` ((label, Codec,
    what rd.json records of it)) measured as a codec; per budget the ladder over their files; each classical codec
    of `codecs` searched per slice at each budget and at the size of each slice's file under each VQ-VAE and coder;
    the rate points of each learned peer (`peers`: rd_hyperprior.json files, read first; no in-brain scores)."""
    images, labels, files = slices
    masks, rule = brain
    peer = [row for path in peers for row in peer_rows(path, files)]
    measured = {}
    for label, codec, record in models:
        if label in measured:  # the same run twice (e.g. with and without its prior)
            label = f"{label} #{len(measured) + 1}"
        measured[label] = measure_vqvae(codec, images, labels, masks, files, label, verify)
        measured[label].model.update(record)
    candidates = [f for m in measured.values() for f in m.files]
    ladder, picks = ladder_rows(candidates, budgets)
    rows = [row for m in measured.values() for row in m.rows]
    rows += classical_rows(images, masks, codecs, budgets, candidates, workers)
    return RdStudy(images, files, codecs, budgets, rows + ladder + peer, measured, picks, rule)


# ---------------------------------------------------------------------------------------------------------
# The VQ-VAEs
# ---------------------------------------------------------------------------------------------------------

def measure_vqvae(codec: Codec, images: torch.Tensor, labels: torch.Tensor, brain: torch.Tensor, names: list[str],
                  label: str, verify: bool) -> MeasuredVqvae:
    """One VQ-VAE as a codec: its reconstructions' scores (over each slice and inside its `brain` mask), its files
    under every coder it has (the prior-coded ones decoded again with `verify`), their speed."""
    n, (height, width) = len(images), images.shape[1:]
    t0 = time.perf_counter()
    codes = codec.codes(images)
    t_codes = time.perf_counter() - t0
    t0 = time.perf_counter()
    recon = codec.reconstruct(codes)
    speed = {"vqvae_encode_slices_per_s": n / t_codes, "vqvae_decode_slices_per_s": n / (time.perf_counter() - t0),
             "threads": torch.get_num_threads(), "device": str(codec.device)}
    coded = {coder: codec.encode_codes(codes, (height, width), coder=coder) for coder in ("fixed", "static")}
    ideal = None
    if codec.prior is not None:
        y = labels if codec.prior.config.num_classes else None
        ideal = []
        t0 = time.perf_counter()
        with tqdm(total=n, desc=f"{label}: prior encoding", unit="slice", leave=False) as bar:
            coded["prior"] = codec.encode_codes(codes, (height, width), y, "prior", bar, ideal)
        speed["prior_encode_slices_per_s"] = n / (t_codes + time.perf_counter() - t0)
        if verify:
            speed["prior_decode_slices_per_s"] = verify_decoding(codec, coded["prior"], codes, recon, names, label)
    s, p = mean_scores(recon, images)
    s_brain, p_brain = mean_scores(recon, images, brain)
    h, w = codes.shape[1:]
    files = [VqvaeFiles(f"VQ-VAE {label}", coder, np.array([len(b) for b in blobs], dtype=np.float64), s, p,
                        s_brain, p_brain) for coder, blobs in coded.items()]
    rows = [vqvae_row(f, (h, w), codec.k, ideal if f.coder == "prior" else None) for f in files]
    best = min(coded, key=lambda c: np.mean([len(b) for b in coded[c]]))
    model = {"latent_grid": [h, w], "K": codec.k, "vqvae_hash": codec.vqvae_hash.hex(),
             "prior_hash": codec.prior_hash.hex()}
    return MeasuredVqvae(rows, files, speed, {"coder": best, "files": coded[best], "recon": recon}, model)


def verify_decoding(codec: Codec, files: list[bytes], codes: torch.Tensor, recon: torch.Tensor, names: list[str],
                    label: str) -> float:
    """Decode prior-coded files again: UserError unless they give back the same codes and images; -> slices/s."""
    t0 = time.perf_counter()
    with tqdm(total=len(files), desc=f"{label}: prior decoding", unit="slice", leave=False) as bar:
        decoded_codes, decoded = codec.decode(files, [f"{f} ({label})" for f in names], bar)
    if not torch.equal(decoded_codes, codes) or not torch.equal(decoded, recon):
        raise UserError(f"{label}: decoding the prior-coded files did not give back the same codes and images; "
                        f"please report this")
    return len(files) / (time.perf_counter() - t0)


def vqvae_row(files: VqvaeFiles, grid: tuple[int, int], k: int, ideal: list | None) -> dict:
    """One row of rd.csv for a VQ-VAE's files under one coder (SSIM and PSNR are its reconstructions', whatever
    the coder)."""
    sizes, s, p = files.sizes, files.ssim, files.psnr
    h, w = grid
    row = {"codec": files.codec, "setting": files.coder, "budget_bytes": "", "images": len(sizes),
           "images_fit": len(sizes), "images_over_budget": 0, "mean_bytes": sizes.mean(),
           "mean_payload_bytes": sizes.mean() - HEADER.size, "bits_per_slice": sizes.mean() * 8,
           "payload_bits_per_code": (sizes.mean() - HEADER.size) * 8 / (h * w),
           "mean_ssim": float(s.mean()), "std_ssim": float(s.std()), "mean_psnr": float(p.mean()),
           "latent_grid": f"{h}x{w}", "K": k}
    if ideal is not None:
        row["ideal_payload_bytes"] = float(np.mean(ideal)) / 8
    return {**row, "mean_ssim_brain": nan_mean(files.ssim_brain), "mean_psnr_brain": nan_mean(files.psnr_brain)}


LADDER = "ladder"  # the codec of the rows that pick, per slice, the best VQ-VAE file within a budget


def ladder_rows(vq: list[VqvaeFiles], budgets: list[int]) -> tuple[list[dict], dict]:
    """What encoding with a byte budget gives over these VQ-VAE files (each model under each coder): per slice, of
    the files within the budget the one whose reconstruction has the best SSIM, the smaller on a tie (Ladder's
    rule, on the whole slice); means over the slices where some file fits, the others counted, as for the classical
    codecs.
    -> (one row per budget, {budget: per slice the label of the VQ-VAE picked, None where none fits})."""
    sizes = np.stack([f.sizes for f in vq])  # (candidates, slices)
    ssims, psnrs = np.stack([f.ssim for f in vq]), np.stack([f.psnr for f in vq])
    ssims_brain, psnrs_brain = np.stack([f.ssim_brain for f in vq]), np.stack([f.psnr_brain for f in vq])
    rows, picks = [], {}
    for budget in budgets:
        # best SSIM among the files that fit, then the smallest: lexicographic argmax over (ssim, -size)
        score = np.where(sizes <= budget, ssims, -np.inf)
        order = np.lexsort((sizes, -score), axis=0)[0]  # (slices,) the chosen candidate of each slice
        picked = np.arange(sizes.shape[1])
        fit = np.isfinite(score[order, picked])
        chosen = lambda a: a[order, picked][fit]  # noqa: E731
        mean = lambda a: float(chosen(a).mean()) if fit.any() else float("nan")  # noqa: E731
        counts = "; ".join(f"{vq[c].codec} {vq[c].coder}: {n}" for c, n in
                           zip(*np.unique(order[fit], return_counts=True)))
        rows.append({"codec": LADDER, "setting": "best VQ-VAE file per slice within the budget",
                     "budget_bytes": budget, "images": sizes.shape[1], "images_fit": int(fit.sum()),
                     "images_over_budget": int((~fit).sum()),
                     "smallest_file_of_an_image_over_budget": int(sizes.min(0)[~fit].min()) if (~fit).any() else "",
                     "mean_bytes": mean(sizes), "mean_payload_bytes": mean(sizes) - HEADER.size,
                     "bits_per_slice": mean(sizes) * 8, "payload_bits_per_code": "", "mean_ssim": mean(ssims),
                     "std_ssim": float(chosen(ssims).std()) if fit.any() else float("nan"), "mean_psnr": mean(psnrs),
                     "latent_grid": "", "K": "", "files_chosen": counts,
                     "mean_ssim_brain": nan_mean(chosen(ssims_brain)),
                     "mean_psnr_brain": nan_mean(chosen(psnrs_brain))})
        picks[budget] = [vq[c].codec.removeprefix("VQ-VAE ") if f else None for c, f in zip(order, fit)]
    return rows, picks


# ---------------------------------------------------------------------------------------------------------
# The slices and the learned peers
# ---------------------------------------------------------------------------------------------------------

RATE_POINT = "rate point"  # the budget_bytes of a learned peer's row: one trained model, not a byte budget


PEER_COLUMNS = {"codec": str, "setting": str, "images_fit": int, "images_over_budget": int, "mean_bytes": float,
                "mean_ssim": float, "mean_psnr": float}  # what the study reads of each of a peer's rows


def peer_rows(path: Path, files: list[str]) -> list[dict]:
    """The rows of a learned peer's rd file (hyperprior.py rd's rd_hyperprior.json), which must have measured the
    very slices `files`; UserError for a file the study could not use to its end (a row without PEER_COLUMNS, or
    a value of another type), before anything is measured."""
    try:
        peer = read_json(path)
        rows, measured = peer["rows"], [Path(str(f)).name for f in peer["files"]]
        for r in rows:
            bad = [k for k, kind in PEER_COLUMNS.items() if not isinstance(r.get(k), kind)
                   and not (kind is float and type(r.get(k)) is int)]
            if bad:
                raise ValueError(f"a row lacks {bad[0]} or it is not a {PEER_COLUMNS[bad[0]].__name__}")
            if r["codec"] == LADDER or r["codec"].startswith("VQ-VAE"):
                raise ValueError(f"a row's codec is named {r['codec']!r}, as the study's own rows are")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read the peer's rate points {path} ({one_line_reason(e)}); pass the "
                        f"rd_hyperprior.json that hyperprior.py rd wrote") from None
    if measured != [Path(str(f)).name for f in files]:
        raise UserError(f"{path} measured other slices ({len(measured)}) than this study ({len(files)}); run "
                        f"hyperprior.py rd with the same --split and --max-images")
    return [{**r, "budget_bytes": RATE_POINT} for r in rows]


def rd_subset(data, max_images: int | None):
    """The slices of a split (a SliceDataset) that a study measures: all of them, or `max_images` spread evenly
    over it (with their masks, where it has them): every study of the same split and --max-images measures the same
    slices."""
    if not max_images or len(data.images) <= max_images:
        return data
    return data.subset(torch.linspace(0, len(data.images) - 1, max_images).round().long())


def rd_slices(data, max_images: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images, labels, file names) of rd_subset."""
    picked = rd_subset(data, max_images)
    return picked.images, picked.labels, list(picked.files)


# ---------------------------------------------------------------------------------------------------------
# The classical codecs
# ---------------------------------------------------------------------------------------------------------

def classical_one_image(job):
    """One image through every codec at every budget: (image, brain mask, codecs, budgets, matched) -> {codec:
    {budget or ("matched", name): (bytes, ssim, psnr, ssim_brain, psnr_brain) or None, "smallest": bytes}}.
    `matched` maps a name to this image's own budget (the size of its .vqz file under one VQ-VAE and coder). A
    worker's unit of work."""
    image, brain, codecs, budgets, matched = job
    result = {}
    for name in codecs:
        codec = classical_codec(name)
        search = BudgetSearch(image, codec)
        result[name] = {"smallest": search.smallest()}
        wanted = [(b, b) for b in budgets] + [(("matched", key), b) for key, b in matched.items()]
        for key, budget in wanted:
            data = search.fit(budget)
            if data is None:
                result[name][key] = None
            else:
                decoded = codec.decode(data)
                result[name][key] = (len(data), *scores(decoded, image), *scores(decoded, image, brain))
    return result


def worker_init():
    torch.set_num_threads(1)


def classical_study(images: np.ndarray, brain: np.ndarray, codecs, budgets, matched: dict, workers: int) -> list:
    """classical_one_image over all images (uint8 (N, H, W), brain masks bool (N, H, W)); matched: name -> (N,)
    per-image budgets."""
    jobs = [(image, mask, codecs, budgets, {name: int(b[i]) for name, b in matched.items()})
            for i, (image, mask) in enumerate(zip(images, brain))]
    desc = f"{', '.join(codecs)}: quality searched per slice"
    if workers <= 1:
        return [classical_one_image(j) for j in tqdm(jobs, desc=desc, unit="slice", leave=False)]
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers, initializer=worker_init) as pool:
        return list(tqdm(pool.imap(classical_one_image, jobs, chunksize=4), total=len(jobs), desc=desc,
                         unit="slice", leave=False))


def classical_rows(images: torch.Tensor, brain: torch.Tensor, codecs: list[str], budgets: list[int],
                   vq: list[VqvaeFiles], workers: int) -> list[dict]:
    """The rows of rd.csv of each classical codec: at each fixed budget, and at each slice's own file size under
    each VQ-VAE and coder."""
    matched = {f.name: f.sizes for f in vq}
    results = classical_study(images.numpy(), brain.numpy(), codecs, budgets, matched, workers)
    rows = []
    for codec in codecs:
        rows += [classical_row(results, codec, b, "quality searched per slice", b) for b in budgets]
        rows += [classical_row(results, codec, ("matched", name), f"at the size of each {name} file", "per slice")
                 for name in matched]
    return rows


def classical_row(results: list, codec: str, key, setting: str, budget) -> dict:
    """One row of rd.csv from classical_one_image results: means over the images that fit, the others counted."""
    fit = [r[codec][key] for r in results if r[codec][key] is not None]
    over = [r[codec]["smallest"] for r in results if r[codec][key] is None]
    mean = lambda i: float(np.mean([f[i] for f in fit])) if fit else float("nan")  # noqa: E731
    return {"codec": codec, "setting": setting, "budget_bytes": budget, "images": len(results),
            "images_fit": len(fit), "images_over_budget": len(over),
            "smallest_file_of_an_image_over_budget": min(over) if over else "",
            "mean_bytes": mean(0), "mean_payload_bytes": "", "bits_per_slice": mean(0) * 8,
            "payload_bits_per_code": "", "mean_ssim": mean(1),
            "std_ssim": float(np.std([f[1] for f in fit])) if fit else float("nan"), "mean_psnr": mean(2),
            "latent_grid": "", "K": "", "mean_ssim_brain": nan_mean([f[3] for f in fit]),
            "mean_psnr_brain": nan_mean([f[4] for f in fit])}


# ---------------------------------------------------------------------------------------------------------
# Tissue Dice per codec and budget
# ---------------------------------------------------------------------------------------------------------

def dice_rows(segment, masks: torch.Tensor, study: RdStudy) -> list[dict]:
    """The rows of rd_anatomy.csv: `segment` (uint8 (N, H, W) slices -> (N, H, W) tissue labels) scored against
    `masks` on the study's originals, on each VQ-VAE's reconstruction (one per VQ-VAE, listed at the mean file size
    of each of its coders), on the ladder's at each budget (each slice the reconstruction of the VQ-VAE the ladder
    picked) and on each classical codec at each budget (the slices that fit in no file left out and counted)."""
    originals, rows, figure, ladder_picks = study.images, study.rows, study.figures(), study.ladder_picks
    def dice_row(codec, setting, budget, images, picked, mean_bytes):
        dice = dice_table(segment(images), masks[picked]).mean(0)
        return {"codec": codec, "setting": setting, "budget_bytes": budget, "images": len(masks),
                "images_fit": len(picked), "mean_bytes": mean_bytes, **dict(zip(DICE_COLUMNS, dice.tolist()))}

    everything = list(range(len(masks)))
    table = [dice_row("original", "8-bit PNG", "", originals, everything, "")]
    for r in rows:
        if r["codec"].startswith("VQ-VAE"):
            recon = figure[r["codec"].removeprefix("VQ-VAE ")]["recon"]
            table.append(dice_row(r["codec"], r["setting"], "", recon, everything, r["mean_bytes"]))
    for r in rows:
        picked = ladder_picks.get(r["budget_bytes"]) if r["codec"] == LADDER else None
        if fit := [i for i, label in enumerate(picked or ()) if label]:
            images = torch.stack([figure[picked[i]]["recon"][i] for i in fit])
            table.append(dice_row(LADDER, r["setting"], r["budget_bytes"], images, fit, r["mean_bytes"]))
    for name in study.codecs:
        codec = classical_codec(name)
        fits = {b: [] for b in study.budgets}  # budget -> (slice index, file) of the slices that fit
        for i, image in enumerate(tqdm(originals.numpy(), desc=f"{name}: Dice per budget", leave=False)):
            search = BudgetSearch(image, codec)
            for b in study.budgets:
                if (data_bytes := search.fit(b)) is not None:
                    fits[b].append((i, data_bytes))
        for b, fit in fits.items():
            if fit:
                decoded = torch.from_numpy(np.stack([codec.decode(f) for _, f in fit]))
                table.append(dice_row(name, "quality searched per slice", b, decoded, [i for i, _ in fit],
                                      float(np.mean([len(f) for _, f in fit]))))
    return table


def dice_against(table: list[dict], codec: str, budget: int) -> dict:
    """Each VQ-VAE row whose mean file fits `budget`: its mean Dice minus that of `codec` at `budget` bytes."""
    reference = [r for r in table if r["codec"] == codec and r["budget_bytes"] == budget]
    if not reference:
        return {}
    return {f"{r['codec']} {r['setting']} ({r['mean_bytes']:.0f} B)": r["dice_mean"] - reference[0]["dice_mean"]
            for r in table if r["codec"].startswith("VQ-VAE") and r["mean_bytes"] <= budget}


# ---------------------------------------------------------------------------------------------------------
# Targets and BD-rates
# ---------------------------------------------------------------------------------------------------------

def targets(rows: list[dict]) -> dict:
    """The codec's targets as measured: SSIM against JPEG 2000 at 640 bytes and at equal bytes per slice, the
    prior-coded size, and whether the VQ-VAE points lie above every classical codec's points below 1.5 KB."""
    vq = [r for r in rows if r["codec"].startswith("VQ-VAE")]
    ladder = {r["budget_bytes"]: r for r in rows if r["codec"] == LADDER}
    classical = [r for r in rows if not r["codec"].startswith("VQ-VAE") and r["codec"] != LADDER]
    out = {}
    j2k640 = [r for r in classical if r["codec"] == "jpeg2000" and r["budget_bytes"] == 640]
    if j2k640:
        j = j2k640[0]
        out["jpeg2000_at_640_bytes"] = {k: j[k] for k in ("mean_ssim", "mean_bytes", "images_over_budget")}
        out["ssim_minus_jpeg2000_at_640_bytes"] = {
            f"{r['codec']} {r['setting']} ({r['mean_bytes']:.0f} B file, {r['mean_payload_bytes']:.0f} B payload)":
                r["mean_ssim"] - j["mean_ssim"] for r in vq if r["mean_payload_bytes"] <= 640}
    out["ssim_minus_classical_at_equal_bytes_per_slice"] = {
        f"{r['codec']} {r['setting']}": {
            c["codec"]: {"ssim_gain": r["mean_ssim"] - c["mean_ssim"], "images_over_budget": c["images_over_budget"]}
            for c in classical if c["setting"] == f"at the size of each {r['codec']} {r['setting']} file"}
        for r in vq}
    out["prior_coded_mean_bytes"] = {r["codec"]: {"file": r["mean_bytes"], "payload": r["mean_payload_bytes"]}
                                     for r in vq if r["setting"] == "prior"}
    above = {}
    for r in classical:
        if not isinstance(r["budget_bytes"], int) or r["budget_bytes"] > 1536 or not math.isfinite(r["mean_ssim"]):
            continue
        within = [v["mean_ssim"] for v in vq if v["mean_bytes"] <= r["budget_bytes"]]
        above[f"{r['codec']} <= {r['budget_bytes']} B"] = (max(within) > r["mean_ssim"]) if within else None
    out["vqvae_above_classical_below_1536_bytes"] = {
        "about": "per classical point: does a VQ-VAE point with at most its budget in mean file bytes have a higher "
                 "mean SSIM (null: no VQ-VAE point that small)", **above}
    out["vqvae_above_every_classical_point_below_1536_bytes"] = bool(above) and all(v is True for v in above.values())
    out["bd_rate_percent"] = bd_rates(vq, classical)
    if ladder:
        out["ladder_minus_classical_at_each_budget_256_to_2048"] = ladder_gains(ladder, classical)
    return out


def ladder_gains(ladder: dict, classical: list[dict]) -> dict:
    """Per budget from 256 B to 2 KB: the ladder's mean SSIM minus each classical codec's at that budget where every
    slice fit it (a codec that fits only some slices is listed with how many did not, and not compared), and
    whether the ladder is above all of those that fit."""
    out, every = {}, []
    for budget, ours in sorted(ladder.items()):
        if not 256 <= budget <= 2048:
            continue
        gains, over = {}, {}
        for r in classical:
            if r["budget_bytes"] != budget:
                continue
            if r["images_over_budget"]:
                over[r["codec"]] = r["images_over_budget"]
            else:
                gains[r["codec"]] = ours["mean_ssim"] - r["mean_ssim"]
        above = bool(gains) and ours["images_over_budget"] == 0 and all(g > 0 for g in gains.values())
        every.append(above or not gains)
        out[f"{budget} B"] = {"ladder_ssim": ours["mean_ssim"], "ladder_images_over_budget": ours["images_over_budget"],
                              "ssim_gain_over": gains, "classical_images_over_budget": over,
                              "above_every_classical_codec_that_fits": above if gains else None}
    out["above_at_every_budget"] = bool(out) and all(every)
    return out


def bd_rates(vq: list[dict], classical: list[dict]) -> dict:
    """BD-rate on SSIM and on PSNR, over the whole slice and inside the brain, of the VQ-VAE curve (each VQ-VAE's
    smallest file: its operating point) against each classical codec's curve (its budgets where every slice fit,
    so each mean is over the same slices) and each learned peer's (its rate points; none inside the brain)."""
    smallest = {}
    for r in vq:
        if r["codec"] not in smallest or r["mean_bytes"] < smallest[r["codec"]]["mean_bytes"]:
            smallest[r["codec"]] = r
    ours = list(smallest.values())
    out = {"about": "mean change in bytes (%) of the VQ-VAE points against each codec at equal quality, over the "
                    "quality range both cover (null: fewer than 2 points on a curve, or no shared range)",
           "vqvae_points": [f"{r['codec']} {r['setting']}" for r in ours]}
    def curve(points: list[dict], metric: str) -> tuple[list, list]:
        """(bytes, quality) of each point; NaN quality where a row has none (a peer's inside the brain)."""
        return [r["mean_bytes"] for r in points], [r.get(f"mean_{metric}", float("nan")) for r in points]

    for codec in dict.fromkeys(r["codec"] for r in classical):
        theirs = [r for r in classical if r["codec"] == codec and (r["budget_bytes"] == RATE_POINT or (
                  isinstance(r["budget_bytes"], int) and r["images_over_budget"] == 0))]
        out[codec] = {metric: bd_rate(*curve(ours, metric), *curve(theirs, metric))
                      for metric in ("ssim", "psnr", "ssim_brain", "psnr_brain")}
    return out


def bd_rate(rates, qualities, reference_rates, reference_qualities) -> float | None:
    """Bjontegaard delta rate (VCEG-M33): the mean change in bytes, in percent, of one codec's curve against a
    reference at equal quality (SSIM or PSNR), over the quality range both curves cover. Each curve's log-rate is
    fitted as a polynomial in quality (cubic from 4 points, lower with fewer) and the fits' difference integrated
    over the shared range; -40 means 40 % fewer bytes for the same quality. None where the curves have fewer than
    2 points each or do not overlap in quality."""
    curves = []
    for r, q in ((rates, qualities), (reference_rates, reference_qualities)):
        pts = sorted((float(b), float(a)) for a, b in zip(r, q) if math.isfinite(a) and math.isfinite(b) and a > 0)
        if len({b for b, _ in pts}) < 2:
            return None
        quality, rate = np.array(pts).T
        curves.append((np.polyfit(quality, np.log(rate), min(3, len(pts) - 1)), quality.min(), quality.max()))
    (fit, lo_a, hi_a), (reference_fit, lo_b, hi_b) = curves
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if hi <= lo:
        return None
    mean_log_ratio = np.diff(np.polyval(np.polyint(np.polysub(fit, reference_fit)), [lo, hi]))[0] / (hi - lo)
    return float(100 * (np.exp(mean_log_ratio) - 1))


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------

def plot_rd(rows: list[dict], path: Path, title: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, name in zip(axes, ("mean_ssim", "mean_psnr"), ("mean SSIM", "mean PSNR (dB)")):
        for codec in dict.fromkeys(r["codec"] for r in rows if not r["codec"].startswith("VQ-VAE")):
            pts = sorted((r for r in rows if r["codec"] == codec and math.isfinite(r[metric])
                          and (isinstance(r["budget_bytes"], int) or r["budget_bytes"] == RATE_POINT)),
                         key=lambda r: r["mean_bytes"])
            if not pts:
                continue
            style = {"color": "black", "lw": 2.5, "zorder": 3} if codec == LADDER else {}
            line, = ax.plot([r["mean_bytes"] for r in pts], [r[metric] for r in pts], marker="o", ms=3, label=codec,
                            **style)
            matched = [r for r in rows if r["codec"] == codec and math.isfinite(r[metric])
                       and not isinstance(r["budget_bytes"], int)]
            ax.plot([r["mean_bytes"] for r in matched], [r[metric] for r in matched], ls="none", marker="x", ms=6,
                    color=line.get_color())
            for r in pts:
                if r["images_over_budget"]:
                    ax.plot(r["mean_bytes"], r[metric], marker="o", ms=8, mfc="none", color=line.get_color())
                    ax.annotate(f"{r['images_over_budget']} over", (r["mean_bytes"], r[metric]), fontsize=6,
                                textcoords="offset points", xytext=(3, -8), color=line.get_color())
        markers = {"fixed": "s", "static": "^", "prior": "*"}
        for codec in dict.fromkeys(r["codec"] for r in rows if r["codec"].startswith("VQ-VAE")):
            pts = sorted((r for r in rows if r["codec"] == codec), key=lambda r: r["mean_bytes"])
            line, = ax.plot([r["mean_bytes"] for r in pts], [r[metric] for r in pts], ls=":", lw=1.5, label=codec)
            for r in pts:
                ax.plot(r["mean_bytes"], r[metric], marker=markers.get(r["setting"], "o"),
                        ms=9 if r["setting"] == "prior" else 6, color=line.get_color())
        ax.axvline(1536, color="grey", lw=0.5, ls="--")
        ax.set(xscale="log", xlabel="bytes per slice (whole file)", ylabel=name, title=f"{name} vs size")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               title="VQ-VAE: square fixed-length, triangle static, star prior coding (one reconstruction, so one "
                     "SSIM); classical: o at each budget (ringed: some slices did not fit), x at each VQ-VAE file's "
                     "size per slice", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * math.ceil(len(labels) / 4), 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slice_figure(study: RdStudy, path: Path, index: int):
    """Slice `index`: the original, then per VQ-VAE its decoded file beside every classical codec at the same
    bytes."""
    plt = pyplot()
    original, codecs, figure = study.images[index].numpy(), study.codecs, study.figures()
    rows = list(figure.items())
    cols = 2 + len(codecs)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.5 * len(rows)), squeeze=False)
    for r, (label, entry) in enumerate(rows):
        budget = len(entry["files"][index])
        vq = entry["recon"][index].numpy()
        panels = [("original", original), (f"VQ-VAE {label}\n{entry['coder']}, {budget} B, SSIM "
                                           f"{scores(vq, original)[0]:.3f}", vq)]
        for name in codecs:
            search = BudgetSearch(original, classical_codec(name))
            data = search.fit(budget)
            if data is None:
                panels.append((f"{name}: does not fit in {budget} B\n(its smallest file: {search.smallest()} B)",
                               None))
            else:
                decoded = search.codec.decode(data)
                panels.append((f"{name}, {len(data)} B\nSSIM {scores(decoded, original)[0]:.3f}", decoded))
        for ax, (title, image) in zip(axes[r], panels):
            if image is not None:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{Path(str(study.files[index])).name}: every codec at (at most) the VQ-VAE file's bytes", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
