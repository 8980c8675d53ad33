"""report.html as a person sees it: laid out by a real browser (headless Chromium) with
Debian's CJK fonts: every label whole and inside the page (read back from the PDF it
prints), and the Chinese sample drawn with real glyphs, not as empty boxes."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_jsonl
from fake_openai import FakeOpenAI

from gen.run import EXIT_OK, main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What .ci/run installs: Debian's chromium, fonts-noto-cjk and poppler-utils (pdftotext).
NEEDED = "chromium, fonts-noto-cjk and poppler-utils"


@pytest.fixture(scope="module")
def browser() -> str:
    if not (CHROMIUM and shutil.which("pdftotext") and Path("/usr/share/fonts/opentype/noto").is_dir()):
        if os.environ.get("CI"):
            pytest.fail(f"CI installs {NEEDED} (.ci/run); missing here")
        pytest.skip(f"needs {NEEDED} (apt-get install chromium fonts-noto-cjk poppler-utils)")
    return CHROMIUM


def chromium(binary: str, *args: str, env: dict | None = None) -> None:
    # The closed network: background services would try to reach Google and be refused.
    subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--hide-scrollbars", *args],
                   check=True, capture_output=True, timeout=120, env=env)


def test_report_in_a_real_browser_fits_its_labels_and_draws_chinese(browser, tmp_path, sample_captions):
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:8])
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert main(["--captions", str(path), "--out", str(out), "--base-url", fake.base_url,
                     "--model", "fake-model", "--no-progress", "--no-curate"]) == EXIT_OK
    page = out / "report.html"
    pdf = tmp_path / "report.pdf"
    chromium(browser, f"--user-data-dir={tmp_path / 'profile'}", "--no-pdf-header-footer",
             f"--print-to-pdf={pdf}", page.as_uri())
    # As a person sees it, 1200 px wide; and again on a machine with no CJK font (fontconfig
    # limited to DejaVu), where every Chinese character is an empty box. The two must differ:
    # with Debian's CJK fonts the page draws real glyphs.
    shot, boxes_shot = tmp_path / "report.png", tmp_path / "report-no-cjk.png"
    chromium(browser, f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1200,2400",
             f"--screenshot={shot}", page.as_uri())
    no_cjk = tmp_path / "fonts.conf"
    no_cjk.write_text('<?xml version="1.0"?><fontconfig><dir>/usr/share/fonts/truetype/dejavu</dir>'
                      f'<cachedir>{tmp_path / "fc"}</cachedir></fontconfig>')
    chromium(browser, f"--user-data-dir={tmp_path / 'p3'}", "--window-size=1200,2400",
             f"--screenshot={boxes_shot}", page.as_uri(), env={**os.environ, "FONTCONFIG_FILE": str(no_cjk)})
    from PIL import Image, ImageChops
    with Image.open(shot) as a, Image.open(boxes_shot) as b:
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is not None

    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    flat = " ".join(text.split())
    for label in ("rejected answers, valid queries kept", "from the store (cached)", "no answer (rerun)"):
        assert label in flat, f"label {label!r} cut off or missing"
    # Chinese drawn as text: a query of the sample, character for character.
    assert sample_captions[0]["text"][:12] in text.replace(" ", "")

    # Every word starts inside the page: a label clipped at the left edge would not.
    boxes = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, text=True,
                           check=True).stdout
    xs = [float(part.split('"')[1]) for part in boxes.split() if part.startswith("xMin=")]
    assert xs and min(xs) >= 10, min(xs)
