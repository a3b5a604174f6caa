"""The report's page layout: A4 pages of wrapped text, tables, images and blank boxes, drawn with matplotlib and
written with its PDF backend; every text item is also kept as a line, so what a report says can be read and tested
without a PDF reader."""
from __future__ import annotations

import functools
import os
import textwrap
from typing import List, Optional, Sequence

from common import atomic_write

PAGE = (8.27, 11.69)  # A4 in inches
MARGIN = 0.07
WRAP = 100
LINE = 0.016  # one 9-point line, as a share of the page height
TABLE_ROW = 0.02


class Report:
    """A4 pages of wrapped text, tables, images and blank boxes, written with matplotlib's PDF backend; `lines` keeps
    every text item as drawn, so what the report says can be read (and tested) without a PDF reader."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.pages: List = []
        self.lines: List[str] = []
        self.new_page()

    def new_page(self):
        self.figure = self.plt.figure(figsize=PAGE)
        self.pages.append(self.figure)
        self.y = 1 - MARGIN

    def keep(self, height: float):
        """A new page unless `height` (a heading and what it introduces) fits on this one."""
        if self.y - height < MARGIN:
            self.new_page()

    def _text(self, text: str) -> str:
        """Records the readable text as a line of the report; returns it as matplotlib is to draw it."""
        self.lines.append(readable(text))
        return drawable(text)

    def heading(self, text: str, size: int = 14):
        self.keep(0.06)
        self.figure.text(MARGIN, self.y, self._text(text), fontsize=size, weight="bold", va="top")
        self.y -= 0.035 if size >= 14 else 0.028

    def paragraph(self, text: str, size: int = 9, indent: str = ""):
        for n, line in enumerate(textwrap.wrap(text, WRAP, subsequent_indent=indent) or [""]):
            self.keep(LINE + 0.002)
            self.figure.text(MARGIN, self.y, self._text(line), fontsize=size, va="top")
            self.y -= LINE
        self.y -= 0.008

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], widths: Optional[Sequence[float]] = None):
        height = TABLE_ROW * (len(rows) + 1)
        self.keep(height + 0.01)
        ax = self.figure.add_axes((MARGIN, self.y - height, 1 - 2 * MARGIN, height))
        ax.axis("off")
        cells = [list(header)] + [list(row) for row in rows]
        self.lines += [" | ".join(readable(c) for c in row) for row in cells]
        cells = [[drawable(c) for c in row] for row in cells]
        table = ax.table(cellText=cells[1:], colLabels=cells[0], colWidths=widths,
                         loc="upper left", cellLoc="left", bbox=(0, 0, 1, 1))
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        self.y -= height + 0.015

    def image(self, path: str, height: float = 0.3, caption: Optional[str] = None):
        import matplotlib.image as mpimg

        if not os.path.isfile(path):
            self.paragraph("(figure missing: %s)" % path)
            return
        picture = mpimg.imread(path)
        aspect = picture.shape[1] / picture.shape[0] * PAGE[1] / PAGE[0]
        width = min(1 - 2 * MARGIN, height * aspect)
        height = width / aspect
        self.keep(height + 0.03)
        ax = self.figure.add_axes((MARGIN, self.y - height, width, height))
        ax.imshow(picture)
        ax.axis("off")
        self.y -= height + 0.01
        if caption:
            self.paragraph(caption, size=8)

    def blank(self, prompt: str, height: float = 0.07):
        """A framed empty box headed by `prompt`, for the student to write in."""
        self.keep(height + LINE + 0.01)
        self.paragraph(prompt, size=8)
        box = self.plt.Rectangle((MARGIN, self.y - height), 1 - 2 * MARGIN, height, transform=self.figure.transFigure,
                                 fill=False, edgecolor="0.6", linewidth=0.6, linestyle="--")
        self.figure.add_artist(box)
        self.lines.append("[blank room for the student]")
        self.y -= height + 0.012

    def save(self, path: str):
        from matplotlib.backends.backend_pdf import PdfPages

        with atomic_write(path, "wb") as f:
            with PdfPages(f) as pdf:
                for page in self.pages:
                    pdf.savefig(page)
        for page in self.pages:
            self.plt.close(page)


def readable(text) -> str:
    """The text with each character the font lacks as an escape (\\u5b78), so no missing-glyph box or warning; a
    line break stays one."""
    glyphs = font_charmap()
    return "".join(c if ord(c) in glyphs or c == "\n" else escape_char(c) for c in str(text))


def drawable(text) -> str:
    """readable(text) as a matplotlib Text is given it: a '$' is a dollar sign, not the start of mathtext."""
    return readable(text).replace("$", r"\$")


@functools.lru_cache(maxsize=None)
def font_charmap() -> frozenset:
    """The code points the default font can draw (matplotlib's DejaVu Sans has no CJK, for one)."""
    from matplotlib import font_manager, ft2font, rcParams

    path = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
    return frozenset(ft2font.FT2Font(path).get_charmap())


def escape_char(char: str) -> str:
    return "\\u%04x" % ord(char) if ord(char) <= 0xFFFF else "\\U%08x" % ord(char)
