"""clo.translate on tiny, randomly initialised M2M100 and NLLB models built offline.

The models generate garbage, so these tests check the mechanics through the real transformers
code path (tokenizers, generate, decoding): order, layout, language tokens, cache, errors. The only
stand-in is a counting wrapper around ``model.generate`` that still calls the real method.
"""

import io
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

from clo.segments import join_segments, split_segments
from clo.translate import (
    LANGUAGES,
    TranslationCache,
    Translator,
    detect_family,
    language_code,
    translate_rows,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a short test sentence!",
    "Install the package, then run it: 0123456789 (x) [y] {z}; ok? yes.",
    "Some more English words: apple banana cherry garden house river mountain.",
]

DOC = (
    "Here is how to do it:\n"
    "\n"
    "1. Install the package.\n"
    "2. Run it:\n"
    "\n"
    "```python\n"
    "print('hello world')  # not translated\n"
    "```\n"
    "\n"
    "- First point\n"
    "* Second point  \n"
    "\n"
    "The output:\n"
    "\n"
    "    indented code stays\n"
    "\n"
    "---\n"
    "Thanks!"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Intra-op threads only add synchronisation on tensors this small; on a busy 2-core machine the
    # OpenMP workers' spin-waits cost ~15 ms per attention call, 100x the work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_model(vocab_size: int, tokenizer, seed: int) -> M2M100ForConditionalGeneration:
    """A random M2M100 whose outputs differ between inputs, made of the tokenizer's ordinary tokens.

    Large weights (init_std=1) make the output depend on the input; zeroing the (tied) embeddings
    of special and language tokens keeps their logits at 0, below the best ordinary token, so
    the outputs are text rather than "<unk>" and language tokens.
    """
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(_tiny_config(vocab_size))
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        keep = torch.zeros(vocab_size, dtype=torch.bool)
        keep[ordinary] = True
        weight[~keep] = 0
    return model


def _tiny_config(vocab_size: int) -> M2M100Config:
    return M2M100Config(
        init_std=1.0,
        vocab_size=vocab_size,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="session")
def m2m_dir(tmp_path_factory):
    """A saved tiny M2M100 model + M2M100Tokenizer (a sentencepiece BPE model trained on CORPUS)."""
    import sentencepiece as spm
    from transformers import M2M100Tokenizer

    d = tmp_path_factory.mktemp("m2m100")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10),
        model_writer=buf,
        vocab_size=60,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (d / "sentencepiece.bpe.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(d / "sentencepiece.bpe.model"))
    # fairseq layout of vocab.json: <s> <pad> </s> <unk>, then the sentencepiece pieces.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    tok = M2M100Tokenizer(str(d / "vocab.json"), str(d / "sentencepiece.bpe.model"))
    # Language tokens sit after the vocabulary (and 8 "madeup words" after them), outside len(tok).
    model = _tiny_model(max(tok.lang_code_to_id.values()) + 1 + 8, tok, seed=2)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def nllb_dir(tmp_path_factory):
    """A saved tiny NLLB: M2M100 weights (model_type "m2m_100", as nllb-200) + a character-level NllbTokenizer."""
    d = tmp_path_factory.mktemp("nllb")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4}
    for c in sorted(set("".join(CORPUS)) - {" "}):
        vocab[c] = len(vocab)
    tok = NllbTokenizer(vocab=vocab, merges=[])
    model = _tiny_model(len(tok), tok, seed=2)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(params=["m2m100", "nllb"])
def model_dir(request):
    return request.getfixturevalue({"m2m100": "m2m_dir", "nllb": "nllb_dir"}[request.param])


def make(path, **kw) -> Translator:
    kw = {"tgt_lang": "de", "max_new_tokens": 6, "device": "cpu", "progress": False, **kw}
    return Translator(str(path), **kw)


class GenerateSpy:
    """Counts ``model.generate`` calls and keeps their inputs and outputs; the real method runs."""

    def __init__(self, monkeypatch, model):
        self.calls = []
        real = model.generate

        def generate(**kwargs):
            out = real(**kwargs)
            self.calls.append((kwargs, out))
            return out

        monkeypatch.setattr(model, "generate", generate)


# --------------------------------------------------------------------------- languages, family


def test_language_codes():
    assert language_code("de", "nllb") == "deu_Latn"
    assert language_code("de", "m2m100") == "de"
    assert language_code("zh", "nllb") == "zho_Hans"
    assert language_code("sw", "nllb") == "swh_Latn"
    assert language_code("deu_Latn", "nllb") == "deu_Latn"  # the family's own codes pass through
    assert language_code("ast", "m2m100") == "ast"
    with pytest.raises(ValueError, match=r"'xx'.*supported: .*\bde\b"):
        language_code("xx", "nllb")
    with pytest.raises(ValueError, match="'deu_Latn'"):
        language_code("deu_Latn", "m2m100")


def test_language_table_matches_transformers():
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES as M2M
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES as NLLB

    assert len(LANGUAGES) >= 20
    for iso, (m2m, nllb) in LANGUAGES.items():
        assert m2m in M2M["m2m100"], iso
        assert nllb in NLLB, iso


def test_family_detection(m2m_dir, nllb_dir):
    assert make(m2m_dir).family == "m2m100"
    nllb = make(nllb_dir)
    assert nllb.model.config.model_type == "m2m_100"  # as facebook/nllb-200-*: the tokenizer decides
    assert nllb.family == "nllb"
    assert (nllb.src_code, nllb.tgt_code) == ("eng_Latn", "deu_Latn")
    # A generic tokenizer class (a bare tokenizer.json) is probed for the family's language tokens.
    generic = transformers.PreTrainedTokenizerFast(tokenizer_file=str(nllb_dir / "tokenizer.json"))
    assert detect_family(nllb.model.config, generic) == "nllb"
    with pytest.raises(ValueError, match="model_type"):
        detect_family(transformers.T5Config(), generic)
    # An explicit family overrides detection (here wrongly: NLLB's tokenizer has no "__en__").
    with pytest.raises(ValueError, match="__en__"):
        make(nllb_dir, family="m2m100")


def test_unknown_language_raises(m2m_dir):
    with pytest.raises(ValueError, match="'xx'"):
        make(m2m_dir, tgt_lang="xx")


# --------------------------------------------------------------------------- segments

LAYOUTS = [
    DOC,
    "",
    "\n\n",
    "plain",
    "trailing newline\n",
    "windows\r\nline ends\r\n",
    "| Name | Age |\n|---|---:|\n| Bob \\| Jr | 3 |",
    "> quoted\n## Heading\n- [x] done\n~~~\nunclosed fence\n",
    "Steps:\n\n1. Install:\n\n    pip install foo\n\n2. Code:\n\n       x = 1\n",
]


@pytest.mark.parametrize("text", LAYOUTS)
def test_join_segments_restores_text(text):
    assert join_segments(split_segments(text)) == text


def test_split_segments_keeps_layout_untranslated():
    segs = split_segments(DOC)
    prose = [s for s, tr in segs if tr]
    assert prose == [
        "Here is how to do it:",
        "Install the package.",
        "Run it:",
        "First point",
        "Second point",
        "The output:",
        "Thanks!",
    ]
    kept = "".join(s for s, tr in segs if not tr)
    assert "```python\nprint('hello world')  # not translated\n```" in kept
    assert "\n    indented code stays\n" in kept
    assert "1. " in kept and "\n- " in kept and "\n* " in kept and "\n---\n" in kept
    # Inside a list, 4 columns is a paragraph (Markdown); code needs 4 past the item's text.
    list_segs = split_segments("1. Install:\n\n    pip install foo\n\n       x = 1\n")
    assert [s for s, tr in list_segs if tr] == ["Install:", "pip install foo"]
    # Table cells are translated one by one; pipes and the separator row are kept.
    table = split_segments("| Name | Age |\n|---|---:|")
    assert table == [("| ", False), ("Name", True), (" | ", False), ("Age", True), (" |\n|---|---:|", False)]
    assert split_segments("`only code`") == [("`only code`", False)]


# --------------------------------------------------------------------------- translating


def test_order_and_length_sorting(model_dir, monkeypatch):
    texts = ["Hello world.", "The quick brown fox jumps over the lazy dog today.", "ok", "Run it: yes, then no."]
    tr = make(model_dir, batch_size=len(texts))
    spy = GenerateSpy(monkeypatch, tr.model)
    out = tr.translate(texts)
    assert len(out) == len(texts) and all(isinstance(t, str) for t in out)
    assert len(set(out)) >= 3  # the fixture models answer different inputs differently
    # One batch, longest first: whatever order the texts come in, the batch is the same, so the
    # translations must follow their texts.
    ((kwargs, _),) = spy.calls
    lengths = kwargs["attention_mask"].sum(1).tolist()
    assert lengths == sorted(lengths, reverse=True)
    assert tr.translate(texts[::-1]) == out[::-1]
    # Batches of one, sorted longest first: each result still lands at its own text's index.
    tr.batch_size = 1
    one_by_one = [tr.translate([t])[0] for t in texts]
    assert tr.translate(texts) == one_by_one


def test_language_tokens(model_dir, monkeypatch):
    tr = make(model_dir, tgt_lang="sw", batch_size=2)
    tok = tr.tokenizer
    if tr.family == "m2m100":
        assert (tr.src_token_id, tr.tgt_token_id) == (tok.get_lang_id("en"), tok.get_lang_id("sw"))
        tgt_token = "__sw__"
    else:
        assert tr.tgt_token_id == tok.convert_tokens_to_ids("swh_Latn")
        tgt_token = "swh_Latn"
    spy = GenerateSpy(monkeypatch, tr.model)
    out = tr.translate(["Hello world.", "The lazy dog.", "Yes!"])
    for kwargs, generated in spy.calls:
        assert (kwargs["input_ids"][:, 0] == tr.src_token_id).all()  # source marked as English
        assert kwargs["forced_bos_token_id"] == tr.tgt_token_id
        # generated: [B, 1 + new]: the decoder start token, then the forced target language token.
        assert (generated[:, 0] == tr.model.config.decoder_start_token_id).all()
        assert (generated[:, 1] == tr.tgt_token_id).all()
    # The forced language token is not part of the text (M2M100Tokenizer in transformers 5 does
    # not always treat it as special, so skip_special_tokens alone would leave it in).
    assert all(tgt_token not in t for t in out)


def test_blank_texts_skip_the_model(m2m_dir, monkeypatch):
    tr = make(m2m_dir)
    spy = GenerateSpy(monkeypatch, tr.model)
    assert tr.translate(["", "  ", "\n\t"]) == ["", "  ", "\n\t"]
    assert spy.calls == []
    out = tr.translate(["", "Hello world.", " ", "Hello world."])  # a duplicate is translated once
    assert out[0] == "" and out[2] == " " and out[1] == out[3]
    assert len(spy.calls) == 1 and spy.calls[0][0]["input_ids"].shape[0] == 1


def test_translate_documents_keeps_layout(model_dir):
    tr = make(model_dir, batch_size=4)
    (out,) = tr.translate_documents([DOC])
    segs = split_segments(DOC)
    pieces = tr.translate([s for s, t in segs if t])
    expected = iter(" ".join(p.splitlines()) for p in pieces)
    assert out == join_segments((next(expected) if t else s, t) for s, t in segs)
    assert "```python\nprint('hello world')  # not translated\n```\n\n- " in out
    assert "\n\n    indented code stays\n\n---\n" in out
    assert out.count("\n") == DOC.count("\n")
    assert [line[:3] for line in out.split("\n")[2:4]] == ["1. ", "2. "]


# --------------------------------------------------------------------------- rows and cache

ROWS = [
    {"id": "a", "prompt_en": "Say hello.", "response_en": "Hello world!\n\n- First point\n- Second point"},
    {"id": "b", "prompt_en": "Write code.", "response_en": "Sure:\n```\nx = 1\n```\nDone.", "extra": 7},
    {"id": "c", "prompt_en": "Say hello.", "response_en": ""},
]


def test_translate_rows_and_cache(model_dir, tmp_path, monkeypatch):
    cache_path = tmp_path / "cache" / "de.jsonl"
    first = make(model_dir, batch_size=3)
    spy1 = GenerateSpy(monkeypatch, first.model)
    rows = translate_rows(ROWS, first, cache_path=cache_path)
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[1]["extra"] == 7
    assert all({"prompt_tgt", "response_tgt"} <= r.keys() for r in rows)
    assert "prompt_tgt" not in ROWS[0]  # the input rows are not modified
    assert rows[2]["response_tgt"] == "" and rows[0]["prompt_tgt"] == rows[2]["prompt_tgt"]
    assert "\n```\nx = 1\n```\n" in rows[1]["response_tgt"]
    assert rows[0]["response_tgt"].count("\n- ") == 2
    # Unique segments: Say hello. / Write code. / Hello world! / First point / Second point / Sure: / Done.
    n_unique = 7
    assert sum(call[0]["input_ids"].shape[0] for call in spy1.calls) == n_unique
    assert len(spy1.calls) == 3  # all rows' segments in one translate call: ceil(7 / 3) batches
    assert len(cache_path.read_text().splitlines()) == n_unique

    second = make(model_dir, batch_size=3)
    spy2 = GenerateSpy(monkeypatch, second.model)
    assert translate_rows(ROWS, second, cache_path=cache_path) == rows
    assert spy2.calls == []


def test_cache_recovers_from_truncated_last_line(m2m_dir, tmp_path, monkeypatch, caplog):
    cache_path = tmp_path / "de.jsonl"
    # Batches of one: a segment's translation does not depend on its batch-mates' padding.
    rows = translate_rows(ROWS, make(m2m_dir, batch_size=1), cache_path=cache_path)
    data = cache_path.read_bytes()
    cache_path.write_bytes(data[:-10])  # killed mid-write: the last entry cut short, no newline

    tr = make(m2m_dir, batch_size=1)
    spy = GenerateSpy(monkeypatch, tr.model)
    with caplog.at_level("WARNING", logger="clo.translate"):
        again = translate_rows(ROWS, tr, cache_path=cache_path)
    assert again == rows
    assert len(spy.calls) == 1  # only the lost segment
    assert "1 corrupt line" in caplog.text

    cache = TranslationCache(cache_path)  # the new entry went on a line of its own
    assert cache.corrupt_lines == 1 and len(cache) == 7
    assert cache_path.read_bytes().startswith(data[:-10] + b"\n")
    cache.close()


def test_cache_keys_separate_languages(m2m_dir, tmp_path):
    de = make(m2m_dir, tgt_lang="de")
    fr = make(m2m_dir, tgt_lang="fr")
    assert de.cache_key("Hello") != fr.cache_key("Hello")
    assert de.cache_key("Hello") == make(m2m_dir, tgt_lang="de").cache_key("Hello")
    assert de.cache_key("Hello") != make(m2m_dir, tgt_lang="de", num_beams=2).cache_key("Hello")


def test_loaded_model_needs_tokenizer(m2m_dir):
    tr = make(m2m_dir)
    with pytest.raises(ValueError, match="tokenizer"):
        Translator(tr.model, tgt_lang="de")
    again = Translator(tr.model, tr.tokenizer, tgt_lang="de", max_new_tokens=6, progress=False)
    assert again.translate(["Hello world."]) == tr.translate(["Hello world."])


def test_clo_prepare_end_to_end(nllb_dir, tmp_path, capsys):
    """`clo prepare` on a local SFT file: a bad row is counted, the quads file loads for training,
    and a second run is served from the cache."""
    from clo.cli import main
    from clo.data import load_quads

    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue is a colour."}) + "\n"
                   + json.dumps({"instruction": "", "output": "orphan"}) + "\n"
                   + json.dumps({"prompt": "Say hi.", "response": "Hi!\n\n```\nprint('hi')\n```"}) + "\n")
    out = tmp_path / "quads.jsonl"
    args = ["prepare", "--source", str(src), "--translator", str(nllb_dir), "--target-lang", "de",
            "--out", str(out), "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args) == 0
    quads, report = load_quads(out)
    assert [q.prompt_en for q in quads] == ["Name a colour.", "Say hi."] and report.kept == 2
    assert "```\nprint('hi')\n```" in quads[1].response_tgt  # code left untranslated
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first
    capsys.readouterr()
    assert main([*args[:5], "--target-lang", "xx", "--out", str(out)]) == 2  # a UserError: one line, exit code 2
    assert capsys.readouterr().err.startswith("clo prepare: error: --target-lang 'xx' is not a supported")
