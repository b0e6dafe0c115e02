"""Paired SAR-EO data: readers of the public benchmarks and of a generic layout
(cdiff.data.datasets), split lists (cdiff.data.split) and the field's frozen lists
(cdiff.data.frozen), SpaceNet6 chips (cdiff.data.spacenet6_chips), paired transforms
(cdiff.data.transforms), image I/O and scaling (cdiff.data.imageio), and a synthetic
generator with known discrepancies (cdiff.data.synth)."""

from cdiff.data.datasets import (
    READERS,
    PairedImages,
    PairFiles,
    csv_pairs,
    default_transform,
    folder_pairs,
    open_dataset,
    qxs_saropt,
    sar2eo,
    sar2opt,
    sen12,
    spacenet6,
    spacenet6_chips,
)
from cdiff.data.imageio import read_geotiff, read_image, to_uint8, to_unit_range, write_png
from cdiff.data.split import make_split, read_split, split_list_name, write_split
from cdiff.data.synth import SynthPair, SyntheticPairs, make_pair, write_synthetic
from cdiff.data.transforms import CenterCrop, PairAugment

__all__ = [
    "READERS", "PairedImages", "PairFiles", "csv_pairs", "default_transform", "folder_pairs", "open_dataset",
    "qxs_saropt", "sar2eo", "sar2opt", "sen12", "spacenet6", "spacenet6_chips", "read_geotiff", "read_image", "to_uint8", "to_unit_range",
    "write_png", "make_split", "read_split", "split_list_name", "write_split", "SynthPair", "SyntheticPairs",
    "make_pair", "write_synthetic", "CenterCrop", "PairAugment",
]
