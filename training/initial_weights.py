"""Starting weights of a training run: `load_initial_weights` starts a model from nothing,
torchvision's ImageNet ResNet or COCO Faster R-CNN, or a file (a splitdet checkpoint, whose
class-specific box-predictor rows are re-mapped by class name, or a torchvision state dict);
`InitError` says why weights cannot be had and what to pass instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from splitdet.shared.checkpoint import why_unreadable
from splitdet.shared.config import ModelConfig
from splitdet.shared.model import MultiTaskRCNN

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum


class InitError(RuntimeError):
    """Starting weights that cannot be had; the message says what to do instead."""


def _hub_hint(weights: WeightsEnum) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"could not fetch {weights} from {weights.url}. Offline? Download that file elsewhere and "
        f"place it, named {Path(weights.url).name}, in {hub}/ (the torch hub cache, $TORCH_HOME), "
        "or pass --init PATH with a torchvision state dict or a splitdet checkpoint."
    )


def _fetch(weights: WeightsEnum, progress: bool) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=progress)
    except Exception as exc:  # URLError, HTTPError, socket errors, hash mismatch...
        raise InitError(f"{_hub_hint(weights)} ({type(exc).__name__}: {exc})") from exc


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Copy every tensor of `state` whose key (after `prefix`) and shape fit; report the rest."""
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        name = prefix + key
        if name in own and own[name].shape == value.shape:
            loaded[name] = value
        else:
            skipped.append(key)
    model.load_state_dict(loaded, strict=False)
    fresh = [name for name in own if name not in loaded]  # the model's own, kept as they were
    return {"loaded": len(loaded), "skipped": skipped, "missing": len(fresh), "fresh": fresh}


#: Box-predictor tensors with one row (cls_score) or four (bbox_pred) per class, background
#: (index 0) first: a checkpoint's rows belong to its own class_names, in its own order.
CLASS_ROWS = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
}


def _checkpoint_class_names(checkpoint: object) -> tuple[str, ...] | None:
    """The class_names a splitdet checkpoint was trained with (None for a plain state dict)."""
    if not isinstance(checkpoint, dict):
        return None
    names = checkpoint.get("class_names")
    if names is None and isinstance(checkpoint.get("config"), dict):
        names = checkpoint["config"].get("class_names")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _remap_class_rows(
    state: dict[str, torch.Tensor], saved_names: tuple[str, ...], model: MultiTaskRCNN
) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """`state` with its class-specific box-predictor rows moved to `model`'s class order.

    Rows are matched by class name: a class of the model the checkpoint also has gets that
    class's rows (cls_score [C+1, D]: one row; bbox_pred [4(C+1), D]: four), background
    keeps row 0, and a class new to the model keeps the model's fresh rows. Without this, a
    checkpoint of the same class count in another order would load with its labels swapped.
    Tensors whose shape is not the checkpoint's C+1 classes are left as they are (then skipped
    as not fitting). Returns (state, {model class: checkpoint class or None (fresh)}).
    """
    own = model.state_dict()
    names = tuple(model.config.class_names)
    source = [0] + [saved_names.index(n) + 1 if n in saved_names else None for n in names]
    state = dict(state)
    for key, per_class in CLASS_ROWS.items():
        old, fresh = state.get(key), own.get(key)
        if old is None or fresh is None or old.shape[1:] != fresh.shape[1:]:
            continue
        if len(old) != per_class * (len(saved_names) + 1):
            continue
        # [(C+1) * per_class, ...] -> [C+1, per_class, ...]: one block of rows per class
        old_rows = old.reshape(len(saved_names) + 1, per_class, *old.shape[1:])
        new_rows = fresh.clone().reshape(len(names) + 1, per_class, *fresh.shape[1:])
        for row, src in enumerate(source):
            if src is not None:
                new_rows[row] = old_rows[src]
        state[key] = new_rows.reshape(fresh.shape)
    return state, {n: n if n in saved_names else None for n in names}


def _init_fits(init: str, config: ModelConfig) -> bool:
    """Whether `--init imagenet|coco` can start a model of `config`: ImageNet's ResNets carry
    BatchNorm statistics (norm batch or frozen, any depth); COCO's Faster R-CNN is a
    ResNet50-FPN with BatchNorm."""
    if config.norm == "group":
        return False
    return init == "imagenet" or config.depth == 50


def _init_refusal(init: str, config: ModelConfig) -> str:
    """Why `--init imagenet|coco` cannot start a model of `config`, and what on the command
    line can: the presets whose models it fits, and what every other preset's model is."""
    from splitdet.training.presets import PRESETS

    need = {
        "imagenet": "ImageNet weights carry BatchNorm statistics, so they need a model with norm "
        "batch or frozen",
        "coco": "COCO weights are a Faster R-CNN ResNet50-FPN with BatchNorm, so they need depth "
        "50 with norm batch or frozen",
    }[init]

    def model(name: str) -> str:
        return f"{name} (depth {PRESETS[name].model.depth}, norm {PRESETS[name].model.norm})"

    fits = [name for name, preset in PRESETS.items() if _init_fits(init, preset.model)]
    others = [name for name in PRESETS if name not in fits]
    use = " or ".join(f"--preset {model(name)}" for name in fits) or "a preset that fits"
    return (
        f"--init {init}: {need}, and this model has depth {config.depth} with norm "
        f"{config.norm}; train with {use}, as no option sets norm or depth; "
        f"{', '.join(map(model, others))} train from scratch (--init none) or from a splitdet "
        "checkpoint of the same preset (--init PATH)"
    )


def _folder_refusal(path: Path) -> str:
    """Why `--init FOLDER` starts nothing, and which file to give: a run folder's checkpoints
    (best.pt, last.pt), or, for a model export (manifest.json: edge ONNX and cloud heads, no
    whole model), the checkpoint its manifest says it was exported from."""
    head = f"--init {path}: a folder, not a checkpoint file"
    if (path / "manifest.json").is_file():
        import json

        try:
            source = json.loads((path / "manifest.json").read_text()).get("extra", {})
            exported_from = source.get("checkpoint") if isinstance(source, dict) else None
        except (OSError, ValueError, AttributeError):
            exported_from = None
        named = f" ({exported_from})" if isinstance(exported_from, str) else ""
        return (
            f"{head}; it is a model export (manifest.json), which holds no whole model to "
            f"train on: give the checkpoint it was exported from{named}"
        )
    inside = sorted(f.name for f in path.glob("*.pt") if f.is_file())
    if inside:
        return f"{head}; give a checkpoint file in it: {', '.join(inside)}"
    return f"{head}; give a checkpoint file (a training run's best.pt or last.pt)"


def load_initial_weights(model: MultiTaskRCNN, init: str, progress: bool = True) -> dict:
    """Start `model` from `init`: "none", "imagenet" (torchvision's ImageNet ResNet of the
    model's depth, backbone body only), "coco" (torchvision's COCO Faster R-CNN ResNet50-FPN; the
    class-specific box predictor is skipped) or a path (splitdet checkpoint or torchvision state
    dict). Tensors whose shape does not fit are skipped and counted (the report's "fresh":
    the model's tensors none was loaded into; "preset": a splitdet checkpoint's recipe's
    name, when it records one). A splitdet checkpoint of
    other class_names (another order, other classes) has its box-predictor rows re-mapped by
    class name (`_remap_class_rows`; the report's "class_rows" says which class came from
    where). Raises InitError."""
    from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    config = model.config
    if init == "none":
        return {"loaded": 0, "skipped": [], "missing": len(model.state_dict())}
    if init in ("imagenet", "coco") and not _init_fits(init, config):
        raise InitError(_init_refusal(init, config))
    if init == "imagenet":
        weights = {18: ResNet18_Weights, 34: ResNet34_Weights, 50: ResNet50_Weights}[config.depth]
        state = _fetch(weights.IMAGENET1K_V1, progress)
        return _load_matching(model, state, prefix="backbone.body.")
    if init == "coco":
        state = _fetch(FasterRCNN_ResNet50_FPN_Weights.COCO_V1, progress)
        state = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor.")}
        return _load_matching(model, state)
    path = Path(init)
    if path.is_dir():
        raise InitError(_folder_refusal(path))
    if not path.is_file():
        raise InitError(f"--init {init!r}: not imagenet, coco, none, nor an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own message runs to lines, or is just a byte's value
        why = why_unreadable(path, exc)
        raise InitError(f"--init {path}: not a readable checkpoint or state dict ({why})") from exc
    saved_names = _checkpoint_class_names(state)
    recipe = state.get("train_config") if isinstance(state, dict) else None
    preset = recipe.get("name") if isinstance(recipe, dict) else None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InitError(f"{path}: expected a state dict")
    remapped = None
    if saved_names is not None and saved_names != tuple(model.config.class_names):
        state, remapped = _remap_class_rows(state, saved_names, model)
    report = _load_matching(model, state)
    if remapped is not None:
        report["class_rows"] = remapped
    if isinstance(preset, str):  # the recipe a splitdet checkpoint was trained with
        report["preset"] = preset
    if report["loaded"] == 0:
        raise InitError(f"{path}: no tensor fits this model's configuration")
    return report
