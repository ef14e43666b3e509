"""The four decoding engines: what each compiles, what it leaves unenforced, and how its artefact is checked.

These functions run inside worker processes (``pool``), so a slow or crashing
engine can be killed. Each engine is imported only when first used.

Artefacts (one file each):
- llguidance: ``NAME.lark``, Lark as llguidance loads it (a JSON Schema goes in as llguidance's ``%json``).
- outlines: ``NAME.regex``, outlines-core's ``build_regex_from_schema`` output.
- llama.cpp: ``NAME.gbnf``, our converter (``gbnf``), loaded back through llguidance's GBNF reader.
- xgrammar: ``NAME.schema.json`` (xgrammar compiles JSON Schema itself; we compile it with xgrammar's
  own ``GrammarCompiler`` over a byte vocabulary).

Verification accepts a value when the engine accepts *some* compact serialisation of
it (given, or with keys in schema order; raw UTF-8 or ``\\u`` escapes): an engine that
fixes the property order still generates the value.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from synapse_cli.errors import one_line

ENGINES = ("llguidance", "xgrammar", "outlines", "llama.cpp")
ARTEFACT_SUFFIX = {"llguidance": "lark", "outlines": "regex", "llama.cpp": "gbnf", "xgrammar": "schema.json"}
PACKAGES = {"llguidance": "llguidance", "outlines": "outlines-core", "xgrammar": "xgrammar", "llama.cpp": "llguidance"}

# What outlines-core 0.2.14 and xgrammar 0.2.8 turn into constraints (read from their converters and
# measured on the JSON-Schema-Test-Suite): any other validation keyword in a schema is reported ignored.
OUTLINES_ENFORCED = frozenset(
    "type enum const properties required additionalProperties items prefixItems minItems maxItems "
    "minLength maxLength pattern format anyOf allOf $ref".split()
)
OUTLINES_FORMATS = frozenset(["uuid"])  # exactly; the others only by shape
XGRAMMAR_ENFORCED = frozenset(
    "type enum const properties required additionalProperties items prefixItems minItems maxItems "
    "minLength maxLength pattern anyOf $ref minimum maximum exclusiveMinimum exclusiveMaximum "
    "patternProperties propertyNames format".split()
)
XGRAMMAR_FORMATS = frozenset(["uuid"])  # exactly; the others only by shape


class EngineFailure(Exception):
    """The engine could not compile or load this input: the message goes to the report's ``error``."""


ERROR_CHARS = 300  # an engine's error in a report: one line, at most this long (errors.one_line)


# -- llguidance ---------------------------------------------------------------------------

_TOKENIZER: Any = None


class _ByteTokenizer:
    """256 byte tokens + EOS: lets llguidance check whole strings byte by byte."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def _llg_tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        import llguidance

        _TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    return _TOKENIZER


def _llg_matcher(lark: str) -> Any:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    matcher = llguidance.LLMatcher(_llg_tokenizer(), grammar, log_level=0)
    if matcher.is_error():
        raise EngineFailure(one_line(matcher.get_error(), ERROR_CHARS))
    return matcher


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


def _llg_json_lark(schema: Any) -> tuple[str, list[str]]:
    """Lark with the schema embedded: strict first; what strict refuses, relaxed and reported.

    llguidance refuses unimplemented keywords (``lenient`` compiles without them and warns)
    and ``oneOf`` it cannot prove exclusive (``coerce_one_of`` enforces it as ``anyOf``).
    """
    import llguidance

    from synapse_cli.jobs.compile.normalize import walk

    tok = _llg_tokenizer()
    options: dict[str, Any] = {}
    ignored: set[str] = set()
    for _ in range(3):
        embedded = schema
        if options and isinstance(schema, dict):
            embedded = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **options}}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(embedded)
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)  # the real compile: lexer and parser built
        is_error = matcher.is_error()
        messages = [matcher.get_error()] if is_error else list(matcher.get_grammar_warnings())
        text = " ".join(messages)
        if not is_error:
            for m in messages:
                for group in _UNIMPLEMENTED.findall(m):
                    ignored.update(k.strip().strip('"') for k in group.split(",") if k.strip())
                if "format" in m.lower():
                    ignored.add("format")
            if options.get("lenient") and any("oneOf" in node for _, node in walk(schema)):
                ignored.add("oneOf")  # measured: lenient mode enforces a non-exclusive oneOf as anyOf, silently
            lark = "%llguidance {}\n\nstart: %json " + json.dumps(embedded, ensure_ascii=False) + "\n"
            return lark, sorted(ignored)
        if "coerce_one_of" in text and not options.get("coerce_one_of"):
            options["coerce_one_of"] = True
            ignored.add("oneOf")
        elif ("Unimplemented keys" in text or "format" in text.lower()) and not options.get("lenient"):
            options["lenient"] = True
        else:
            raise EngineFailure(one_line(text, ERROR_CHARS))
    raise EngineFailure(one_line(text, ERROR_CHARS))


# -- per engine compile ---------------------------------------------------------------------


def compile_artefact(engine: str, kind: str, payload: Any, used: list[str]) -> dict[str, Any]:
    """``{"artefact", "ignored_keywords", "compile_ms"}``; raises EngineFailure when unsupported."""
    _warm(engine)  # imports are not compile time
    t0 = time.perf_counter()
    ignored: list[str] = []
    if engine == "llguidance":
        if kind == "json_schema":
            artefact, ignored = _llg_json_lark(payload)
        elif kind == "regex":
            import llguidance

            artefact = "%llguidance {}\n\nstart: " + _lark_regex(payload, llguidance) + "\n"
        else:
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                artefact = any_to_lark(payload)
            except Exception as exc:
                raise EngineFailure(f"cannot read grammar: {one_line(exc, ERROR_CHARS)}") from None
        _llg_matcher(artefact)
    elif engine == "llama.cpp":
        from synapse_cli.jobs.compile import gbnf

        try:
            if kind == "json_schema":
                artefact, ignored = gbnf.schema_to_gbnf(payload)
            elif kind == "regex":
                artefact = gbnf.regex_to_gbnf(payload)
            else:
                from llguidance.gbnf_to_lark import is_lark_syntax

                if is_lark_syntax(payload):
                    raise EngineFailure("grammar is Lark; llama.cpp loads GBNF and there is no Lark-to-GBNF converter")
                artefact = payload
        except gbnf.Unsupported as exc:
            raise EngineFailure(str(exc)) from None
        _gbnf_matcher(artefact)
    elif engine == "outlines":
        artefact, ignored = outlines_regex(kind, payload)
        _outlines_index(artefact)
        _py_regex(artefact)
    elif engine == "xgrammar":
        xgr = _xgrammar()
        try:
            if kind == "json_schema":
                refusal = _xgrammar_refuses(payload)
                if refusal:
                    raise EngineFailure(refusal)
                artefact = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
                grammar = xgr.Grammar.from_json_schema(json.dumps(payload), strict_mode=False)
                ignored = sorted(_ignored_by(used, XGRAMMAR_ENFORCED, payload, XGRAMMAR_FORMATS))
            elif kind == "regex":
                artefact = payload
                grammar = xgr.Grammar.from_regex(payload)
            else:
                from llguidance.gbnf_to_lark import is_lark_syntax

                if is_lark_syntax(payload):
                    raise EngineFailure("grammar is Lark; xgrammar loads EBNF/GBNF")
                artefact = payload
                grammar = xgr.Grammar.from_ebnf(payload)
            _xgr_compiler().compile_grammar(grammar)
        except EngineFailure:
            raise
        except Exception as exc:
            raise EngineFailure(one_line(exc, ERROR_CHARS)) from None
    else:
        raise EngineFailure(f"unknown engine {engine!r}")
    return {"artefact": artefact, "ignored_keywords": ignored, "compile_ms": round((time.perf_counter() - t0) * 1000, 2)}


def preload(engine: str) -> None:
    """Import an engine's modules and nothing more: the fork server's part. Its objects (tokenizers,
    compilers, their threads) are made by ``_warm`` in each forked worker. A missing package is
    reported by the worker's own warm-up and compile requests."""
    try:
        if engine in ("llguidance", "llama.cpp"):
            import llguidance  # noqa: F401
        elif engine == "outlines":
            import outlines_core.json_schema  # noqa: F401
        elif engine == "xgrammar":
            _xgrammar()
    except Exception:
        pass


def _warm(engine: str) -> None:
    if engine in ("llguidance", "llama.cpp"):
        _llg_tokenizer()
    elif engine == "outlines":
        import outlines_core.json_schema  # noqa: F401
    elif engine == "xgrammar":
        _xgr_compiler()


def _lark_regex(pattern: str, llguidance: Any) -> str:
    lark = "/" + llguidance.regex_to_lark(pattern, "dw") + "/"
    return lark


def _ignored_by(used: list[str], enforced: frozenset[str], schema: Any, formats: frozenset[str]) -> set[str]:
    """Keywords an engine leaves unenforced in this schema, including the combinations it drops.

    Measured on JSONSchemaBench and the JSON-Schema-Test-Suite: outlines-core and xgrammar
    drop ``minLength``/``maxLength`` beside a ``pattern``, ignore ``required`` names that
    ``properties`` does not declare, check a ``format`` by shape at best (2024-02-31 passes
    as a date) and treat ``oneOf`` as ``anyOf``.
    """
    from synapse_cli.jobs.compile.normalize import walk

    out = {k for k in used if k not in enforced}
    if "oneOf" in used:
        out.add("oneOf")  # enforced as anyOf: exclusivity is not checked
    for _, node in walk(schema):
        if "pattern" in node and enforced is XGRAMMAR_ENFORCED:  # outlines: see rewrite.outlines_dropped
            out.update(k for k in ("minLength", "maxLength", "format") if k in node)
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in formats:
            out.add("format")
        props = node.get("properties") or {}
        if any(isinstance(r, str) and r not in props for r in node.get("required") or []):
            out.add("required")
        if enforced is XGRAMMAR_ENFORCED and node.get("type") != "integer":
            out.update(k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in node)
        if enforced is XGRAMMAR_ENFORCED and "type" not in node:
            # measured: without a type, xgrammar reads properties but not the string, array, number or
            # other object keywords ({"maxItems": 2} accepts [1, 2, 3]); beside those, not even properties
            typed = {k for k in node if k in _XGRAMMAR_TYPED}
            out.update(typed)
            if typed & {"patternProperties", "additionalProperties", "propertyNames"} and "properties" in node:
                out.add("properties")
        if enforced is XGRAMMAR_ENFORCED and "type" in node and any(c in node for c in ("anyOf", "oneOf", "allOf")):
            out.add("type")  # measured: {"type": "string", "anyOf": [...]} accepts 3
        if enforced is XGRAMMAR_ENFORCED and any(json.dumps(n)[1:-1] != n for n in props):
            out.add("properties")  # measured: a name that JSON escapes ("foo\"bar") is not matched
        ref = node.get("$ref")
        if enforced is XGRAMMAR_ENFORCED and isinstance(ref, str) and not _PLAIN_REF.fullmatch(ref):
            out.add("$ref")  # measured: a $defs name with a quote resolves to anything
    return out


_XGRAMMAR_TYPED = frozenset(
    "minLength maxLength pattern format minItems maxItems items prefixItems uniqueItems contains minimum maximum "
    "exclusiveMinimum exclusiveMaximum multipleOf patternProperties propertyNames additionalProperties required "
    "minProperties maxProperties".split()
)
_PLAIN_REF = re.compile(r"#(/\$defs/[A-Za-z0-9_.-]+)?")


def _xgrammar_refuses(schema: Any) -> str | None:
    """xgrammar does not intersect anyOf/oneOf/allOf with sibling keywords: the siblings are lost
    (measured: {"properties": {"r": {"type": "number"}}, "oneOf": [{"required": ["r"]}]}
    accepts {"r": null}). We call that unsupported rather than guess what is left."""
    from synapse_cli.jobs.compile.normalize import pointer_of, walk

    for path, node in walk(schema):
        for comb in ("anyOf", "oneOf", "allOf"):
            if comb in node and any(k in node for k in _SIBLING_SENSITIVE):
                return f"{comb} beside other keywords at #{pointer_of(path)}: xgrammar does not intersect them"
    return None


_SIBLING_SENSITIVE = frozenset(
    "properties required additionalProperties items prefixItems minItems maxItems minLength maxLength "
    "pattern minimum maximum exclusiveMinimum exclusiveMaximum minProperties maxProperties enum const".split()
)


def _gbnf_matcher(gbnf_text: str) -> Any:
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        lark = gbnf_to_lark(gbnf_text)
    except Exception as exc:
        raise EngineFailure(f"GBNF does not load: {one_line(exc, ERROR_CHARS)}") from None
    return _llg_matcher(lark)


_OUTLINES_VOCAB: Any = None


def outlines_regex(kind: str, payload: Any) -> tuple[str, list[str]]:
    """outlines' artefact and the keywords it leaves unenforced: the regex outlines-core writes for a
    schema (after our rewrites), or the pattern itself. Milliseconds; the index ``compile_artefact``
    then builds from it is what can take minutes."""
    ignored: list[str] = []
    if kind == "grammar":
        raise EngineFailure("outlines-core compiles regexes and JSON Schemas, not grammars")
    if kind != "json_schema":
        return payload, ignored
    from outlines_core.json_schema import build_regex_from_schema

    from synapse_cli.jobs.compile.normalize import keywords_used
    from synapse_cli.jobs.compile.rewrite import for_outlines, for_outlines_regex, outlines_dropped

    prepared = for_outlines(payload)  # same meaning, in the shapes outlines reads fully
    embedded, untranslated = for_outlines_regex(prepared)  # patterns and names as JSON text
    try:
        artefact = build_regex_from_schema(json.dumps(embedded), None)
    except BaseException as exc:  # pyo3 panics are BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise EngineFailure(one_line(exc, ERROR_CHARS)) from None
    dropped = outlines_dropped(prepared) | untranslated
    ignored = sorted(_ignored_by(sorted(keywords_used(prepared)), OUTLINES_ENFORCED, prepared, OUTLINES_FORMATS) | dropped)
    return artefact, ignored


def _outlines_index(regex: str) -> None:
    """Build outlines-core's DFA index over a byte vocabulary: what outlines does before decoding."""
    global _OUTLINES_VOCAB
    import outlines_core

    if _OUTLINES_VOCAB is None:
        vocab: dict[Any, list[int]] = {}
        for i in range(256):
            ch = chr(i)
            if ch.isprintable() and i < 128:
                vocab[ch] = [i]
        _OUTLINES_VOCAB = outlines_core.Vocabulary(256, vocab)
    try:
        outlines_core.Index(regex, _OUTLINES_VOCAB)
    except BaseException as exc:  # pyo3 panics
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise EngineFailure(f"outlines-core index: {one_line(exc, ERROR_CHARS)}") from None


def _py_regex(pattern: str) -> Any:
    try:
        return re.compile(pattern)
    except re.error:
        try:
            import regex  # type: ignore[import-not-found]

            return regex.compile(pattern)
        except ImportError:
            raise EngineFailure("regex is not valid for Python's re (install `regex` to check it)") from None
        except Exception as exc:
            raise EngineFailure(f"regex does not compile: {one_line(exc, ERROR_CHARS)}") from None


_XGR: Any = None
_XGR_COMPILER: Any = None


def _xgrammar() -> Any:
    global _XGR
    if _XGR is None:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import xgrammar
        except Exception as exc:
            raise EngineFailure(f"xgrammar unavailable: {type(exc).__name__}: {one_line(exc, 160)}") from None
        _XGR = xgrammar
    return _XGR


def _xgr_compiler() -> Any:
    global _XGR_COMPILER
    if _XGR_COMPILER is None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo([bytes([i]) for i in range(256)], xgr.VocabType.RAW, vocab_size=257, stop_token_ids=[256])
        _XGR_COMPILER = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    return _XGR_COMPILER


# -- verification ---------------------------------------------------------------------------


def check_artefact(engine: str, kind: str, artefact: str, candidates: list[list[str]]) -> list[bool]:
    """For each instance (a list of serialisations), whether the artefact accepts any of them."""
    if engine in ("llguidance", "llama.cpp"):
        matcher = _llg_matcher(artefact) if engine == "llguidance" else _gbnf_matcher(artefact)

        def accepts(text: str) -> bool:
            m = matcher.deep_copy()
            return bool(m.consume_tokens(list(text.encode("utf-8")))) and m.is_accepting()

    elif engine == "outlines":
        rx = _py_regex(artefact)

        def accepts(text: str) -> bool:
            return rx.fullmatch(text) is not None

    elif engine == "xgrammar":
        xgr = _xgrammar()
        if kind == "json_schema":
            grammar = xgr.Grammar.from_json_schema(artefact, strict_mode=False)
        elif kind == "regex":
            grammar = xgr.Grammar.from_regex(artefact)
        else:
            grammar = xgr.Grammar.from_ebnf(artefact)
        matcher = xgr.GrammarMatcher(_xgr_compiler().compile_grammar(grammar))

        def accepts(text: str) -> bool:
            matcher.reset()
            return bool(matcher.accept_string(text)) and matcher.is_completed()

    else:
        raise EngineFailure(f"unknown engine {engine!r}")
    verdicts = [any(accepts(c) for c in cands) for cands in candidates]
    if engine == "llama.cpp" and not all(verdicts):
        verdicts = _gbnf_second_opinion(artefact, candidates, verdicts)
    return verdicts


# The one private API here: xgrammar's character-level acceptance check (``xgrammar.testing``), used to
# overrule llguidance's rare greedy-lexing rejections. Without it the re-check is skipped (llguidance's
# verdict stands); tests/test_compile_gbnf.py fails when xgrammar is installed and the name is gone.
XGRAMMAR_PRIVATE = ("xgrammar.testing", "_is_grammar_accept_string")


def _gbnf_second_opinion(gbnf_text: str, candidates: list[list[str]], verdicts: list[bool]) -> list[bool]:
    """Re-check what llguidance rejected with xgrammar's character-level GBNF parser.

    llama.cpp matches GBNF character by character. llguidance turns GBNF into lexemes and
    lexes greedily, so on large recursive grammars it can reject a string the grammar
    contains (measured: xgrammar and a hand trace agree the string is in the language).
    It never accepts more, so a rejection it is alone in is overruled; without xgrammar
    llguidance's verdict stands.
    """
    try:
        xgr = _xgrammar()
        module, name = XGRAMMAR_PRIVATE
        _is_grammar_accept_string = getattr(__import__(module, fromlist=[name]), name)

        grammar = xgr.Grammar.from_ebnf(re.sub(r"::=\s*\|", '::= "" |', gbnf_text))
    except Exception:
        return verdicts
    out = []
    for ok, cands in zip(verdicts, candidates):
        if not ok:
            try:
                ok = any(_is_grammar_accept_string(grammar, c) for c in cands)
            except Exception:
                ok = False
        out.append(ok)
    return out
