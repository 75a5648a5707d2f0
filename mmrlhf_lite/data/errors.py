"""`DataError`: a bad row or file, named by `file:line` (and the key / media path involved).

Every check in the data layer raises this one class, so the CLI prints the message without a
traceback (`mmrlhf_lite.train.known_user_errors`) and `data.on_error: skip` can count skipped rows by
`reason`, a short stable word from `REASONS`.

    python -m mmrlhf_lite.data stats tests/does-not-exist.jsonl    # -> error: ... not found
"""
from __future__ import annotations

# reason -> what it means (the keys appear in the skip summary and the `data_skipped` event)
REASONS = {
    "bad_source": "a data path that does not exist or cannot be read as rows (raised even with skip)",
    "bad_encoding": "a line (or file) whose bytes are not UTF-8 text",
    "malformed_json": "a line (or file) that is not valid JSON",
    "not_an_object": "a row that is valid JSON but not an object",
    "unknown_format": "a row whose fields match no supported format",
    "missing_field": "a required field is absent, null or of the wrong type",
    "bad_value": "a field has a value of the right type that cannot be used (bad rank, role, ...)",
    "empty_response": "a response (chosen, rejected or one of K) is empty or whitespace",
    "chosen_equals_rejected": "the two sides of a pair (or two of K responses) have the same text",
    "duplicate_id": "an id seen before (a ranked row), or reused with another prompt / media (pair rows)",
    "duplicate_pair": "the same (chosen, rejected) pair given twice for one group",
    "missing_image": "an image or video frame path that does not exist",
    "corrupt_image": "an image that exists but does not decode",
    "image_too_large": "an image with more pixels than data.max_image_pixels (PIL's guard against decompression bombs)",
    "bad_video": "a video that is neither a folder of frames nor a list of frame paths",
    "media_mismatch": "image placeholders in the prompt do not match the number of images",
    "unsupported": "a valid row this project cannot represent (e.g. a pair that differs only by image)",
    "too_few_responses": "a group with fewer than two usable responses",
}


class DataError(ValueError):
    """A data problem; `str(err)` is `"<file>:<line>: <message>"`.

    `reason` is one of `REASONS`; `key` is the row field involved; `path` the media file involved.
    """

    def __init__(self, source: str, message: str, *, reason: str, key: str | None = None,
                 path: str | None = None):
        if reason not in REASONS:  # pragma: no cover - programming error
            raise KeyError(f"unknown DataError reason {reason!r}")
        self.source, self.message, self.reason, self.key, self.path = source, message, reason, key, path
        super().__init__(f"{source}: {message}" if source else message)
