"""The task table: what a manifest's `task` may say (docs/pipelines.md).

The pipelines that run them live with the runtimes (runtimes/pipelines/).
"""

from __future__ import annotations

KNOWN_TASKS: tuple[str, ...] = (
    "tensor",
    "image-classification",
    "voice-activity-detection",
    "embedding",
    "text-generation",
    "ocr",
    "image-to-text",
)

# Tasks that run several models: task -> (required roles, optional roles). Their models
# deploy, version and roll back together.
MULTI_MODEL_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ocr": (("det", "rec"), ("cls",)),
    "image-to-text": (("encoder", "decoder"), ()),
}
