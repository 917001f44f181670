"""Image rules on bytes: sniffing, decoding, normalising, strict mode, the cache and URL fetching."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
import requests
from PIL import Image
from support import encode, photo, png

from vidu_pipeline import images as img
from vidu_pipeline.api.contract import MAX_BASE64_DECODED_BYTES
from vidu_pipeline.api.image_refs import parse_data_uri

# --- builders (also used by test_catalog) ------------------------------------------------------


def jpeg(w=200, h=150, seed=0) -> bytes:
    return encode(photo(w, h, seed), "JPEG", quality=85)


def bomb_png(w=20_000, h=20_000) -> bytes:
    """A tiny PNG whose header claims w×h pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


def bad_crc_png() -> bytes:
    data = bytearray(png())
    data[-20] ^= 0xFF  # inside the last IDAT chunk's data: its CRC no longer matches
    return bytes(data)


def animated(fmt: str = "PNG") -> bytes:
    frames = [photo(160, 160, seed=s) for s in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def sixteen_bit_png() -> bytes:
    arr = (np.arange(200 * 150, dtype=np.uint32).reshape(150, 200) * 2).astype(np.uint16)
    return encode(Image.fromarray(arr))


def rotated_jpeg(w=300, h=200) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(w, h), "JPEG", exif=exif)


def noisy_png(w=2000, h=2000) -> bytes:
    """Incompressible: over the 10 MB payload limit as PNG."""
    return encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)), "PNG", compress_level=1
    )


OTHER_FORMATS = {
    "GIF": lambda: encode(photo(), "GIF"),
    "BMP": lambda: encode(photo(), "BMP"),
    "TIFF": lambda: encode(photo(), "TIFF"),
    "SVG": lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="500" height="500"/>',
    "HEIC": lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
    "AVIF": lambda: b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + b"\x00" * 64,
    "PDF": lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    "HTML": lambda: b"<!DOCTYPE html><html><body>Not found</body></html>",
    "text": lambda: b"just some words, not a picture\n",
    "unknown binary data": lambda: bytes(range(256)) * 4,
}


# --- sniffing and rules -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OTHER_FORMATS))
def test_other_formats_are_refused_by_name(name):
    verdict, sent = img.check_image_bytes(OTHER_FORMATS[name]())
    assert sent is None
    assert verdict.problems == (("format", f"the content is {name}, not PNG, JPEG or WebP"),)


def test_accepted_formats_are_sniffed_by_content():
    assert img.sniff_format(png()) == "PNG"
    assert img.sniff_format(jpeg()) == "JPEG"
    assert img.sniff_format(encode(photo(), "WEBP")) == "WEBP"


@pytest.mark.parametrize("fmt,data", [("PNG", png), ("JPEG", jpeg), ("WEBP", lambda: encode(photo(), "WEBP"))])
def test_plain_images_are_sent_unchanged(fmt, data):
    raw = data()
    verdict, sent = img.check_image_bytes(raw)
    assert verdict.ok and sent is raw and verdict.notes == ()
    assert (verdict.format, verdict.width, verdict.height) == (fmt, 200, 150)
    assert verdict.sent_sha256 == hashlib.sha256(raw).hexdigest()
    assert verdict.mime_subtype == img.MIME_SUBTYPES[fmt]


@pytest.mark.parametrize(
    "data,rule,words",
    [
        (b"", "empty_file", "empty"),
        (lambda: png()[: len(png()) // 2], "corrupt", "truncated or corrupt PNG"),
        (lambda: jpeg()[: len(jpeg()) // 2], "corrupt", "truncated or corrupt JPEG"),
        (bad_crc_png, "corrupt", "PNG"),
        (lambda: png()[:30], "corrupt", "PNG"),
        (lambda: png(100, 100), "min_size", "100×100 px, at least 128×128"),
        (lambda: png(600, 128), "aspect_ratio", "600:128"),
        (lambda: png(128, 520), "aspect_ratio", "outside 1:4 … 4:1"),
        (bomb_png, "decompression_bomb", "20000×20000"),
    ],
)
def test_bad_bytes_are_refused_with_their_rule(data, rule, words):
    verdict, sent = img.check_image_bytes(data() if callable(data) else data)
    assert sent is None and verdict.problems[0][0] == rule
    assert words in verdict.problems[0][1]


def test_too_small_and_too_thin_breaks_two_rules():
    verdict, _ = img.check_image_bytes(png(100, 500))
    assert [rule for rule, _ in verdict.problems] == ["min_size", "aspect_ratio"]


@pytest.mark.parametrize("w,h", [(512, 128), (128, 512), (128, 128)])
def test_limits_are_inclusive(w, h):
    assert img.check_image_bytes(png(w, h))[0].ok


def test_oversize_file_is_refused_before_decoding():
    verdict, _ = img.check_image_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50_000_001))
    assert verdict.problems[0][0] == "file_size" and "50,000,000" in verdict.problems[0][1]


# --- fixes in default mode, refusals in strict mode --------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_sends_the_first_frame_or_is_refused_in_strict_mode(fmt):
    data = animated(fmt)
    verdict, sent = img.check_image_bytes(data)
    assert verdict.ok and "only the first frame" in verdict.notes[0]
    still = Image.open(io.BytesIO(sent))
    assert getattr(still, "n_frames", 1) == 1 and still.format == fmt
    strict, _ = img.check_image_bytes(data, strict=True)
    assert strict.problems[0][0] == "animated" and "3 frames" in strict.problems[0][1]


def test_cmyk_becomes_rgb_jpeg():
    data = encode(photo(mode="CMYK"), "JPEG")
    verdict, sent = img.check_image_bytes(data)
    assert verdict.ok and Image.open(io.BytesIO(sent)).mode == "RGB" and verdict.mime_subtype == "jpeg"
    assert img.check_image_bytes(data, strict=True)[0].problems[0][0] == "cmyk"


def test_sixteen_bit_becomes_eight_bit_keeping_the_range():
    verdict, sent = img.check_image_bytes(sixteen_bit_png())
    out = Image.open(io.BytesIO(sent))
    assert verdict.ok and out.mode == "L" and out.getextrema() == (0, 234)
    assert "16-bit" in verdict.notes[0]
    assert img.check_image_bytes(sixteen_bit_png(), strict=True)[0].problems[0][0] == "bit_depth"


def test_exif_orientation_is_applied():
    verdict, sent = img.check_image_bytes(rotated_jpeg(300, 200))
    assert verdict.ok and (verdict.width, verdict.height) == (200, 300)
    out = Image.open(io.BytesIO(sent))
    assert out.size == (200, 300) and out.getexif().get(0x0112, 1) == 1
    strict, _ = img.check_image_bytes(rotated_jpeg(), strict=True)
    assert strict.problems[0][0] == "exif_orientation"


def test_exif_orientation_counts_for_the_aspect_rule():
    assert img.check_image_bytes(rotated_jpeg(600, 128))[0].problems[0][0] == "aspect_ratio"


@pytest.mark.parametrize("mode,note", [("P", "palette"), ("RGBA", "transparency"), ("LA", "transparency")])
def test_palette_and_alpha_are_sent_as_is_with_a_note(mode, note):
    data = encode(photo().convert(mode))
    verdict, sent = img.check_image_bytes(data)
    assert verdict.ok and sent is data and any(note in n for n in verdict.notes)
    assert img.check_image_bytes(data, strict=True)[0].ok


def test_large_payload_is_reencoded_under_the_limit_or_refused_in_strict_mode():
    data = noisy_png()
    assert len(data) >= MAX_BASE64_DECODED_BYTES
    verdict, sent = img.check_image_bytes(data)
    assert verdict.ok and verdict.sent_bytes == len(sent) < MAX_BASE64_DECODED_BYTES
    assert min(verdict.width, verdict.height) >= 128 and verdict.mime_subtype == "jpeg"
    assert Image.open(io.BytesIO(sent)).size == (verdict.width, verdict.height)
    assert "payload limit" in verdict.notes[-1]
    strict, sent = img.check_image_bytes(data, strict=True)
    assert sent is None and strict.problems[0][0] == "payload_size"


def test_shrink_downscales_but_never_below_the_minimum_side(monkeypatch):
    monkeypatch.setattr(img, "MAX_BASE64_DECODED_BYTES", 40_000)
    data, fmt, im = img._shrink(
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (400, 800, 3), dtype=np.uint8))
    )
    assert len(data) < 40_000 and fmt == "JPEG" and im.size[1] >= 128 and im.size[0] < 800


def test_inspect_image_bytes_keeps_its_contract():
    facts = img.inspect_image_bytes(rotated_jpeg(300, 200))
    assert (facts.format, facts.width, facts.height) == ("JPEG", 200, 300)
    for data, words in [
        (b"GIF89a....", "not a PNG"),
        (jpeg()[:500], "truncated or corrupt"),
        (bomb_png(), "decompression bomb"),
    ]:
        with pytest.raises(ValueError, match=words):
            img.inspect_image_bytes(data)


# --- cache ------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    cache = img.ImageCache(tmp_path)
    data = jpeg()
    sha = cache.put_bytes(data)
    assert cache.get_bytes(sha) == data
    assert parse_data_uri(cache.data_uri(sha)) == ("jpeg", data)
    verdict, _ = img.check_image_bytes(data, sha256=sha)
    cache.remember_verdicts({sha: verdict}, strict=False)
    assert img.ImageCache(tmp_path).verdicts([sha], strict=False) == {sha: verdict}
    assert cache.verdicts([sha], strict=True) == {}
    cache.blob_path(sha).write_bytes(b"damaged")
    with pytest.raises(KeyError, match="damaged"):
        cache.get_bytes(sha)
    assert cache.verdicts([sha], strict=False) == {sha: verdict}  # blob exists; get_bytes guards content
    cache.blob_path(sha).unlink()
    assert cache.verdicts([sha], strict=False) == {}  # an accepted verdict needs its blob


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,rule",
    [
        ("/missing.png", "url_fetch"),
        ("/huge", "file_size"),
        ("/endless", "file_size"),
        ("/to-file", "url_scheme"),
    ],
)
def test_failed_fetches_name_their_rule(http_images, path, rule):
    with img.url_session() as s, pytest.raises(img.SourceError) as err:
        img.fetch_url(http_images + path, s)
    assert err.value.rule == rule


def test_fetch_follows_http_redirects(http_images):
    with img.url_session() as s:
        assert img.fetch_url(http_images + "/to-ok", s) == png(seed=7)


def test_unreachable_host_is_a_fetch_error():
    with img.url_session() as s, pytest.raises(img.SourceError) as err:
        img.fetch_url("http://127.0.0.1:9/x.png", s, timeout=(0.5, 0.5))
    assert err.value.rule == "url_fetch"


def test_data_uri_is_base64_of_the_stored_bytes(tmp_path):
    cache = img.ImageCache(tmp_path)
    data = encode(photo(), "WEBP")
    uri = cache.data_uri(cache.put_bytes(data))
    assert uri.startswith("data:image/webp;base64,") and base64.b64decode(uri.split(",", 1)[1]) == data


# --- nothing a source points at can hang a run (issue 10, case 11) -------------------------------


@pytest.fixture
def drip_server():
    """A hostile loopback server: ``/body`` sends its headers then one byte every 0.2 s;
    ``/headers`` sends one header whose value grows by a byte every 0.2 s. Both go on until the
    client hangs up or the test ends."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def drip(conn):
        with conn:
            request = conn.recv(65536)
            body = b"GET /body " in request
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 1000000\r\n\r\n" if body else b"X-Drip: "))
                while not stop.wait(0.2):
                    conn.sendall(b"x")
            except OSError:
                pass  # the client hung up

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/body", "/headers"])
def test_a_dripping_server_is_cut_at_the_total_deadline(drip_server, path):
    # Each byte comes well within the read timeout, so only a deadline on the whole download
    # stops it (before: iter_content waited for a full 64 KB chunk, ~3.6 h at this rate).
    with img.url_session() as s, pytest.raises(img.SourceError) as err:
        img.fetch_url(drip_server + path, s, timeout=(2, 2), deadline_s=1)
    assert err.value.rule == "url_fetch" and "longer than 1 s" in err.value.reason


@pytest.mark.timeout(30)
def test_read_local_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.png")  # opening this for reading would wait for a writer forever
    os.symlink(tmp_path / "x.png", tmp_path / "link.png")
    (tmp_path / "dir.png").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.png"))
    try:
        reasons = {}
        for name in ("x.png", "link.png", "dir.png", "s.png"):
            with pytest.raises(img.SourceError) as err:
                img.read_local(tmp_path / name)
            assert err.value.rule == "unreadable"
            reasons[name] = err.value.reason
    finally:
        sock.close()
    assert reasons == {
        "x.png": "it is a FIFO (named pipe), not a regular file",
        "link.png": "it is a FIFO (named pipe), not a regular file",
        "dir.png": "it is a directory, not a regular file",
        "s.png": "it is a socket, not a regular file",
    }


@pytest.mark.timeout(30)
def test_a_fifo_swapped_in_after_the_stat_is_caught_by_fstat(tmp_path, monkeypatch):
    # The race: stat saw a regular file, then a FIFO took its name. The non-blocking open
    # returns at once and fstat refuses it, so nothing blocks.
    from vidu_pipeline import sources

    (tmp_path / "plain.png").write_bytes(png())
    os.mkfifo(tmp_path / "x.png")
    regular, real_stat, fifo = os.stat(tmp_path / "plain.png"), os.stat, str(tmp_path / "x.png")
    monkeypatch.setattr(sources.os, "stat", lambda p, *a, **kw: regular if str(p) == fifo else real_stat(p, *a, **kw))
    with pytest.raises(img.SourceError) as err:
        img.read_local(tmp_path / "x.png")
    assert (err.value.rule, err.value.reason) == ("unreadable", "it is a FIFO (named pipe), not a regular file")


def test_fetch_url_refuses_a_session_whose_sockets_ignore_the_deadline(http_images):
    """A plain session would silently drop the total deadline: refused before anything is sent."""
    with requests.Session() as plain, pytest.raises(TypeError, match="url_session"):
        img.fetch_url(http_images + "/to-ok", plain)
