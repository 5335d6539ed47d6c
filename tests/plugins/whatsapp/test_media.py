"""Where downloaded media is kept: names a media id cannot steer out of the media folder."""

from __future__ import annotations

import pytest

from plugins.whatsapp.media import MEDIA_FOLDER, may_fetch, relative_path


@pytest.mark.parametrize(
    "media_id, mime_type, expected",
    [
        ("1234567890", "image/jpeg", f"{MEDIA_FOLDER}/1234567890.jpg"),
        ("998877", "audio/ogg; codecs=opus", f"{MEDIA_FOLDER}/998877.ogg"),
        ("4711", "application/pdf", f"{MEDIA_FOLDER}/4711.pdf"),
        ("4711", None, f"{MEDIA_FOLDER}/4711.bin"),
        ("4711", "application/x-unheard-of", f"{MEDIA_FOLDER}/4711.bin"),
    ],
)
def test_plain_media_ids_name_their_file(media_id: str, mime_type: str | None, expected: str) -> None:
    assert relative_path(media_id, mime_type) == expected


@pytest.mark.parametrize("media_id", ["../../etc/passwd", "a/b", "..", "x" * 300, "id with spaces", "ä"])
def test_other_media_ids_are_hashed_into_the_media_folder(media_id: str) -> None:
    path = relative_path(media_id, "image/jpeg")
    folder, name = path.rsplit("/", 1)
    assert folder == MEDIA_FOLDER
    assert name.endswith(".jpg") and len(name) == 44 and all(c in "0123456789abcdef" for c in name[:-4])
    assert relative_path(media_id, "image/jpeg") == path  # stable: a redelivery finds the file


GRAPH = "https://graph.facebook.com"


@pytest.mark.parametrize("url, graph_url, allowed", [
    ("https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=4711", GRAPH, True),
    ("http://169.254.169.254/latest/meta-data/iam", GRAPH, False),  # the token must not go inside
    ("http://lookaside.fbsbx.com/x", GRAPH, False),
    ("file:///etc/passwd", GRAPH, False),
    ("https:///no-host", GRAPH, False),
    ("http://127.0.0.1:8081/download/4711", "http://127.0.0.1:8081", True),  # the Graph API's own origin
    ("http://127.0.0.1:9999/download/4711", "http://127.0.0.1:8081", False),
    ("http://[::1", GRAPH, False),
])
def test_the_token_goes_only_to_meta_or_the_graph_api_itself(url: str, graph_url: str, allowed: bool) -> None:
    assert may_fetch(url, graph_url) is allowed
