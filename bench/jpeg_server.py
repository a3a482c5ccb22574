"""The "JPEG to the cloud" baseline's server: whole images in, the monolithic detector's boxes out.

The split-computing literature's standard baseline (sc2bench): the edge compresses the image and
the cloud runs the whole detector. It is a benchmark baseline, not a product service, so it
speaks raw bytes over one gRPC method instead of the product's protobuf contract:

    request   the JPEG file's bytes
    response  JSON: {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...],
                     "timings": {"decode_s", "detect_s", "total_s"}} or {"error": "..."}

    python -m splitdet.bench.jpeg_server --checkpoint CKPT --port 0 --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    import numpy as np

METHOD = "/splitdet.bench.JpegDetection/Detect"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def serve(checkpoint: str, port: int, threads: int, box_refine_steps: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; prints "PORT <n>" on stdout once listening.

    `box_refine_steps` replaces the checkpoint's (as the export under test may have)."""
    from splitdet.shared.torchvision_import import defer_dynamo_import

    defer_dynamo_import()  # (as the cloud's start: 2.7 s of CPU less)
    import torch

    from splitdet.shared.checkpoint import load_model
    from splitdet.shared.signal_event import event_setter

    torch.set_num_threads(threads)
    model, _ = load_model(checkpoint, box_refine_steps=box_refine_steps)

    def detect(data: bytes, context: grpc.ServicerContext) -> bytes:
        start = time.perf_counter()
        try:
            image = torch.from_numpy(jpeg_pixels(data))
        except Exception as exc:  # a bad image is the caller's error, reported in the answer
            return json.dumps({"error": f"cannot decode image: {exc}"}).encode()
        decoded = time.perf_counter()
        with torch.inference_mode():
            output = model([image])[0]
        done = time.perf_counter()
        return json.dumps(
            {
                "boxes": output["boxes"].tolist(),
                "scores": output["scores"].tolist(),
                "labels": output["labels"].tolist(),
                "timings": {
                    "decode_s": decoded - start,
                    "detect_s": done - decoded,
                    "total_s": done - start,
                },
            }
        ).encode()

    handler = grpc.method_handlers_generic_handler(
        "splitdet.bench.JpegDetection",
        {"Detect": grpc.unary_unary_rpc_method_handler(detect)},
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"PORT {bound}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, event_setter(stop))
    signal.signal(signal.SIGINT, event_setter(stop))
    stop.wait()
    server.stop(2).wait()


def jpeg_pixels(data: bytes) -> np.ndarray:
    """A JPEG file's pixels as the monolithic system gets its image: Float32[3, H, W] in
    [0, 1], C-contiguous. (A transposed view of Pillow's H x W x 3 array, as the server once
    passed, made torch's resize take a strided path: about 0.1 s more per 2448x2048 image than
    the monolithic system pays for the same detector, a cost of the benchmark, not of the
    baseline.) Raises what Pillow raises for bytes that are not an image."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)) / np.float32(255.0)


class JpegClient:
    """Client of the baseline server (raw bytes in, JSON out)."""

    def __init__(self, address: str, timeout_s: float = 120.0) -> None:
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._call = self._channel.unary_unary(METHOD)
        self.timeout_s = timeout_s

    def detect(self, jpeg: bytes) -> dict:
        """The server's answer for one JPEG; RuntimeError if it could not decode it."""
        answer = json.loads(self._call(jpeg, timeout=self.timeout_s))
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m splitdet.bench.jpeg_server`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--box-refine-steps", type=int, default=None)
    args = parser.parse_args(argv)
    serve(args.checkpoint, args.port, args.threads, args.box_refine_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
