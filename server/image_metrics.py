"""Prometheus metrics of the image models, in the server's registry beside the chat ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

IMAGE_LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 240, 480)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class ImageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name"]
        self.images = Counter(
            "pagoda:images_generated", "Images generated", labels, registry=registry
        )
        self.steps = Counter(
            "pagoda:image_steps",
            "Denoising steps run, summed over the images generated",
            labels,
            registry=registry,
        )
        self.queue = Gauge(
            "pagoda:image_queue_length",
            "Images requested and not yet returned (queued or running)",
            labels,
            registry=registry,
        )
        self.batch_size = Histogram(
            "pagoda:image_batch_size",
            "Images in the pipeline call that made an image (observed once per image)",
            labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        # beside the latency, on the same buckets: what the request spent outside the pipeline
        # (queued, its batch gathering, encoding, on its way) is the difference
        self.pipeline_seconds = Histogram(
            "pagoda:image_pipeline_seconds",
            "Run time of the pipeline call that made an image, its encoding left out "
            "(observed once per image)",
            labels,
            buckets=IMAGE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "pagoda:image_request_latency_seconds",
            "Image request latency from arrival to the last image",
            labels,
            buckets=IMAGE_LATENCY_BUCKETS,
            registry=registry,
        )
