"""The COCO caption toolkit's METEOR without Java: a transcription of the Meteor 1.5 jar that pycocoevalcap runs
(`java -jar meteor-1.5.jar - - -stdio -l en -norm`), for `metrics.meteor_coco`.

Transcribed from Meteor 1.5 (github.com/cmu-mtlab/meteor, src/edu/cmu/meteor/...) and checked against the bytecode
of the meteor-1.5.jar that pycocoevalcap ships. Only the exact module is reproduced: the jar's stem, synonym
(WordNet) and paraphrase modules are English data. On Hangul they never fire; they can fire on Latin words, and the
paraphrase table also links 453 pairs of digit strings (e.g. 100/102, "1000"/"1 000"), where the jar then gives
partial credit that this transcription does not.

The pipeline per caption: normalise like the jar (-norm: each character that is not a Latin / Cyrillic letter, a
digit or one of . ' ` , - ‘ ’ becomes its own word, so each Hangul syllable is a word), align hypothesis and
reference by the jar's beam search over exact matches, count matches (function words weigh 1 - delta) and chunks;
the corpus score comes from statistics summed over all captions.
"""
import re
import string
from collections import Counter
from dataclasses import astuple, dataclass

# Constants.java, `-l en` ranking task: alpha, beta, gamma, delta. The exact module's weight is 1.0.
COCO_ALPHA, COCO_BETA, COCO_GAMMA, COCO_DELTA = 0.85, 0.20, 0.60, 0.75
_JAR_BEAM_SIZE = 40  # Constants.DEFAULT_BEAM_SIZE: partial alignments kept per step
# function/english.words in the jar: their matches count (1 - delta) instead of delta.
_JAR_FUNCTION_WORDS = frozenset("""the , . to of and a in that for " is on 's it with was as said at he by be
    from have has are his but an this not i will ’ they ) -rrb- ( -lrb- who their had we which were been more or s
    its would about new one after you : also up when there than $ all out her people she year two - can if last
    first “ over other ” into some what so -- no time years could ? 't — '""".split())
# nonbreaking/english.prefixes in the jar: "Dr." keeps its dot; "No." only when a number follows.
_JAR_NONBREAKING = frozenset(list(string.ascii_uppercase) + """Adj Adm Adv Asst Bart Bldg Brig Bros Capt Cmdr Col
    Comdr Con Corp Cpl DR Dr Drs Ens Gen Gov Hon Hr Hosp Insp Lt MM MR MRS MS Maj Messrs Mlle Mme Mr Mrs Ms Msgr Op
    Ord Pfc Ph Prof Pvt Rep Reps Res Rev Rt Sen Sens Sfc Sgt Sr St Supt Surg v vs i.e rev e.g Nos Nr""".split())
_JAR_NONBREAKING_NUMERIC = frozenset({"No", "Art", "pp"})
# Normalizer.java's letters (Western European + Cyrillic); Java's \s is [ \t\n\x0B\f\r] and \p{Digit} is [0-9].
_ALPHA = "A-Za-zŠŽšžŸÀ-ÖØ-öø-žЀ-ӿԀ-ԧꙀ-ꙮ꙾-ꚗᴀ-ᵿ"
_ALNUM = "0-9" + _ALPHA
_JAR_SPACE_OUT = re.compile(f"([^{_ALNUM} \t\n\x0b\f\r.'`,\\-‘’])")  # any other character becomes a word
_JAR_COMMAS = [re.compile(p) for p in (r"([^0-9]),([^0-9])", r"([0-9]),([^0-9])", r"([^0-9]),([0-9])")]
_JAR_CONTRACTIONS = [(re.compile(f"([^{_ALPHA}])'([^{_ALPHA}])"), r"\1 ' \2"),  # English: don't -> don 't
                     (re.compile(f"([^{_ALPHA}0-9])'([{_ALPHA}])"), r"\1 ' \2"),
                     (re.compile(f"([{_ALPHA}])'([^{_ALPHA}])"), r"\1 ' \2"),
                     (re.compile(f"([{_ALPHA}])'([{_ALPHA}])"), r"\1 '\2"), (re.compile("([0-9])'(s)"), r"\1 '\2")]
_JAR_WHITESPACE = re.compile("[ \u2000-\u200a\u202f\u205f\u3000\u00a0]+")
_JAVA_TRIM = "".join(map(chr, range(33)))  # String.trim() drops every character <= U+0020
_JAVA_TOKENS = re.compile("[^ \t\n\r\f]+")  # java.util.StringTokenizer with its default delimiters


def _jar_keep_or_split_final_dots(line: str) -> str:
    """Normalizer's nonbreaking-prefix pass: a word ending in '.' gives the dot its own token unless it is an
    abbreviation (U.S. -> US, Dr.), the next word starts in lower case, or it is "No." and the like before a number."""
    words = _JAVA_TOKENS.findall(line)
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if len(word) > 1 and word.endswith("."):
            prefix = word[:-1]
            if "." in prefix and re.search(f"[{_ALPHA}]", prefix):
                words[i] = word.replace(".", "")
            elif not (prefix in _JAR_NONBREAKING or re.match("[a-z]", following)
                      or (prefix in _JAR_NONBREAKING_NUMERIC and re.match("[0-9]", following))):
                words[i] = prefix + " ."
    return " ".join(words)


def _jar_words(line: str) -> list[str]:
    """The words the jar scores: Normalizer.normalizeLine(line, English, keep punctuation), toLowerCase, and the
    Alignment's StringTokenizer. The steps follow Normalizer.java's order."""
    line = _JAR_SPACE_OUT.sub(r" \1 ", f" {line} ")  # 고양이가 -> 고 양 이 가
    line = re.sub(r"\.(\.+)", r" DOTMULTI\1", line)  # protect runs of dots from the final-dot pass
    while "DOTMULTI." in line:
        line = re.sub(r"DOTMULTI\.([^.])", r"DOTDOTMULTI \1", line).replace("DOTMULTI.", "DOTDOTMULTI")
    for comma in _JAR_COMMAS:  # split commas, except inside numbers (1,000)
        line = comma.sub(r"\1 , \2", line)
    line = re.sub("([“”]|'')", ' " ', re.sub("[`‘’]", "'", line))
    line = line.replace("–", "-").replace("--", "-")
    line = re.sub(f"([{_ALNUM}.])-([{_ALNUM}])", r"\1 \2", line)  # well-known -> well known
    for contraction, split in _JAR_CONTRACTIONS:
        line = contraction.sub(split, line)
    line = _jar_keep_or_split_final_dots(line)
    while "DOTDOTMULTI" in line:
        line = line.replace("DOTDOTMULTI", "DOTMULTI.")
    line = line.replace("DOTMULTI", ".")
    return _JAVA_TOKENS.findall(_JAR_WHITESPACE.sub(" ", line).strip(_JAVA_TRIM).lower())


def _java_hash(word: str) -> int:
    """java.lang.String.hashCode. The jar's matchers compare these, not the words: colliding words (e.g. '000'
    and '먰', both 47664) match each other, and so they do here."""
    units = word.encode("utf-16-be")
    h = 0
    for high, low in zip(units[::2], units[1::2]):
        h = (31 * h + (high << 8 | low)) & 0xFFFFFFFF
    return h


class _PartialAlignment:
    """A path of the jar's beam search (PartialAlignment.java), exact matches only: the (reference, hypothesis)
    pairs taken, the chunks so far, `distance` (summed |reference - hypothesis| positions, the last tie-break),
    where the open chunk ends in the hypothesis, and the hypothesis words used (a bit mask)."""
    __slots__ = ("pairs", "chunks", "distance", "last_end", "used")

    def __init__(self, pairs=(), chunks=0, distance=0, last_end=-1, used=0):
        self.pairs, self.chunks, self.distance, self.last_end, self.used = pairs, chunks, distance, last_end, used

    def rank(self) -> tuple:  # Constants.PARTIAL_COMPARE_TOTAL: more matches, then fewer chunks, then less distance
        return -len(self.pairs), self.chunks, self.distance

    def copy(self) -> "_PartialAlignment":
        return _PartialAlignment(self.pairs, self.chunks, self.distance, self.last_end, self.used)

    def take(self, ref_pos: int, hyp_pos: int) -> None:
        if self.last_end != -1 and hyp_pos != self.last_end:  # not contiguous in the hypothesis: a new chunk
            self.chunks += 1
        self.pairs, self.last_end, self.used = self.pairs + ((ref_pos, hyp_pos),), hyp_pos + 1, self.used | 1 << hyp_pos

    def skip(self) -> None:  # leave this reference word unmatched, which closes the open chunk
        if self.last_end != -1:
            self.chunks, self.last_end = self.chunks + 1, -1


def _jar_best_alignment(hyp_keys: list[int], ref_keys: list[int]) -> _PartialAlignment:
    """Aligner.align + Aligner.resolve. A left-to-right beam search over the reference words: at each one, every
    path branches into one path per unused hypothesis word with the same key, plus itself skipping the word;
    the 40 best (more matches, then fewer chunks, then less distance) go on."""
    candidates = [[j for j, key in enumerate(hyp_keys) if key == ref_key] for ref_key in ref_keys]
    hyp_coverage = Counter(j for hyp_positions in candidates for j in hyp_positions)
    # A match that is the only candidate of both its words is definite: every path takes it.
    definite = {i: c[0] for i, c in enumerate(candidates) if len(c) == 1 and hyp_coverage[c[0]] == 1}
    paths = [_PartialAlignment(used=sum(1 << j for j in definite.values()))]
    for ref_pos, hyp_positions in enumerate(candidates):
        paths.sort(key=_PartialAlignment.rank)  # stable, like Collections.sort
        survivors, paths = paths[:_JAR_BEAM_SIZE], []
        for path in survivors:
            if ref_pos in definite:
                path.take(ref_pos, definite[ref_pos])
                path.distance += abs(ref_pos - definite[ref_pos])
                paths.append(path)
                continue
            for hyp_pos in hyp_positions:
                if not path.used >> hyp_pos & 1:
                    extended = path.copy()
                    extended.take(ref_pos, hyp_pos)
                    paths.append(extended)
                    path.distance += abs(ref_pos - hyp_pos)  # (sic) resolve() adds it to the path that skips
            path.skip()
            paths.append(path)
    paths.sort(key=_PartialAlignment.rank)
    finished = paths[:_JAR_BEAM_SIZE]
    for path in finished:
        path.skip()  # close the last chunk
    return sorted(finished, key=_PartialAlignment.rank)[0]


@dataclass
class _JarStats:
    """MeteorStats' sufficient statistics, word-based, exact module only (the jar's 23 numbers, less the zeros)."""
    test_length: int = 0
    reference_length: int = 0
    test_function_words: int = 0
    reference_function_words: int = 0
    test_content_matches: int = 0
    reference_content_matches: int = 0
    test_function_matches: int = 0
    reference_function_matches: int = 0
    chunks: int = 0

    @property
    def test_matches(self) -> int:
        return self.test_content_matches + self.test_function_matches

    @property
    def reference_matches(self) -> int:
        return self.reference_content_matches + self.reference_function_matches

    @property
    def perfect(self) -> bool:  # every word matched, in one chunk
        return (self.test_matches == self.test_length and self.reference_matches == self.reference_length
                and self.chunks == 1)

    def __add__(self, segment: "_JarStats") -> "_JarStats":
        """MeteorStats.addStats: sums everything, except that a perfect segment adds no chunk."""
        total = _JarStats(*(a + b for a, b in zip(astuple(self), astuple(segment))))
        total.chunks = self.chunks if segment.perfect else total.chunks
        return total


def _jar_score(s: _JarStats) -> float:
    """MeteorScorer.computeMetrics, in the jar's floating-point order."""
    if s.test_matches == 0:  # the jar computes 0/0 = NaN here and reports 0
        return 0.0
    d = COCO_DELTA
    precision = ((s.test_content_matches * d + s.test_function_matches * (1.0 - d))
                 / (d * (s.test_length - s.test_function_words) + (1.0 - d) * s.test_function_words))
    recall = ((s.reference_content_matches * d + s.reference_function_matches * (1.0 - d))
              / (d * (s.reference_length - s.reference_function_words) + (1.0 - d) * s.reference_function_words))
    fmean = 1.0 / ((1.0 - COCO_ALPHA) / precision + COCO_ALPHA / recall)
    fragmentation = 0.0 if s.perfect else s.chunks / ((s.test_matches + s.reference_matches) / 2)
    # C's pow (here) and the JVM's Math.pow can round fragmentation ** 0.2 one ulp apart
    return max(fmean * (1.0 - COCO_GAMMA * fragmentation ** COCO_BETA), 0.0)


def _jar_pair_stats(hyp_words: list[str], ref_words: list[str]) -> _JarStats:
    """MeteorScorer.getMeteorStats(Alignment) for one hypothesis / reference pair."""
    path = _jar_best_alignment([_java_hash(w) for w in hyp_words], [_java_hash(w) for w in ref_words])
    hyp_function = [word in _JAR_FUNCTION_WORDS for word in hyp_words]
    ref_function = [word in _JAR_FUNCTION_WORDS for word in ref_words]
    hyp_matched_function = sum(hyp_function[j] for _, j in path.pairs)
    ref_matched_function = sum(ref_function[i] for i, _ in path.pairs)
    return _JarStats(len(hyp_words), len(ref_words), sum(hyp_function), sum(ref_function),
                     len(path.pairs) - hyp_matched_function, len(path.pairs) - ref_matched_function,
                     hyp_matched_function, ref_matched_function, path.chunks)


def _jar_segment_stats(hyp: str, refs: list[str]) -> _JarStats:
    """pycocoevalcap's SCORE line for one video, as the jar reads it, and the statistics of its best reference
    (MeteorScorer.getMeteorStats(test, references): highest score, the first one on ties)."""
    hyp = hyp.replace("|||", "").replace("  ", " ")  # pycocoevalcap Meteor._stat
    parts = " ||| ".join(("SCORE", " ||| ".join(refs), hyp)).split("|||")  # a '|||' inside a reference splits it
    hyp_words = _jar_words(parts[-1].strip(_JAVA_TRIM))
    candidates = [_jar_pair_stats(hyp_words, _jar_words(ref.strip(_JAVA_TRIM))) for ref in parts[1:-1]]
    return max(candidates, key=_jar_score)  # max keeps the first of equal scores, as the jar does


def corpus_meteor(hyps: list[str], refs: list[list[str]]) -> float:
    """The jar's corpus score: statistics summed over captions (inputs already checked)."""
    total = _JarStats()
    for hyp, references in zip(hyps, refs):
        total = total + _jar_segment_stats(hyp, references)
    return _jar_score(total)
