"""The report as one document model (headings, paragraphs, tables, figures, questions) rendered twice: to Markdown
(report.md, the source a student edits or converts with pandoc) and to a PDF typeset with fpdf2 (selectable text,
real tables, full-width figures, headings as bookmarks). Both come from the same blocks, so they never disagree, and
`lines` keeps the text so what the report says can be tested without a PDF reader.

fpdf2 rather than reportlab: pure Python with wheels for 3.8 to 3.13 (2.8.3 is the last release for Python 3.8), a
table API, outlines, TrueType/OpenType embedding with fallback fonts for CJK, and no compiled extension.

`readable` / `drawable` stay for matplotlib figure titles (p3_visualize.py): DejaVu Sans lacks CJK, so there a
character it cannot draw is escaped."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import List, NamedTuple, Optional, Sequence
from urllib.parse import quote

from hw3.util.files import atomic_write

CJK_PACKAGE = "fonts-noto-cjk"
NO_FONT_LINE = ("[text in a script no installed font covers; install %s (apt-get install %s) and rebuild the report; "
                "report.md holds it as written]" % (CJK_PACKAGE, CJK_PACKAGE))
UNANSWERED = "[unanswered: write it in %s under [%s]]"
MARGIN_MM = 18
BODY_PT, SMALL_PT, TABLE_PT = 9.5, 8, 8
HEADING_PT = {1: 18, 2: 14, 3: 11}
LINE_MM = 4.6
BULLET_MM = 6
FIGURE_DPI = 170  # figures are downsampled to this resolution at full text width
MAX_FIGURE_SHARE = 0.62  # of the page's text height: a tall figure is scaled down to leave room for its caption


class Heading(NamedTuple):
    text: str
    level: int  # 1 title, 2 problem or section, 3 question


class Paragraph(NamedTuple):
    text: str
    bullet: bool = False
    small: bool = False


class Table(NamedTuple):
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    widths: Optional[Sequence[float]] = None


class Figure(NamedTuple):
    path: str  # as the report is built (results folder joined), checked to exist
    shown: str  # the path as the report names it: relative to the results folder
    caption: Optional[str] = None


class Question(NamedTuple):
    """A question only a person can answer: its id and text (answers.md's heading), the numbers' hint, the answer."""
    qid: str
    text: str
    hint: str
    answer: str
    answers_file: str


class PageBreak(NamedTuple):
    pass


class Report:
    """The report's blocks in order. `lines` is its text as each block reads (a table a line per row, a question
    its text then its answer or the placeholder)."""

    def __init__(self):
        self.blocks: List[tuple] = []

    def heading(self, text: str, level: int = 2):
        self.blocks.append(Heading(str(text), level))

    def paragraph(self, text: str, bullet: bool = False, small: bool = False):
        self.blocks.append(Paragraph(str(text), bullet, small))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], widths: Optional[Sequence[float]] = None):
        if rows:  # an empty table says nothing
            self.blocks.append(Table([str(c) for c in header], [[str(c) for c in r] for r in rows], widths))

    def image(self, path: str, shown: str, caption: Optional[str] = None):
        self.blocks.append(Figure(path, shown, caption))

    def question(self, qid: str, text: str, hint: str, answer: str, answers_file: str):
        self.blocks.append(Question(qid, text, hint, answer.strip(), answers_file))

    def new_page(self):
        self.blocks.append(PageBreak())

    @property
    def lines(self) -> List[str]:
        lines: List[str] = []
        for block in self.blocks:
            if isinstance(block, Table):
                lines += [" | ".join(row) for row in [block.header] + list(block.rows)]
            elif isinstance(block, Figure):
                if not os.path.isfile(block.path):
                    lines.append(missing_figure(block))
                if block.caption:
                    lines.append(block.caption)
            elif isinstance(block, Question):
                lines += ["[%s] %s" % (block.qid, block.text)] + ([block.hint] if block.hint else [])
                lines += block.answer.splitlines() if block.answer else [placeholder(block)]
            elif not isinstance(block, PageBreak):
                lines.append(block.text)
        return lines

    def markdown(self, md_dir: str) -> str:
        return to_markdown(self.blocks, md_dir)

    def save(self, path: str) -> List[str]:
        """Writes the PDF; returns the lines of text it could not draw for want of a font (shown as NO_FONT_LINE)."""
        return PdfWriter().write(self.blocks, path)


def placeholder(question: Question) -> str:
    return UNANSWERED % (question.answers_file, question.qid)


def missing_figure(figure: Figure) -> str:
    return "(figure missing: %s)" % figure.shown


# ----------------------------------------------------------------------------------------------- Markdown

MD_SPECIAL = "\\`*_[]<>$#|"


def md_text(text: str) -> str:
    """Text as Markdown shows it literally (GitHub and pandoc): its punctuation escaped, '$' not TeX math."""
    return "".join("\\" + c if c in MD_SPECIAL else c for c in text)


def md_link(path: str, md_dir: str) -> str:
    return quote(os.path.relpath(path, md_dir).replace(os.sep, "/"), safe="/._-")


def md_table(table: Table) -> List[str]:
    def row(cells):
        return "| " + " | ".join(md_text(c) for c in cells) + " |"
    return [row(table.header), "|" + "|".join(" --- " for _ in table.header) + "|"] + [row(r) for r in table.rows]


def md_block(block: tuple, md_dir: str) -> List[str]:
    if isinstance(block, Heading):
        return ["#" * block.level + " " + md_text(block.text)]
    if isinstance(block, Paragraph):
        return [("- " if block.bullet else "") + ("*%s*" if block.small else "%s") % md_text(block.text)]
    if isinstance(block, Table):
        return md_table(block)
    if isinstance(block, Figure):
        if not os.path.isfile(block.path):
            return [md_text(missing_figure(block))] + ([md_text(block.caption)] if block.caption else [])
        alt = md_text(block.caption or os.path.basename(block.shown))
        return ["![%s](%s)" % (alt, md_link(block.path, md_dir))] + (
            ["", "*%s*" % md_text(block.caption)] if block.caption else [])
    if isinstance(block, Question):
        lines = ["**[%s] %s**" % (md_text(block.qid), md_text(block.text))]
        if block.hint:
            lines += ["", "*%s*" % md_text(block.hint)]
        return lines + ["", block.answer if block.answer else "> **%s**" % md_text(placeholder(block))]
    return []


def to_markdown(blocks: Sequence[tuple], md_dir: str) -> str:
    parts = ["\n".join(md_block(b, md_dir)) for b in blocks]
    return "\n\n".join(p for p in parts if p) + "\n"


# ----------------------------------------------------------------------------------------------- fonts

def latin_fonts() -> dict:
    """DejaVu Sans from matplotlib (a dependency already): most European scripts, selectable and searchable."""
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    return {style: os.path.join(folder, name) for style, name in (("", "DejaVuSans.ttf"), ("B", "DejaVuSans-Bold.ttf"),
                                                                   ("I", "DejaVuSans-Oblique.ttf"))}


@functools.lru_cache(maxsize=None)
def cjk_font() -> Optional[str]:
    """A font file covering Chinese from the system's font list (fc-list :lang=zh), Sans and Regular first; None if
    there is none."""
    try:
        listed = subprocess.run(["fc-list", ":lang=zh", "file", "style"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        listed = []
    files = sorted({line.split(":")[0].strip(): line for line in listed if line.strip()}.items(),
                   key=lambda item: ("Sans" not in item[0], "Regular" not in item[1], item[0]))
    usable = [f for f, _ in files if os.path.splitext(f)[1].lower() in (".ttf", ".otf", ".ttc", ".otc")]
    return usable[0] if usable else None


class PdfWriter:
    """fpdf2 pages of the blocks: A4, DejaVu Sans with the CJK font (if any) as fallback."""

    def __init__(self):
        from fpdf import FPDF

        self.pdf = FPDF(format="A4")
        self.pdf.set_margins(MARGIN_MM, MARGIN_MM, MARGIN_MM)
        self.pdf.set_auto_page_break(True, MARGIN_MM)
        self.pdf.set_image_filter("DCTDecode")  # JPEG: the attention maps are photographs in all but name
        for style, path in latin_fonts().items():
            self.pdf.add_font("body", style, path)
        self.glyphs = set(self.pdf.fonts["body"].cmap)
        font = cjk_font()
        if font:
            self.pdf.add_font("cjk", "", font)
            self.pdf.set_fallback_fonts(["cjk"], exact_match=False)
            self.glyphs |= set(self.pdf.fonts["cjk"].cmap)
        self.undrawable: List[str] = []
        self.outline_level = -1
        self.following: Optional[tuple] = None  # the block after the one being written
        self.pdf.add_page()

    def drawable(self, text: str) -> str:
        """The text, or NO_FONT_LINE when a character of it has no glyph in any font (never boxes or escapes)."""
        if all(ord(c) in self.glyphs or c in "\n\t" for c in text):
            return text
        self.undrawable.append(text)
        return NO_FONT_LINE

    def write(self, blocks: Sequence[tuple], path: str) -> List[str]:
        for n, block in enumerate(blocks):
            self.following = blocks[n + 1] if n + 1 < len(blocks) else None
            getattr(self, type(block).__name__.lower())(block)
        with atomic_write(path, "wb") as f:
            f.write(bytes(self.pdf.output()))
        return self.undrawable

    def text(self, text: str, size: float = BODY_PT, style: str = "", indent: float = 0, border: int = 0):
        self.pdf.set_font("body", style, size)
        self.pdf.set_x(self.pdf.l_margin + indent)
        self.pdf.multi_cell(self.pdf.epw - indent, LINE_MM * size / BODY_PT, self.drawable(text), border=border,
                            align="L", new_x="LMARGIN", new_y="NEXT")

    def heading(self, block: Heading):
        size = HEADING_PT.get(block.level, HEADING_PT[3])
        keep = 3 * size  # a heading never ends a page; one introducing a figure stays with it
        if isinstance(self.following, Figure) and os.path.isfile(self.following.path):
            keep = size + self.figure_height(self.following.path) + 2 * LINE_MM
        if self.pdf.get_y() + keep > self.pdf.page_break_trigger:
            self.pdf.add_page()
        self.pdf.ln(2 if block.level > 2 else 4)
        self.outline_level = min(block.level - 1, self.outline_level + 1)  # an outline never skips a level
        self.pdf.start_section(self.drawable(block.text), level=self.outline_level)
        self.text(block.text, size, "B")
        self.pdf.ln(1)

    def paragraph(self, block: Paragraph):
        size = SMALL_PT if block.small else BODY_PT
        if block.bullet:
            self.pdf.set_font("body", "", size)
            self.pdf.cell(BULLET_MM, LINE_MM * size / BODY_PT, "\u2022")
        self.text(block.text, size, "I" if block.small else "", BULLET_MM if block.bullet else 0)
        self.pdf.ln(1.5)

    def table(self, block: Table):
        self.pdf.set_font("body", "", TABLE_PT)
        widths = tuple(block.widths) if block.widths else None
        with self.pdf.table(col_widths=widths, text_align="LEFT", line_height=LINE_MM * TABLE_PT / BODY_PT,
                            first_row_as_headings=True) as table:
            for cells in [block.header] + list(block.rows):
                row = table.row()
                for cell in cells:
                    row.cell(self.drawable(cell))
        self.pdf.ln(2)

    def figure_height(self, path: str) -> float:
        """Full text width, unless that makes it taller than MAX_FIGURE_SHARE of the page."""
        from PIL import Image

        with Image.open(path) as picture:
            aspect = picture.height / picture.width
        page_height = self.pdf.page_break_trigger - self.pdf.t_margin
        return min(self.pdf.epw * aspect, MAX_FIGURE_SHARE * page_height)

    def figure(self, block: Figure):
        from PIL import Image

        if not os.path.isfile(block.path):
            self.text(missing_figure(block))
        else:
            with Image.open(block.path) as picture:
                aspect = picture.height / picture.width
            height = self.figure_height(block.path)
            if self.pdf.get_y() + height + 2 * LINE_MM > self.pdf.page_break_trigger:
                self.pdf.add_page()
            self.pdf.image(embedded(block.path), x=self.pdf.l_margin + (self.pdf.epw - height / aspect) / 2,
                           w=height / aspect, h=height)
        if block.caption:
            self.text(block.caption, SMALL_PT, "I")
        self.pdf.ln(2)

    def question(self, block: Question):
        self.text("[%s] %s" % (block.qid, block.text), SMALL_PT, "B")
        if block.hint:
            self.text(block.hint, SMALL_PT, "I")
        if block.answer:
            self.text(block.answer, BODY_PT, border=1)
        else:
            self.pdf.set_text_color(170, 0, 0)
            self.text(placeholder(block), SMALL_PT, "I", border=1)
            self.pdf.set_text_color(0)
        self.pdf.ln(2)

    def pagebreak(self, block: PageBreak):
        self.pdf.add_page()


def embedded(path: str):
    """The figure as the PDF holds it: on white without its alpha channel and at most FIGURE_DPI across the text
    width, which keeps a report of a dozen figures near a megabyte instead of several."""
    from PIL import Image

    with Image.open(path) as picture:
        picture.load()
        limit = round(FIGURE_DPI * (210 - 2 * MARGIN_MM) / 25.4)
        if picture.width > limit:
            picture = picture.resize((limit, round(picture.height * limit / picture.width)), getattr(Image, "Resampling", Image).LANCZOS)  # Pillow 9.1+ / older
        if picture.mode in ("RGBA", "LA", "P"):
            picture = picture.convert("RGBA")
            flat = Image.new("RGB", picture.size, "white")
            flat.paste(picture, mask=picture.split()[-1])
            return flat
        return picture.convert("RGB")


def say_undrawable(undrawable: Sequence[str]) -> None:
    """The one line the report's writer prints when the PDF could not show some text."""
    if undrawable:
        print("make_report: %d text item(s) in a script the installed fonts lack are shown in the PDF as a note; "
              "install %s (apt-get install %s) to typeset them (report.md has them as written)" % (
                  len(undrawable), CJK_PACKAGE, CJK_PACKAGE), file=sys.stderr)


# ----------------------------------------------------------------------------------------------- matplotlib titles

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
