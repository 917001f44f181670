"""What a file is, decided from its first bytes alone — never from its name or extension.

Only PNG, JPEG and WebP can be sent; every other name exists so a refusal can say what the
file really is ("HEIC", "SVG", "HTML", …). The image rules and the verdict cache both ask.
"""

from __future__ import annotations

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MIME_SUBTYPES = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}

_FTYP_BRANDS = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"hevx": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}
_SIGNATURES = (  # (offset, magic, name), checked in order
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"BM", "BMP"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (0, b"PK\x03\x04", "ZIP archive"),
    (0, b"\x1f\x8b", "gzip data"),
)


def sniff_format(head: bytes) -> str:
    """Name what the first bytes of a file are, by content: "PNG", "JPEG", "WEBP", "GIF", "SVG"…

    Only PNG, JPEG and WEBP are accepted; the other names exist so a refusal can say what the
    file really is ("HEIC", "SVG", "HTML", "text", "unknown binary data", "empty").
    """
    if not head:
        return "empty"
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] == b"RIFF":
        return f"RIFF {head[8:12].decode('latin-1').strip()} (not an image)"
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "MP4/QuickTime video")
    if b"\x00" in head[:1024]:
        return "unknown binary data"
    text = head[:4096].decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n").lower()
    if "<svg" in text and text.startswith(("<svg", "<?xml", "<!--", "<!doctype svg")):
        return "SVG"
    if text.startswith(("<!doctype html", "<html")):
        return "HTML"
    if text.startswith("<?xml"):
        return "XML"
    if text.startswith(("{", "[")):
        return "JSON or text"
    return "text"
