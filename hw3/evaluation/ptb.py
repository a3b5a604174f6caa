"""pycocoevalcap's PTBTokenizer without Java: the tokenisation the course's CIDEr runs first.

The course's p2_evaluate.py tokenises captions with pycocoevalcap's PTBTokenizer, which runs Stanford CoreNLP 3.4.1
(`edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`) in Java and then drops a list of punctuation
tokens. `ptb_tokenize` reproduces that output in pure Python by running the rules of CoreNLP 3.4.1's PTBLexer.flex
(the JFlex grammar the jar was built from) as a longest-match lexer: at every position each rule's longest match
(POSIX semantics, trailing context included) is taken, the longest rule wins and ties go to the earlier rule, as a
JFlex scanner does. Characters outside the BMP are split into UTF-16 surrogates, as Java sees them. Known
divergences, all outside what captions contain: Unicode letters and digits follow Python's Unicode tables rather
than those of the JDK that generated the jar, and a Greek capital sigma next to digits or punctuation may lower-case
to the other form (Java decides final sigma within BreakIterator words, Python by Unicode's Final_Sigma context).
"""
from __future__ import annotations

import functools
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import regex

from hw3.util.errors import UserError

# pycocoevalcap/tokenizer/ptbtokenizer.py removes these tokens after lower-casing (so "-lrb-" survives, as there).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# ---------------------------------------------------------------------------------------------------------------
# PTBLexer.flex (CoreNLP 3.4.1) macros. JFlex's %caseless makes literal text case-insensitive but not character
# classes, so literals are wrapped in (?i:...) and classes are left alone.
# ---------------------------------------------------------------------------------------------------------------
_M = {}
_MACRO_REF = regex.compile(r"(?<!\\[pP])\{([A-Z][A-Z0-9_]*)\}")


def _macro(name: str, pattern: str) -> None:
    """Defines a macro; {NAME} inside `pattern` expands to an earlier macro as a non-capturing group."""
    _M[name] = "(?:%s)" % _expand(pattern)


def _expand(pattern: str) -> str:
    return _MACRO_REF.sub(lambda m: _M[m.group(1)], pattern)


# JFlex's caseless letters also match the characters whose simple case mapping gives them (Java's toLowerCase /
# toUpperCase of a char): dotted and dotless i, long s, Kelvin sign. So "'tİstanbul" starts with the rule 'tis.
_CASE_VARIANTS = {"i": "\u0130\u0131", "s": "\u017F", "k": "\u212A"}


def _caseless(pattern: str) -> str:
    """(?i:abc) -> (?:[aA][bB][cC]). Spelt out because the regex module lets a scoped (?i:) case-fold character
    classes in other branches of the same pattern (regex 2026.11: `(?:(?i:w)|[^,-_]+)` rejects "xx")."""
    def letter(c):
        low = c.group().lower()
        return "[%s%s%s]" % (low, low.upper(), _CASE_VARIANTS.get(low, ""))

    def spell(match):
        return "(?:%s)" % regex.sub(r"(?<!\\)[A-Za-z]", letter, match.group(1))
    return regex.sub(r"\(\?i:([^()]*)\)", spell, pattern)


def _compile(pattern: str):
    return regex.compile(_caseless(_expand(pattern)), regex.POSIX)


_macro("SGML", r"""<([!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*([ ]+([A-Za-z][A-Za-z0-9_:.\-]*"""
               r"""|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*('[^']*'|"[^"]*")))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>""")
_macro("SPMDASH", r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]")
_macro("SPAMP", r"&(?i:amp);")
_macro("SPPUNC", r"&((?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq)|#[0-9]+);")
_macro("SPLET", r"&[aeiouAEIOU](?i:acute|grave|uml);")
_macro("SPACE", r"[ \t\u00A0\u2000-\u200A\u3000]")
_macro("SPACES", r"{SPACE}+")
_macro("NEWLINE", r"\r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085")
_macro("SPACENL", r"{SPACE}|{NEWLINE}")
_macro("SPACENLS", r"{SPACENL}+")
_macro("SENTEND", r"{SPACENL}({SPACENL}|\p{Lu}|{SGML})")
_macro("DIGIT", r"[\p{Nd}\u07C0-\u07C9]")
_macro("DATE", r"{DIGIT}{1,2}[\-/]{DIGIT}{1,2}[\-/]{DIGIT}{2,4}")
_macro("NUM", r"{DIGIT}+|{DIGIT}*([.:,\u00AD\u066B\u066C]{DIGIT}+)+")
_macro("NUMBER", r"[\-+]?{NUM}")
_macro("SUBSUPNUM", r"[\u207A\u207B\u208A\u208B]?([\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)")
_macro("FRAC", r"({DIGIT}{1,4}[\- \u00A0])?{DIGIT}{1,4}(\\?/|\u2044){DIGIT}{1,4}")
_macro("FRAC2", r"[\u00BC\u00BD\u00BE\u2153-\u215E]")
_macro("DOLSIGN", r"[A-Z]*\$|#")
_macro("DOLSIGN2", r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]")
_macro("LETTER", r"[\p{L}\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D"
                 r"\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F"
                 r"\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670"
                 r"\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA"
                 r"\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8"
                 r"\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82"
                 r"\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48"
                 r"\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD]|{SPLET}")
_macro("LD", r"[\p{L}\p{Nd}]")  # JFlex's ([:letter:]|[:digit:])
_macro("WORD", r"{LETTER}({LETTER}|{DIGIT})*([.!?]{LETTER}({LETTER}|{DIGIT})*)*")
_macro("FILENAME_EXT", r"(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3"
                       r"|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
_macro("FILENAME", r"({LETTER}|{DIGIT})+([.]({LETTER}|{DIGIT})+)*([.]{FILENAME_EXT})")
_macro("APOS", r"['\u0092\u2019]|&(?i:apos);")
_macro("APOSETCETERA", r"{APOS}|[`\u0091\u2018\u201B]")
_macro("HYPHEN", r"[\-_\u058A\u2010\u2011]")
_macro("THING", r"([dDoOlL]{APOSETCETERA}{LD})?{LD}+({HYPHEN}([dDoOlL]{APOSETCETERA}{LD})?{LD}+)*")
_macro("THINGA", r"[A-Z]+(([+&]|{SPAMP})[A-Z]+)+")
_macro("THING3", r"[A-Za-z0-9]+(-[A-Za-z]+){0,2}(\\?/[A-Za-z0-9]+(-[A-Za-z]+){0,2}){1,2}")
_macro("ACRO", r"[A-Za-z](\.[A-Za-z])*|(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)|(?i:U\.S\.-)((?i:U\.K)|(?i:U\.S\.S\.R))")
_macro("ACRO2", r"[A-Za-z](\.[A-Za-z])+|(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)|(?i:U\.S\.-)((?i:U\.K)|(?i:U\.S\.S\.R))")
_macro("HTHING", r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(-([A-Za-z0-9\u00AD]+|{ACRO2}\.))+")
_macro("REDAUX", r"{APOS}([msdMSD]|(?i:re|ve|ll))")
_macro("SWORD", r"[A-Za-z\u00AD]*[A-MO-Za-mo-z](\u00AD)*")
_macro("SREDAUX", r"(?i:n){APOSETCETERA}(?i:t)")
_macro("APOWORD", r"{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:Dunkin){APOS}|(?i:somethin){APOS}|(?i:ol){APOS}"
                  r"|{APOS}(?i:em)|[A-HJ-XZn]{APOSETCETERA}\p{L}{2}\p{L}*|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?)"
                  r"|\p{L}\p{L}*[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z]\p{L}*|{APOS}(?i:cause)|(?i:cont'd)\.?"
                  r"|(?i:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:O){APOSETCETERA}(?i:o)")
_macro("APOWORD2", r"(?i:y){APOS}")
_macro("FULLURL", r"""(?i:https?://)[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},\-]""")
_macro("LIKELYURL", r"""(((?i:www)\.([^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"""
                    r"""|(([^ \t\n\f\r"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)))"""
                    r"""(/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},\-])?""")
_macro("EMAIL", r"""(&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00A0{}]*@([^ \t\n\f\r"<>|(){}.\u00A0]+\.)*"""
                r"""([^ \t\n\f\r"<>|(){}.\u00A0]+)(&(?i:gt);|>)?""")
_macro("TWITTER", r"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+")
_macro("ABMONTH", r"(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)")
_macro("ABDAYS", r"(?i:Mon|Tue|Tues|Wed|Thu|Thurs|Fri)")
_macro("ABSTATE", r"(?i:Ala|Ariz)|A(?i:z)|A(?i:rk)|(?i:Calif|Colo|Conn|Ct|Dak)|D(?i:el)|(?i:Fla|Ga)|I(?i:ll)"
                  r"|(?i:Ind|Kans?|Ky)|L(?i:a)|M(?i:ass)|(?i:Md|Mich|Minn)|M(?i:iss)|(?i:Mo|Mont|Neb|Nev|Okla)"
                  r"|O(?i:re)|P(?i:a)|(?i:Penn|Tenn)|T(?i:ex)|(?i:Va|Vt)|W(?i:ash)|(?i:Wisc?|Wyo)")
_macro("ABCOMP", r"(?i:Inc|Cos?|Corp)|(?i:Pp?t)[ye](?i:s?)|(?i:Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys)")
_macro("ABNUM", r"(?i:tel|est|ext|sq)")
_macro("ABPTIT", r"(?i:Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq)")
_macro("ABBREV1", r"({ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|(?i:etc|al|seq|Bldg))\.")
_macro("ABTITLE", r"(?i:Mr|Mrs|Ms)|M(?i:iss)|(?i:Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj"
                  r"|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
                  r"|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc)")
_macro("ABCOMP2", r"(?i:Invt|Elec|Natl)|(?i:M)[ft](?i:g)|(?i:Dept)")
_macro("ABBREV4", r"{ABTITLE}|(?i:vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph)|{ACRO}|{ABCOMP2}")
_macro("ABBREV2", r"{ABBREV4}\.")
_macro("ACRONYM", r"{ACRO}\.")
_macro("ABBREV3", r"(?i:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\.")
_macro("PHONE", r"(\([0-9]{2,3}\)[ \u00A0]?|(\+\+?)?([0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
                r"[\- \u00A0]?[0-9]{3,5}|((\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_macro("FAKEDUCKFEET", r"<<|>>")
_macro("LESSTHAN", r"<|&(?i:lt);")
_macro("GREATERTHAN", r">|&(?i:gt);")
_macro("HYPHENS", r"\-+")
_macro("LDOTS", r"\.{3,5}|(\.[ \u00A0]){2,4}\.|[\u0085\u2026]")
_macro("FNMARKS", r"@+|#+|_+")
_macro("ASTS", r"\*+|(\\\*){1,3}")
_macro("INSENTP", r"[,;:\u3001]")
_macro("QUOTES", r"{APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039"
                 r"\u203A\u00AB\u00BB]{1,2}")
_macro("DBLQUOT", r'"|&(?i:quot);')
_macro("TBSPEC", r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-)|(?i:S)(&|{SPAMP})(?i:P-500)"
                 r"|(?i:S)(&|{SPAMP})(?i:Ls)|(?i:Cap){APOS}(?i:n)|(?i:c){APOS}(?i:est)")
_macro("TBSPEC2", r"{APOS}[0-9][0-9]")
_macro("SMILEY", r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]")
_macro("ASIANSMILEY", r"[\^x=~<>]\.\[\^(?i:x)=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
                      r"|\([\^x=~<>']-[\^x=~<>'`]\)")
_macro("MISCSYMBOL", "[+%&~\\^|\\\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7"
                     "\u00F7\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B"
                     "\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017"
                     "\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
                     "\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")
_ACRONYM_FOLLOWERS = (
    "[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere|[H]owever"
    "|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o"
    "|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et"
    "|[Y]ou")
_ACRONYM_FOLLOWERS = regex.sub(r"\[([A-Z])\]([a-z\\.]+)", r"\1(?i:\2)", _ACRONYM_FOLLOWERS)

# ---------------------------------------------------------------------------------------------------------------
# Rule actions: each maps the matched text (trailing context excluded) to (tokens, characters consumed); consuming
# fewer characters than matched is JFlex's yypushback.
# ---------------------------------------------------------------------------------------------------------------
NEWLINE_TOKEN = "\n"
_Action = Callable[[str], Tuple[List[str], int]]


def _keep(text: str) -> Tuple[List[str], int]:
    return [text], len(text)


def _drop(text: str) -> Tuple[List[str], int]:
    return [], len(text)


def _newline(text: str) -> Tuple[List[str], int]:
    return [NEWLINE_TOKEN], len(text)


def _replace(token: str) -> _Action:
    return lambda text: ([token], len(text))


def _pushback(count: int) -> _Action:
    return lambda text: ([text[:-count]], len(text) - count)


def _remove_soft_hyphens(text: str) -> Tuple[List[str], int]:
    return [text.replace("\u00AD", "") or "-"], len(text)


def _nbsp(text: str) -> Tuple[List[str], int]:
    return [text.replace(" ", "\u00A0")], len(text)


_AMP = regex.compile(_caseless(r"(?i:&amp;)"))


def _normalize_amp(text: str) -> Tuple[List[str], int]:
    return [_AMP.sub("&", text)], len(text)


def _brackets_to_ptb(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _smiley(text: str) -> Tuple[List[str], int]:
    return [_brackets_to_ptb(text)], len(text)


def _phone(text: str) -> Tuple[List[str], int]:
    return [_brackets_to_ptb(text.replace(" ", "\u00A0"))], len(text)


_LATEX_QUOTES = [(regex.compile("[\u0091\u2018\u201B\u2039]"), "`"), (regex.compile("[\u0092\u2019\u203A]"), "'"),
                 (regex.compile("[\u0093\u201C\u00AB]"), "``"), (regex.compile("[\u0094\u201D\u00BB]"), "''")]
_SINGLE_QUOTE = regex.compile("&apos;|'")
_DOUBLE_QUOTE = regex.compile('"|&quot;')


def _quotes(probably_left: bool) -> _Action:
    """PTBLexer's latexQuotes: ASCII quotes become ` `` or ' '' by the side they probably open, curly ones by shape."""
    def action(text: str) -> Tuple[List[str], int]:
        out = _SINGLE_QUOTE.sub("`" if probably_left else "'", text)
        out = _DOUBLE_QUOTE.sub("``" if probably_left else "''", out)
        for pattern, replacement in _LATEX_QUOTES:
            out = pattern.sub(replacement, out)
        return [out], len(text)
    return action


_CURRENCY = [(regex.compile("\u00A2"), "cents"), (regex.compile("\u00A3"), "#"),
             (regex.compile("[\u0080\u00A4\u20A0\u20AC]"), "$")]


def _currency(text: str) -> Tuple[List[str], int]:
    out = text
    for pattern, replacement in _CURRENCY:
        out = pattern.sub(replacement, out)
    return [out], len(text)


def _fraction(text: str) -> Tuple[List[str], int]:
    table = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
    return [table.get(text, text)], len(text)


def _strip_trailing_space(text: str) -> str:
    while text and (text[-1] in " \t\u0085" or "\n" <= text[-1] <= "\r"):
        text = text[:-1]
    return text


def _acronym(text: str) -> Tuple[List[str], int]:
    """`U.S.` before a likely sentence start: the word keeps its period and a period token follows; `I.` splits."""
    text = _strip_trailing_space(text)
    if len(text) == 2:
        return [text[:1]], 1
    return [text], len(text) - 1


def _abbrev3(text: str) -> Tuple[List[str], int]:
    return _keep(_strip_trailing_space(text))


def _abbrev1_sentence_end(text: str) -> Tuple[List[str], int]:
    return [text], len(text) - 1


# (pattern, trailing context or None, action), in PTBLexer.flex's order: on equal length the earlier rule wins.
_RULES = [
    (r"(?i:c)[+][+]", None, _keep),
    (r"(?i:c|f)#", None, _keep),
    (r"(?i:cannot)", None, _pushback(3)),
    (r"(?i:'twas)", None, _pushback(3)),
    (r"(?i:'tis)", None, _pushback(2)),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _pushback(2)),
    (r"{SGML}", None, _nbsp),
    (r"{SPMDASH}", None, _replace("--")),
    (r"{SPAMP}", None, _normalize_amp),
    (r"{SPPUNC}", None, _keep),
    (r"{WORD}", r"{REDAUX}", _remove_soft_hyphens),
    (r"{SWORD}", r"{SREDAUX}", _remove_soft_hyphens),
    (r"{WORD}", None, _remove_soft_hyphens),
    (r"{APOWORD}", None, _keep),
    (r"{APOWORD2}", r"\p{L}", _keep),
    (r"{FULLURL}", None, _keep),
    (r"{LIKELYURL}", None, _keep),
    (r"{EMAIL}", None, _keep),
    (r"{TWITTER}", None, _keep),
    (r"{REDAUX}", r"[^A-Za-z]", _quotes(False)),
    (r"{SREDAUX}", r"[^A-Za-z]", _quotes(False)),
    (r"{DATE}", None, _keep),
    (r"{NUMBER}", None, _remove_soft_hyphens),
    (r"{SUBSUPNUM}", None, _keep),
    (r"{FRAC}", None, _nbsp),
    (r"{FRAC2}", None, _fraction),
    (r"{TBSPEC}", None, _normalize_amp),
    (r"{THING3}", None, _keep),
    (r"{DOLSIGN}", None, _keep),
    (r"{DOLSIGN2}", None, _currency),
    (r"{ACRONYM}", r"({SPACENLS})(" + _ACRONYM_FOLLOWERS + r"|{SGML}){SPACENL}", _acronym),
    (r"{ABBREV3}", r"{SPACENL}?\p{Nd}", _abbrev3),
    (r"((?i:pt)[eyEY]|(?i:co))\.", r"{SPACE}(?i:ltd|lim)", _keep),
    (r"{ABBREV1}", r"{SENTEND}", _abbrev1_sentence_end),
    (r"{ABBREV1}", r"(?s:..)", _keep),
    (r"{ABBREV1}", None, _abbrev1_sentence_end),
    (r"{ABBREV2}", None, _keep),
    (r"{ABBREV4}", r"{SPACE}", _keep),
    (r"{ACRO}", r"{SPACENL}", _keep),
    (r"{TBSPEC2}", r"{SPACENL}", _keep),
    (r"{FILENAME}", r"({SPACENL}|[.?!,])", _keep),
    (r"{WORD}\.", r"{INSENTP}", _remove_soft_hyphens),
    (r"{PHONE}", None, _phone),
    (r"{DBLQUOT}", r"[A-Za-z0-9$]", _quotes(True)),
    (r"{DBLQUOT}", None, _quotes(False)),
    (r"\x7f", None, _drop),
    (r"{LESSTHAN}", None, _replace("<")),
    (r"{GREATERTHAN}", None, _replace(">")),
    (r"{SMILEY}", r"[^A-Za-z0-9]", _smiley),
    (r"{ASIANSMILEY}", None, _smiley),
    (r"\{", None, _replace("-LCB-")),
    (r"\}", None, _replace("-RCB-")),
    (r"\[", None, _replace("-LSB-")),
    (r"\]", None, _replace("-RSB-")),
    (r"\(", None, _replace("-LRB-")),
    (r"\)", None, _replace("-RRB-")),
    (r"{HYPHENS}", None, lambda text: (["--" if 3 <= len(text) <= 4 else text], len(text))),
    (r"{LDOTS}", None, _replace("...")),
    (r"{FNMARKS}", None, _keep),
    (r"{ASTS}", None, _keep),
    (r"{INSENTP}", None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
    (r"=", None, _keep),
    (r"/", None, _keep),
    (r"{HTHING}\.", r"{INSENTP}", _remove_soft_hyphens),
    (r"{HTHING}", None, _remove_soft_hyphens),
    (r"{THING}\.", r"{INSENTP}", _keep),
    (r"{THING}", None, _keep),
    (r"{THINGA}\.", r"{INSENTP}", _normalize_amp),
    (r"{THINGA}", None, _normalize_amp),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _quotes(True)),
    (r"{REDAUX}", None, _quotes(False)),
    (r"{SREDAUX}", None, _quotes(False)),
    (r"{QUOTES}", None, _quotes(False)),
    (r"{FAKEDUCKFEET}", None, _keep),
    (r"{MISCSYMBOL}", None, _keep),
    (r"\x00|{SPACES}|[\u200B\u200E\u200F\uFEFF]", None, _drop),
    (r"{NEWLINE}", None, _newline),
    (r"(?i:&nbsp;)", None, _drop),
    (r"[^\n]", None, _drop),  # untokenizable: CoreNLP deletes it (with a warning)
]


class _Rule:
    """One lexer rule: `head` is the token text, `tail` the trailing context (JFlex's head/tail)."""

    def __init__(self, head: str, tail: Optional[str], action: _Action):
        self.head = _compile(head)
        self.tail = _compile(tail) if tail else None
        self.full = _compile("(?:%s)(?:%s)" % (head, tail)) if tail else self.head
        self.action = action

    def split(self, text: str, start: int, end: int) -> int:
        """End of the head in a match text[start:end] of head+tail: the longest head whose rest matches the tail."""
        if self.tail is None:
            return end
        for cut in range(end, start - 1, -1):
            if self.head.fullmatch(text, start, cut) and self.tail.fullmatch(text, cut, end):
                return cut
        raise AssertionError("no head/tail split")  # unreachable: full matched


_LEXER = [_Rule(*rule) for rule in _RULES]
# A plain ASCII word before a space or a line end: no rule matches further, so its token is the word itself
# (except the words that PTBLexer splits). Skips the rule scan for most of a caption.
_PLAIN_WORD = regex.compile(r"[A-Za-z]+(?=[ \n]|$)")
_SPACES = _compile("{SPACES}")
_PLAIN_RUN = regex.compile(_expand(r"(?:[A-Za-z]+ {SPACE}*)+"))  # plain words each followed by a space run
_ASCII_WORD = regex.compile(r"[A-Za-z]+")
_CHUNK = regex.compile(r"[^ \n]{1,40}[ \n]?|[ \n]")
_ASTRAL = regex.compile("[\U00010000-\U0010FFFF]")
_SURROGATE = regex.compile("[\ud800-\udfff]")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


@functools.lru_cache(maxsize=None)
def _rules_starting_with(char: str) -> List[_Rule]:
    """The rules a match can start with `char` in (regex's partial matching), in order."""
    return [rule for rule in _LEXER if rule.full.match(char, partial=True)]


@functools.lru_cache(maxsize=100000)
def _rules_for_chunk(chunk: str, at_end: bool) -> List[_Rule]:
    """The rules that can match at the start of `chunk` (the text up to and including the next space or line end):
    those that match a prefix of it or could go on past its end (partial matching). At the end of the text
    nothing follows, so only complete matches count. Captions repeat chunks like "table." a lot."""
    return [rule for rule in _rules_starting_with(chunk[0]) if rule.full.match(chunk, partial=not at_end)]


def _to_utf16_units(text: str) -> str:
    """Java strings are UTF-16: a character outside the BMP is two surrogates, which PTBLexer drops."""
    if not _ASTRAL.search(text):
        return text
    out = []
    for c in text:
        code = ord(c)
        if code < 0x10000:
            out.append(c)
        else:
            code -= 0x10000
            out.append(chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF)))
    return "".join(out)


def _from_utf16_units(text: str) -> str:
    """Joins surrogate pairs back into characters; a lone surrogate is written by Java's UTF-8 encoder as "?"."""
    if not _SURROGATE.search(text):
        return text
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return _SURROGATE.sub("?", text)


def ptb_lex(text: str, fast: bool = True) -> List[str]:
    """CoreNLP 3.4.1 PTBLexer tokens of `text` (default options plus tokenizeNLs): line ends become NEWLINE_TOKEN."""
    text = _to_utf16_units(text)
    tokens = []
    pos = 0
    while pos < len(text):
        if fast:
            if text[pos] == " ":  # from an ASCII space only SPACES matches (other blanks may start a URL)
                pos = _SPACES.match(text, pos).end()
                continue
            run = _PLAIN_RUN.match(text, pos)
            if run:
                words = _ASCII_WORD.findall(run.group())
                if not any(w.lower() in _SPLIT_WORDS for w in words):
                    tokens.extend(words)
                    pos = run.end()
                    continue
            plain = _PLAIN_WORD.match(text, pos)
            if plain and plain.group().lower() not in _SPLIT_WORDS:
                tokens.append(plain.group())
                pos = plain.end()
                continue
        best, best_end = None, pos
        if fast:
            chunk = _CHUNK.match(text, pos).group()
            rules = _rules_for_chunk(chunk, pos + len(chunk) == len(text))
        else:
            rules = _LEXER
        for rule in rules:
            match = rule.full.match(text, pos)
            if match is not None and match.end() > best_end:
                best, best_end = rule, match.end()
        assert best is not None, "the catch-all rule matches any character but \\n, which NEWLINE matches"
        head_end = best.split(text, pos, best_end)
        new_tokens, consumed = best.action(text[pos:head_end])
        tokens.extend(new_tokens)
        pos += consumed
    return tokens


def ptb_tokenize_lines(lines: Sequence[str]) -> List[str]:
    """pycocoevalcap's PTBTokenizer on captions written one per line, as it runs them: one stream, lower-cased,
    punctuation tokens removed. A caption's tokens can depend on the next line (trailing context crosses it)."""
    stream = "\n".join(line.replace("\n", " ") for line in lines)
    out, current = [], []
    for token in ptb_lex(stream):
        if token == NEWLINE_TOKEN:
            out.append(current)
            current = []
        else:
            current.append(token.lower())
    out.append(current)
    # Java writes tokens joined by spaces and one line per NEWLINE token; pycocoevalcap splits on "\n", rstrips,
    # splits on " " and drops PUNCTUATIONS. A caption holding \r or another line separator therefore shifts the
    # following captions, exactly as in pycocoevalcap (zip stops at the shorter list).
    return [" ".join(w for w in _from_utf16_units(" ".join(tokens)).rstrip().split(" ") if w not in PUNCTUATIONS)
            for tokens in out[:len(lines)]]


def ptb_tokenize(text: str) -> str:
    """One caption as pycocoevalcap's PTBTokenizer outputs it: lower case, PTB tokens, punctuation removed."""
    return ptb_tokenize_lines([text])[0]


# ---------------------------------------------------------------------------------------------------------------
# Captions grouped by image, as pycocoevalcap's PTBTokenizer.tokenize takes them
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenize_stream(lines: Tuple[str, ...]) -> Tuple[str, ...]:
    """Cached: evaluation during training tokenises the same references every epoch."""
    return tuple(ptb_tokenize_lines(lines))


def _java_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    if shutil.which("java") is None:
        raise UserError("the Java PTBTokenizer needs `java` on PATH (install a JRE), or use the default Python tokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})


def tokenize(captions: Dict[str, List[str]], engine: str = "python") -> Dict[str, List[str]]:
    """{key: captions} -> {key: tokenised captions}, as PTBTokenizer.tokenize groups them: all captions in dict
    order as one stream, then regrouped. engine "java" runs pycocoevalcap's own (needs java)."""
    if engine not in ("python", "java"):
        raise ValueError("engine must be 'python' or 'java', not %r" % (engine,))
    if engine == "java":
        return _java_tokenize(captions)
    flat = _tokenize_stream(tuple(c for texts in captions.values() for c in texts))
    out, start = {}, 0
    for key, texts in captions.items():
        out[key] = list(flat[start:start + len(texts)])
        start += len(texts)
    return out
