"""The offline tiny-model factory and the safe loaders."""

import pytest
import torch

from rlhf_lm.configs import ModelArguments
from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.modeling import (
    build_tiny_model,
    ensure_special_tokens,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    lora_config_from_args,
    quantization_kwargs,
    train_tokenizer,
)

TEXTS = ["Describe the cat and the dog.\nthe cat is happy . a cold rain ."] * 20 + ["the fish was very sad ."] * 20


@pytest.mark.parametrize("arch, head", [("llama", "causal"), ("qwen2", "causal"), ("llama", "classifier"),
                                        ("bert", "classifier")])
def test_tiny_models_round_trip_through_from_pretrained(tmp_path, arch, head):
    path = build_tiny_model(tmp_path / arch, TEXTS, arch=arch, head=head, seed=3)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tok = load_tokenizer(str(path))
    built = build_tiny_model(tmp_path / "again", TEXTS, arch=arch, head=head, seed=3)
    loader = load_causal_lm if head == "causal" and arch != "bert" else load_sequence_classifier
    a, b = loader(str(path), dtype="float32"), loader(str(built), dtype="float32")
    batch = tok(["the cat is happy .", "a cold rain ."], return_tensors="pt", padding=True)
    with torch.no_grad():
        out_a, out_b = a(**batch).logits, b(**batch).logits
    assert torch.equal(out_a, out_b)  # same seed -> same weights, and loading reproduces them exactly
    assert a.config.model_type == arch


def test_decoder_tokenizer_round_trips_text_and_has_chat_template():
    tok = train_tokenizer(TEXTS)
    text = "Describe the cat and the dog.\nthe cat is happy ."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.pad_token != tok.eos_token
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi\nassistant:"


def test_encoder_tokenizer_has_no_eos_and_gets_sep_as_eos():
    tok = train_tokenizer(TEXTS, encoder=True)
    assert tok.eos_token is None and tok.sep_token == "[SEP]"
    ensure_special_tokens(tok, require_eos=True)
    assert tok.eos_token == "[SEP]"
    tok.sep_token = None
    tok.eos_token = None
    with pytest.raises(ConfigError, match="has no EOS token .* Set `eos_token`"):
        ensure_special_tokens(tok, source="my-encoder", require_eos=True)


def test_loaders_fail_clearly(tmp_path):
    with pytest.raises(ArtifactError, match="Policy model not found: ./missing"):
        load_causal_lm("./missing")
    path = build_tiny_model(tmp_path / "m", TEXTS)
    torch.save(load_causal_lm(str(path)).state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="allow_pickle_weights"):
        load_causal_lm(str(path))
    assert load_causal_lm(str(path), allow_pickle_weights=True) is not None


def test_lora_config_from_args():
    cfg = lora_config_from_args(ModelArguments(lora_r=4), task_type="SEQ_CLS", modules_to_save=["score"])
    assert cfg.r == 4 and cfg.target_modules == "all-linear" and cfg.modules_to_save == ["score"]
    assert lora_config_from_args(ModelArguments(use_peft=False)) is None


def test_qlora_fails_early_where_it_cannot_work():
    assert quantization_kwargs(ModelArguments()) == {}
    with pytest.raises(ConfigError, match="load_in_4bit needs use_peft: true"):
        quantization_kwargs(ModelArguments(load_in_4bit=True, use_peft=False))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"load_in_4bit \(QLoRA\) needs a CUDA GPU"):
            quantization_kwargs(ModelArguments(load_in_4bit=True))
