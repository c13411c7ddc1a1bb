"""Datasets: Cityscapes and CamVid in their official layouts, and a procedural synthetic set.

Every sample is ``(image float32 [3, H, W] normalised, label int64 [H, W])`` with 255 = ignore.
Training augmentation is the paper's (§4.2): random horizontal flip, random scale in
[0.5, 2.0], random crop (padded with ignore where the scaled image is smaller). Randomness is
drawn from a generator seeded by (seed, epoch, index), so two processes that see the same index
in the same epoch augment it identically — which the DDP equivalence test relies on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

IGNORE = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# Cityscapes labelIds → trainIds (19 classes), from the official cityscapesScripts label table.
# Written out, not imported: cityscapesscripts 2.3 requires pyquaternion, coloredlogs, appdirs,
# requests and the obsolete `typing` backport — five packages for these 19 pairs.
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                          25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CAMVID_CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist")


class DataRootError(FileNotFoundError):
    """The data root lacks the layout a loader expects; the message names the directory."""


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


class _Axis(NamedTuple):
    """Where each output position of one axis reads from the source image (see :func:`_axis`)."""

    i0: torch.Tensor  # bilinear: the lower source index (int64, [n])
    i1: torch.Tensor  # and the upper one
    w1: torch.Tensor  # weight of i1 (float32, [n])
    near: torch.Tensor  # nearest-neighbour source index (labels)
    inside: torch.Tensor  # False where the position lies in the padding (bool, [n])


def _axis(offset: int, n: int, src_len: int, scaled_len: int, flip: bool) -> _Axis:
    """Positions ``offset … offset+n−1`` of an axis resized from ``src_len`` to ``scaled_len`` and
    padded at the end, optionally flipped before the resize: the source indices and weights
    ``F.interpolate`` would use (bilinear with ``align_corners=False``, and ``nearest``), in its
    float32 arithmetic, so sampling only the crop gives the crop of the resized image."""
    dst = torch.arange(offset, offset + n, dtype=torch.float32)
    scale = torch.tensor(src_len / scaled_len, dtype=torch.float32)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=src_len - 1)  # truncation is floor here: src ≥ 0
    i1 = (i0 + 1).clamp(max=src_len - 1)
    w1 = (src - i0).clamp(0, 1)
    near = (dst * scale).floor().long().clamp(max=src_len - 1)
    if flip:
        i0, i1, near = src_len - 1 - i0, src_len - 1 - i1, src_len - 1 - near
    return _Axis(i0, i1, w1, near, dst < scaled_len)


def _resample(img: torch.Tensor, lbl: torch.Tensor, rows: _Axis, cols: _Axis,
              label_too: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The output pixels only, gathered from the source: image [3, H, W] (uint8 0–255 or float
    0–1) → float32 [3, h, w] in 0–1 (bilinear, 0 in the padding); label [H, W] → int64 [h, w]
    (nearest, ignore in the padding). A full-size float copy of a 1024×2048 image, and of it scaled
    up to 2×, was most of a sample's cost: 179–212 → 63–64 ms median on one EPYC core
    (bench/loader_cost.py), of which ~47 ms is now PNG decoding."""
    r0, r1, c0, c1 = rows.i0[:, None], rows.i1[:, None], cols.i0[None, :], cols.i1[None, :]
    wy, wx = rows.w1[:, None], cols.w1[None, :]

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return img[:, r, c].float()

    out = (1 - wy) * ((1 - wx) * at(r0, c0) + wx * at(r0, c1)) + wy * ((1 - wx) * at(r1, c0) + wx * at(r1, c1))
    if img.dtype == torch.uint8:
        out = out / 255.0
    inside = rows.inside[:, None] & cols.inside[None, :]
    out = out * inside
    if label_too:
        lbl = lbl[rows.near[:, None], cols.near[None, :]].long().masked_fill(~inside, IGNORE)
    return out, lbl


class Augment:
    """Flip, scale in [scale_min, scale_max], crop to ``crop`` (H, W); identity when ``train`` is
    False except the resize to ``crop`` (for validation at a fixed size). With ``keep_label`` the
    label keeps its original size (evaluation the way Cityscapes users score: the network runs at
    its input size, its prediction is upsampled to the 1024×2048 label). Only the output pixels are
    computed: the same values as resizing the whole image with ``F.interpolate`` and cropping
    (tests/test_search_client.py checks it), without the full-size work."""

    def __init__(self, crop: tuple[int, int], train: bool, scale: tuple[float, float] = (0.5, 2.0),
                 keep_label: bool = False) -> None:
        self.crop, self.train, self.scale, self.keep_label = crop, train, scale, keep_label

    def __call__(self, img: torch.Tensor, lbl: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``img`` [3, H, W] uint8 or float 0–1, ``lbl`` [H, W] integer → float32 [3, h, w] 0–1,
        int64 [h, w] (full size with ``keep_label``)."""
        ch, cw = self.crop
        h, w = img.shape[-2:]
        if not self.train:
            rows, cols = _axis(0, ch, h, ch, False), _axis(0, cw, w, cw, False)
            out, out_lbl = _resample(img, lbl, rows, cols, label_too=not self.keep_label)
            return out, out_lbl.long()
        flip = bool(torch.rand((), generator=gen) < 0.5)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * float(torch.rand((), generator=gen))
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        y = int(torch.randint(0, max(nh, ch) - ch + 1, (), generator=gen))
        x = int(torch.randint(0, max(nw, cw) - cw + 1, (), generator=gen))
        return _resample(img, lbl, _axis(y, ch, h, nh, False), _axis(x, cw, w, nw, flip), label_too=True)


def augment_by_interpolate(aug: Augment, img: torch.Tensor, lbl: torch.Tensor,
                           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`Augment` done the obvious way — flip, resize the whole image with F.interpolate,
    pad, crop — drawing the same random numbers in the same order. Not used in training: it is
    the reference the tests hold :class:`Augment` to, and what it replaced (bench/loader_cost.py).
    img: (3, H, W) uint8 or float; lbl: (H, W) → (3, ch, cw) float, (ch, cw) long."""
    ch, cw = aug.crop
    img = img.float() / 255 if img.dtype == torch.uint8 else img
    lbl = lbl.long()
    if not aug.train:
        img = F.interpolate(img[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
        if not aug.keep_label:
            lbl = F.interpolate(lbl[None, None].float(), size=(ch, cw), mode="nearest")[0, 0].long()
        return img, lbl
    if torch.rand((), generator=gen) < 0.5:
        img, lbl = img.flip(-1), lbl.flip(-1)
    s = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * float(torch.rand((), generator=gen))
    h, w = img.shape[-2:]
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    lbl = F.interpolate(lbl[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    ph, pw = max(0, ch - nh), max(0, cw - nw)
    img, lbl = F.pad(img, (0, pw, 0, ph)), F.pad(lbl, (0, pw, 0, ph), value=IGNORE)
    y = int(torch.randint(0, img.shape[-2] - ch + 1, (), generator=gen))
    x = int(torch.randint(0, img.shape[-1] - cw + 1, (), generator=gen))
    return img[:, y : y + ch, x : x + cw], lbl[y : y + ch, x : x + cw]


class SegDataset(Dataset):
    """Base: subclasses give ``self.items`` (image path, label path) and a label lookup table.

    ``downscale`` d > 1 shrinks every image and label by d at load, before augmentation (image:
    PIL's antialiased bilinear; label: nearest), so scale and crop then act on the smaller image
    as they would at full size — a cheap stand-in for the full resolution on a small machine.
    ``cache`` keeps the decoded (and shrunk) arrays in memory: decoding a PNG costs more than
    augmenting a half-size sample, and CamVid at half size is 47 MB of uint8."""

    num_classes: int
    items: list[tuple[Path, Path]]
    lut: np.ndarray | None = None

    def __init__(self, augment: Augment, seed: int = 0, downscale: int = 1, cache: bool = False) -> None:
        if downscale < 1:
            raise ValueError(f"downscale must be ≥ 1, got {downscale}")
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.downscale, self.cache = downscale, cache
        self.label_downscale = downscale
        """Labels are shrunk by this factor at load: ``downscale``, or 1 to score a network that ran
        on shrunk images against the labels at their native resolution (gas-eval's default)."""
        self._decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 [3, H/d, W/d] (a view of the decoded HWC array: :class:`Augment` reads only
        the pixels it needs, so nothing full-size is converted) and label uint8 [H/d, W/d] in train
        ids (255 = ignore), d = ``downscale``."""
        if i in self._decoded:
            return self._decoded[i]
        img_path, lbl_path = self.items[i]
        # PIL, not torchvision.io.decode_png: torchvision must match each user's torch build exactly
        # (the registry's 0.28.0 for torch 2.13 is a CUDA build whose ops fail to load on CPU torch)
        pil_img: Image.Image = Image.open(img_path).convert("RGB")
        pil_lbl: Image.Image = Image.open(lbl_path)
        if self.downscale > 1:
            size = (max(1, pil_img.width // self.downscale), max(1, pil_img.height // self.downscale))
            pil_img = pil_img.resize(size, Image.Resampling.BILINEAR)
        if self.label_downscale > 1:
            size = (max(1, pil_lbl.width // self.label_downscale), max(1, pil_lbl.height // self.label_downscale))
            pil_lbl = pil_lbl.resize(size, Image.Resampling.NEAREST)
        img = np.array(pil_img, dtype=np.uint8)
        lbl = np.array(pil_lbl, dtype=np.uint8)
        if self.lut is not None:
            lbl = self.lut[lbl]
        out = torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(lbl)
        if self.cache:
            self._decoded[i] = out
        return out

    def take(self, start: int, stop: int | None, augment: Augment) -> SegDataset:
        """A copy over ``items[start:stop]`` with another augmentation (a held-out part of the
        training split scored like val, for choices that must not see val)."""
        part = copy.copy(self)
        part.items, part.augment, part._decoded = self.items[start:stop], augment, {}
        return part

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``item`` is an index (augmented for :meth:`set_epoch`'s epoch) or ``(epoch, index)``:
        a DataLoader worker holds its own copy of the dataset and never sees ``set_epoch``, so
        the search's batch sampler sends the epoch with every index."""
        epoch, i = item if isinstance(item, tuple) else (self.epoch, item)
        img, lbl = self.load(i)
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, i)) & 0x7FFF_FFFF)
        img, lbl = self.augment(img, lbl, gen)
        return (img - MEAN) / STD, lbl


def _require(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataRootError(f"expected {what} at {path}")
    return path


class Cityscapes(SegDataset):
    """``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``root/gtFine/{split}/{city}/*_gtFine_labelIds.png``; labelIds mapped to the 19 train ids."""

    num_classes = 19
    lut = _lut(CITYSCAPES_ID_TO_TRAIN)

    def __init__(self, root: str | Path, split: str, augment: Augment, seed: int = 0, downscale: int = 1,
                 cache: bool = False) -> None:
        super().__init__(augment, seed, downscale, cache)
        root = Path(root)
        img_dir = _require(root / "leftImg8bit" / split, "Cityscapes images (leftImg8bit/<split>/<city>/)")
        lbl_dir = _require(root / "gtFine" / split, "Cityscapes fine labels (gtFine/<split>/<city>/)")
        self.items = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            lbl = lbl_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not lbl.is_file():
                raise DataRootError(f"expected the label {lbl} for {img}")
            self.items.append((img, lbl))
        if not self.items:
            raise DataRootError(f"expected *_leftImg8bit.png files under {img_dir}/<city>/")


class CamVid(SegDataset):
    """SegNet layout: ``root/{train,val,test}/*.png`` and ``root/{split}annot/*.png`` holding
    class ids 0–10 with 11 = void (mapped to 255). Images may also be ``.jpg`` (a re-encoded copy
    small enough to ship to a GPU host); labels are always lossless PNGs of the same stem."""

    num_classes = 11
    lut = _lut({i: i for i in range(11)})

    def __init__(self, root: str | Path, split: str, augment: Augment, seed: int = 0, downscale: int = 1,
                 cache: bool = False) -> None:
        super().__init__(augment, seed, downscale, cache)
        root = Path(root)
        img_dir = _require(root / split, f"CamVid images ({split}/)")
        lbl_dir = _require(root / f"{split}annot", f"CamVid labels ({split}annot/)")
        self.items = []
        for img in sorted([*img_dir.glob("*.png"), *img_dir.glob("*.jpg")]):
            lbl = lbl_dir / f"{img.stem}.png"
            if not lbl.is_file():
                raise DataRootError(f"expected the label {lbl} for {img}")
            self.items.append((img, lbl))
        if not self.items:
            raise DataRootError(f"expected *.png or *.jpg images in {img_dir}")


class Synthetic(SegDataset):
    """Procedural scenes a small network can learn: a textured background with discs,
    rectangles and stripe patches, each class with its own colour and texture, plus noise.
    Classes: 0 background, 1 disc, 2 rectangle, 3 stripes. Deterministic per index."""

    num_classes = 4
    COLOURS = torch.tensor([[0.35, 0.45, 0.35], [0.85, 0.25, 0.2], [0.2, 0.35, 0.85], [0.9, 0.85, 0.3]])

    def __init__(self, size: int, hw: tuple[int, int], augment: Augment, seed: int = 0, split_seed: int = 0) -> None:
        super().__init__(augment, seed)
        self.n, self.hw, self.split_seed = size, hw, split_seed
        self.items = [(Path(), Path())] * size

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.split_seed * 1_000_003 + i)
        h, w = self.hw
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        lbl = torch.zeros(h, w, dtype=torch.long)
        for cls in torch.randperm(3, generator=g).tolist():  # one object of each class, random depth order
            cy, cx = float(torch.rand((), generator=g)) * h, float(torch.rand((), generator=g)) * w
            r = (0.18 + 0.17 * float(torch.rand((), generator=g))) * min(h, w)
            if cls == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                mask = ((yy - cy).abs() < r) & ((xx - cx).abs() < 1.5 * r)
            lbl[mask] = cls + 1
        img = self.COLOURS[lbl].permute(2, 0, 1).clone()
        stripes = (torch.sin((xx + yy) * 0.6) > 0).float()
        img[:, lbl == 3] *= (0.55 + 0.45 * stripes)[lbl == 3]
        img += 0.06 * torch.randn(3, h, w, generator=g)
        return img.clamp(0, 1), lbl


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset the tools know: the registry entry every CLI, loader and report reads (its
    flag's choices, its class names, its splits). Adding a dataset is one module that defines
    its :class:`SegDataset` and calls :func:`register_dataset` (docs/contributing.md)."""

    name: str
    open: Callable[[str | Path | None, str, Augment, int, int, bool, int], SegDataset]
    """(root, split, augment, seed, downscale, cache, synthetic sample count) → that split"""
    class_names: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "val", "test")
    needs_root: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``; ValueError naming the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use {', '.join(DATASETS)}")
    return DATASETS[name]


def _open_synthetic(root: str | Path | None, split: str, aug: Augment, seed: int, downscale: int, cache: bool,
                    n: int) -> SegDataset:
    """Scenes at least 64×64 (the crop is taken from them); train and val differ by their seeds."""
    return Synthetic(n, (max(aug.crop[0], 64), max(aug.crop[1], 64)), aug, seed, split_seed=1 if split == "train"
                     else 2)


def _opener(cls: type[Cityscapes] | type[CamVid]) -> Callable[..., SegDataset]:
    def open_split(root: str | Path | None, split: str, aug: Augment, seed: int, downscale: int, cache: bool,
                   n: int) -> SegDataset:
        assert root is not None
        return cls(root, split, aug, seed, downscale, cache)
    return open_split


register_dataset(DatasetSpec("synthetic", _open_synthetic, ("background", "disc", "rectangle", "stripes"),
                             splits=("train", "val"), needs_root=False))
register_dataset(DatasetSpec("cityscapes", _opener(Cityscapes), CITYSCAPES_CLASSES))
register_dataset(DatasetSpec("camvid", _opener(CamVid), CAMVID_CLASSES))


def _spec_with_root(name: str, root: str | Path | None, split: str) -> DatasetSpec:
    spec = dataset_spec(name)
    if split not in spec.splits:
        raise ValueError(f"--split {split}: the {name} dataset has no {split} split")
    if spec.needs_root and root is None:
        raise DataRootError(f"--data-root is required for {name}")
    return spec


def build_datasets(
    name: str, root: str | Path | None, crop: tuple[int, int], seed: int, synthetic_size: Sequence[int] = (64, 16),
    scale: tuple[float, float] = (0.5, 2.0), full_size_labels: bool = False, *, eval_split: str = "val",
    downscale: int = 1, holdout: int = 0, holdout_at: Literal["start", "end"] = "start", cache: bool = False,
) -> tuple[SegDataset, SegDataset]:
    """(train, evaluation set). Train uses the paper's augmentation; evaluation images are resized
    to ``crop``, and so are their labels unless ``full_size_labels``. ``eval_split`` names the
    evaluation split (``val``, or ``test`` where the layout has one). ``holdout`` N > 0 instead
    scores on the first (``holdout_at='start'``) or last (``'end'``) N training images, sorted by
    name, and trains on the rest: choices of recipe that must not see val. On CamVid the first 62
    are the whole 0001TP sequence (shot at dusk: a domain shift from val), the last 62 the end of
    0016E5 (daylight, the sequence val is cut from); a contiguous block keeps neighbouring frames
    of the held-out part out of training except at its one boundary. ``downscale`` and
    ``cache``: see :class:`SegDataset`."""
    spec = _spec_with_root(name, root, eval_split)
    if holdout and not spec.needs_root:
        raise ValueError("--holdout applies to real datasets only")
    train_aug, val_aug = Augment(crop, True, scale), Augment(crop, False, keep_label=full_size_labels)
    train = spec.open(root, "train", train_aug, seed, downscale, cache, synthetic_size[0])
    if holdout:
        if not 0 < holdout < len(train):
            raise ValueError(f"--holdout {holdout}: the training split has {len(train)} images")
        if holdout_at == "start":
            return train.take(holdout, None, train_aug), train.take(0, holdout, val_aug)
        return train.take(0, -holdout, train_aug), train.take(-holdout, None, val_aug)
    return train, spec.open(root, eval_split, val_aug, seed, downscale, cache, synthetic_size[1])


def build_eval_dataset(name: str, root: str | Path | None, size: tuple[int, int], split: str = "val", *,
                       downscale: int = 1, native_labels: bool = True, synthetic_size: int = 16,
                       cache: bool = False) -> SegDataset:
    """The one split an evaluation scores, and nothing else: no training split is opened, so a
    root holding only ``test/`` and ``testannot/`` works. Images are shrunk by ``downscale`` and
    resized to ``size`` (the network's input); labels stay at their native resolution
    (``native_labels``: the network's logits are upsampled to them, as published numbers are
    scored) or are resized to ``size`` with the images."""
    spec = _spec_with_root(name, root, split)
    ds = spec.open(root, split, Augment(size, False, keep_label=native_labels), 0, downscale, cache, synthetic_size)
    if native_labels and spec.needs_root:
        ds.label_downscale = 1
    return ds


def global_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled global batches (drop last). A DDP rank r of N takes slice
    ``[r·b:(r+1)·b]`` of each; one process accumulating N micro-batches takes them in order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return [perm[i * batch : (i + 1) * batch] for i in range(n // batch)]


def collate(ds: Dataset, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in idx]
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
