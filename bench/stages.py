"""Per-stage times and payload sizes of one model on one image size (no server involved).

    python -m splitdet.bench.stages --depth 50 --size 2448x2048 --repeats 5 [--checkpoint CKPT]

Measures, median of `repeats` after a warm-up, on a synthetic gasket image:
  torch eager: the monolithic detector, the full backbone (body + all FPN levels), the edge gate
  (body + FPN top + classifier), the lazy completion, RPN + ROI heads;
  ONNX Runtime: preprocessing (numpy), gate, completion, encoding per codec;
  bytes per defective image for each codec next to the image's JPEG size (quality 95).
Random weights unless --checkpoint is given (feature statistics, and so compressed sizes, of a
trained model differ).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from splitdet.shared.strict_json import strict_dumps


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(depth: int, size: tuple[int, int], repeats: int, checkpoint: str | None) -> dict:
    """The figures, as a dict of seconds and bytes."""
    import numpy as np
    import torch

    from splitdet.bench.systems import jpeg_bytes
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.preprocess import Pixels
    from splitdet.edge.runtime import EdgeRuntime
    from splitdet.shared.checkpoint import load_model
    from splitdet.shared.codec import CODECS, encode, encoded_size
    from splitdet.shared.config import ModelConfig
    from splitdet.shared.model import CloudHalf, EdgeHalf, build_model
    from splitdet.training.export import export_model
    from splitdet.training.synth_image import generate_image

    torch.manual_seed(0)
    model = load_model(checkpoint)[0] if checkpoint else build_model(ModelConfig(depth=depth))
    model.eval()
    synth = generate_image(seed=0, index=0, size=size, defective=True)
    image = np.ascontiguousarray(synth.image.transpose(2, 0, 1), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(image)
    edge, cloud = EdgeHalf(model), CloudHalf(model)
    figures: dict = {"depth": model.config.depth, "image": f"{size[0]}x{size[1]}"}
    with torch.inference_mode():
        images, _ = model.transform([tensor])
        batch = images.tensors
        gate = edge.gate(batch)
        levels = {**gate.levels, **edge.complete(gate.laterals, gate.top_down)}
        torch_s = {
            "monolithic": _median_time(lambda: model([tensor]), repeats),
            "transform": _median_time(lambda: model.transform([tensor]), repeats),
            "backbone_full_fpn": _median_time(lambda: model.backbone(batch), repeats),
            "edge_gate": _median_time(lambda: edge.gate(batch), repeats),
            "edge_complete": _median_time(
                lambda: edge.complete(gate.laterals, gate.top_down), repeats
            ),
            "cloud_heads": _median_time(
                lambda: cloud.detect(levels, images.image_sizes, [tuple(tensor.shape[-2:])]),
                repeats,
            ),
        }
    figures["input_padded"] = list(batch.shape[-2:])
    figures["torch_s"] = torch_s
    figures["lazy_fpn_saving_s"] = torch_s["backbone_full_fpn"] - torch_s["edge_gate"]

    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, Path(tmp), gate_threshold=0.0)
        runtime = EdgeRuntime(Path(tmp))
        # the edge times the decoder's integer pixels, as the daemon hands them over
        pixels = Pixels(tuple(np.ascontiguousarray(synth.image[:, :, c]) for c in range(3)), 255)
        free = EdgePipeline(runtime, threshold=1.01)  # never flagged: the defect-free path
        flagged = {codec: EdgePipeline(runtime, codec=codec, gate=False) for codec in CODECS}
        ort_s = {
            "defect_free_image": _median_time(lambda: free.process_array(pixels), repeats),
            **{
                f"defective_image_{c}": _median_time(lambda p=p: p.process_array(pixels), repeats)
                for c, p in flagged.items()
            },
        }
        result = flagged["int8"].process_array(pixels)
        ort_s |= {f"stage_{k}": v for k, v in result.timings.items()}
    arrays = {name: level[0].numpy() for name, level in levels.items()}
    figures["ort_s"] = ort_s
    figures["bytes_per_defective_image"] = {
        codec: encoded_size(encode(arrays, codec=codec)) for codec in CODECS
    } | {
        "jpeg95_of_image": len(jpeg_bytes(image, 95)),
        "raw_fp32": sum(a.nbytes for a in arrays.values()),
    }
    return figures


def _size(text: str) -> tuple[int, int]:
    from splitdet.training.synth_image import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Print the figures as JSON; a bad option or checkpoint: one line, exit status 2."""
    from splitdet.shared.checkpoint import CheckpointError
    from splitdet.shared.cli import int_in

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=50, choices=[18, 34, 50])
    parser.add_argument("--size", type=_size, default="2448x2048", help="WIDTHxHEIGHT of the image")
    parser.add_argument("--repeats", type=int_in(1, 1000), default=5)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    try:  # the checkpoint loads first: named before any measuring
        figures = measure(args.depth, args.size, args.repeats, args.checkpoint)
    except CheckpointError as exc:
        parser.error(f"--checkpoint: {exc}")
    print(strict_dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
