"""Claim 3's measures on held-out scenes made for them: do the models paint objects the SAR does not show?

The paper credits the C-Diff loss with mitigating "artifacts and hallucinations" from temporal
discrepancies, objects present in one image only. On synthetic scenes the truth is known, so
two kinds of hallucination can be counted (``cdiff.data.synth`` paints objects, each in the EO
only or in the SAR only, with probability 1/2):
- **EO-only objects painted** (``hallucinated_objects``): an object of the EO target that has no
  trace in the SAR, painted at its place. The default scenes hold too few for a count (84 in the
  64 held-out scenes), so this set asks ``make_pair`` for ``OBJECTS`` = 12 objects per scene
  instead of 3: about 5 EO-only objects per scene where there is room.
- **Spurious objects** (``spurious_objects``, ``spurious_object_pixels``): object colours painted
  on road and water at least ``margin`` px away from every true object, where neither image has one.

The set: scenes ``make_pair(HALLUCINATION_SEED + i, discrepancies=OBJECTS)``, i < scenes, seeds
no training run and no other held-out set uses (training below 2,000, the report's held-out
scenes from 1,000,000).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cdiff.data.synth import _SHIP_COLOUR, _VEHICLE_COLOURS, ROAD, WATER, make_pair
from cdiff.metrics import image_metrics, to_unit
from studies.synthetic.measures import hallucinated_objects, masked_psnr, spurious_object_pixels, spurious_objects

HALLUCINATION_SEED = 2_000_000
OBJECTS = 12  # objects injected per scene (make_pair's discrepancies; its default is 3)
OBJECT_COLOURS = np.concatenate([_VEHICLE_COLOURS, _SHIP_COLOUR[None]])  # (5, 3) in [0, 1]: what synth paints objects with
MEASURES = ("psnr", "psnr_objects", "psnr_eo_only", "hallucinated", "spurious_pixels", "spurious_objects")


def object_free(pairs, margin: int) -> torch.Tensor:
    """(B, H, W) bool: road and water pixels at least ``margin`` px from every injected object,
    where an object could stand but none does."""
    discrepancy = torch.from_numpy(np.stack([p.discrepancy for p in pairs]))
    near_object = F.max_pool2d(discrepancy.float()[:, None], 2 * margin + 1, 1, margin)[:, 0] > 0
    open_ground = torch.from_numpy(np.stack([np.isin(p.landcover, (ROAD, WATER)) for p in pairs]))
    return open_ground & ~near_object


def hallucination_set(scenes: int, size: int, margin: int, first_seed: int = HALLUCINATION_SEED,
                      objects: int = OBJECTS) -> dict:
    """The scenes: SAR, EO (B, 3, H, W) in [-1, 1]; the same EO without the injected objects
    (B, H, W, 3) numpy; the masks "discrepancy", "eo_only" (B, H, W) bool and "object_free"."""
    seeds = [first_seed + i for i in range(scenes)]
    pairs = [make_pair(seed, size=size, discrepancies=objects) for seed in seeds]
    clean = np.stack([make_pair(seed, size=size, discrepancies=0).eo for seed in seeds])
    return {
        "sar": torch.stack([torch.from_numpy(p.sar)[None].expand(3, -1, -1) for p in pairs]),
        "eo": torch.stack([torch.from_numpy(np.ascontiguousarray(p.eo.transpose(2, 0, 1))) for p in pairs]),
        "clean": clean,
        "discrepancy": torch.from_numpy(np.stack([p.discrepancy for p in pairs])),
        "eo_only": torch.from_numpy(np.stack([p.eo_only for p in pairs])),
        "object_free": object_free(pairs, margin),
        "seeds": (seeds[0], seeds[-1]), "objects": objects,
    }


def hallucination_scores(prediction: torch.Tensor, data: dict) -> dict:
    """One model's (or baseline's) predictions (B, 3, H, W) in [-1, 1] of the set's scenes, scored:
    mean PSNR over scenes on the whole image, on the injected objects' pixels and on the EO-only
    objects' pixels (scenes without such pixels left out); the EO-only objects painted and their
    count (totals); spurious object pixels per 1,000 pixels looked at, and spurious objects (total)."""
    pred, target = to_unit(prediction.float()), to_unit(data["eo"])
    objects, eo_only = masked_psnr(pred, target, data["discrepancy"]), masked_psnr(pred, target, data["eo_only"])
    pred_hwc = prediction.float().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) in [-1, 1]
    target_hwc = data["eo"].permute(0, 2, 3, 1).numpy()
    verdicts = [hallucinated_objects(p, t, c, m.numpy())
                for p, t, c, m in zip(pred_hwc, target_hwc, data["clean"], data["eo_only"])]
    unit_pred, unit_clean, allowed = (pred_hwc + 1) / 2, (data["clean"] + 1) / 2, data["object_free"].numpy()
    pixels = [spurious_object_pixels(p, c, a, OBJECT_COLOURS) for p, c, a in zip(unit_pred, unit_clean, allowed)]
    return {
        "psnr": float(image_metrics(pred, target)["psnr"].double().mean()),
        "psnr_objects": float(np.nanmean(objects.numpy())), "psnr_eo_only": float(np.nanmean(eo_only.numpy())),
        "hallucinated": sum(sum(v) for v in verdicts), "eo_only_objects": sum(len(v) for v in verdicts),
        "spurious_pixels": 1000 * sum(p[0] for p in pixels) / max(sum(p[1] for p in pixels), 1),
        "spurious_objects": sum(spurious_objects(p, c, a, OBJECT_COLOURS) for p, c, a in zip(unit_pred, unit_clean, allowed)),
    }
