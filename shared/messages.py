"""Conversions between the wire's protobuf messages and our domain types (torch-free).

The edge builds DetectRequests with `build_request`; the cloud reads them back with
`tensors_from_proto` / `image_from_proto`. One place, so the two directions cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitdet.shared.codec import EncodedTensor
from splitdet.shared.detection import ImageMeta
from splitdet.shared.wire import detection_pb2 as pb


def build_request(
    encoded: Sequence[EncodedTensor], image: ImageMeta, request_id: str, fingerprint: str
) -> pb.DetectRequest:
    """The DetectRequest protobuf for one image's encoded FPN levels."""
    return pb.DetectRequest(
        request_id=request_id,
        model_fingerprint=fingerprint,
        image=pb.ImageMeta(
            original_height=image.original_hw[0],
            original_width=image.original_hw[1],
            resized_height=image.resized_hw[0],
            resized_width=image.resized_hw[1],
            source=image.source,
        ),
        tensors=[
            pb.EncodedTensor(
                name=t.name,
                shape=list(t.shape),
                codec=t.codec,
                dtype=t.dtype,
                scale=list(t.scale),
                zero_point=list(t.zero_point),
                data=bytes(t.data),
            )
            for t in encoded
        ],
    )


def tensors_from_proto(request: pb.DetectRequest) -> list[EncodedTensor]:
    """The request's encoded FPN levels as the codec's EncodedTensors (not yet validated)."""
    return [
        EncodedTensor(
            name=t.name,
            shape=tuple(t.shape),
            codec=t.codec,
            dtype=t.dtype,
            scale=tuple(t.scale),
            zero_point=tuple(t.zero_point),
            data=t.data,
        )
        for t in request.tensors
    ]


def image_from_proto(image: pb.ImageMeta) -> ImageMeta:
    """The request's image sizes (not yet validated)."""
    return ImageMeta(
        original_hw=(image.original_height, image.original_width),
        resized_hw=(image.resized_height, image.resized_width),
        source=image.source,
    )
