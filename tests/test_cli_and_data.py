"""The `infinitevl` command (the quickstart's main job), the byte tokenizer and easy-VQA."""

import pytest

from infinitevl_jax.cli import main
from infinitevl_jax.data.easy_vqa import load_easy_vqa
from infinitevl_jax.data.tokenizer import ByteTokenizer, chat_prompt


def test_byte_tokenizer_round_trip_with_special_tokens():
    tok = ByteTokenizer()
    text = chat_prompt("what color is the shape? ünïcödé")
    ids = tok.encode(text)
    assert ids[0] == tok.special_ids["<|im_start|>"] and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode("<|image_pad|>a") == [tok.special_ids["<|image_pad|>"], ord("a")]


def test_easy_vqa_test_split_is_real_data():
    samples = load_easy_vqa("test")
    assert len(samples) > 1000
    first = samples[0]
    assert first.image_path.endswith(".png") and first.question.endswith("?") and first.answer
    with pytest.raises(ValueError, match="split"):
        load_easy_vqa("validation")


def test_demo_main_job_streams_like_full_forward(capsys):
    assert main(["demo", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "easy-VQA test sample 0" in out and "max |logit difference|" in out and "greedy continuation" in out
    assert "grid (t, h, w) = (1, 4, 4), 4 image tokens" in out  # the 64x64 PNG resized to 56x56


def test_info_reports_spec_parameter_count(capsys):
    assert main(["info", "--config", "infinitevl_4b"]) == 0
    out = capsys.readouterr().out
    # spec section 1.3: LM 3.740 B, ViT + merger 0.669 B, 4.408 B in all (tied head)
    assert "parameters: 4.408 B = language model 3.740 B + vision tower 0.669 B" in out and "constant" in out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["info", "--config", "tiny", "--config.model.hiden_size=3"]) == 2
    assert "no config field 'hiden_size'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--bogus"])
