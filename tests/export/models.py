"""The tiny models the GGUF tests export: one base of each dense architecture GGUF export writes (the demo's
builder) and of each mixture-of-experts family (transformers' own classes with the demo's tokenizer), each
with a random-B `all-linear` adapter made by PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qmerge.demo.tiny import TinySpec, away_from_identity, build_base, build_tokenizer
from tests.helpers import TINY_TEXT, random_adapter
from tests.test_moe_params import FAMILIES as MOE_PARAMS

# (architecture, tied embeddings) as TinySpec names them
DENSE = (
    ("llama", False),
    ("mistral", False),
    ("qwen2", True),
    ("qwen3", True),
    ("gemma", True),
    ("gemma2", True),
    ("gemma3", True),
    ("phi3", False),
    ("granite", False),
    ("smollm3", True),
    ("olmo2", False),
)


def tiny_dense(root: Path, arch: str, tied: bool) -> tuple[Path, Path]:
    """A tiny base of `arch` and its adapter. The GGUF's general.name comes from the adapter's directory
    name, hence "adapter": llama.cpp gives models named like phi3 special handling of tokens
    (<|endoftext|>, ...) that the tiny vocabulary lacks."""
    layers = 4 if arch == "smollm3" else 2  # its 4th layer is the one without RoPE
    spec = TinySpec(arch=arch, tie_word_embeddings=tied, num_key_value_heads=2, num_hidden_layers=layers)
    base = build_base(root / "base", spec)
    return base, random_adapter(
        base, root / "adapter", seed=7, r=8, lora_alpha=16, target_modules="all-linear"
    )


# each mixture-of-experts family as its checkpoints are: what llama.cpp fixes (renormalized experts, MHA for
# OLMoE's Q/K norms, an output layer of its own) set as the real models set it
MOE = {
    "qwen3_moe": dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=128,
        tie_word_embeddings=False,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=4, tie_word_embeddings=False),
}
MOE["gpt_oss"] = dict(  # experts stored fused, as gpt-oss checkpoints store them
    intermediate_size=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=8,
)
MOE["llama4_text"] = dict(  # 4 layers: MoE in every 2nd, no RoPE in the 4th
    num_hidden_layers=4,
    intermediate_size_mlp=128,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
)
MOE["deepseek_v3"] = {  # a dense first layer, latent attention, a shared expert; routing as V3's config says
    **MOE_PARAMS["deepseek_v3"],
    "scoring_func": "sigmoid",  # (transformers' class runs sigmoid whatever it says)
}
# the other families GGUF export writes that the demo's builder does not make
FAMILIES = {
    **MOE,
    "glm4": dict(tie_word_embeddings=False),
    # 4 layers: the 4th is global, without RoPE; a window shorter than the test's 20 tokens; rotary_pct as
    # Command R7B's config.json has it (llama.cpp's converter reads it)
    "cohere2": dict(num_hidden_layers=4, sliding_window=8, rotary_pct=1.0, logit_scale=0.5),
    # its YaRN as Ministral 3 has it, the original context within the test's 20 tokens so that the
    # attention temperature (llama_4_scaling_beta) changes with the position
    "ministral3": dict(
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=1e6,
            factor=16.0,
            original_max_position_embeddings=8,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale_all_dim=1.0,
            mscale=1.0,
            llama_4_scaling_beta=0.1,
        ),
    ),
    # a Mamba-2 SSM beside attention in each layer; every multiplier away from 1, so that each one folded
    # into the weights (or not) shows
    "falcon_h1": dict(
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        tie_word_embeddings=False,
        attention_in_multiplier=0.9,
        attention_out_multiplier=1.1,
        key_multiplier=0.8,
        embedding_multiplier=1.3,
        lm_head_multiplier=0.7,
        mlp_multipliers=[1.2, 0.9],
        ssm_in_multiplier=1.05,
        ssm_out_multiplier=0.95,
        ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.15],
    ),
}
# Gemma 3n as llama.cpp's gemma3n fixes it (E2B/E4B's AltUp, LAuReL rank, per-layer input width, sparsity
# in the first 10 layers, KV shared from layer 20 on, reused from layers 18 and 19), at width 64; the
# per-layer embedding shorter than the vocabulary, as the releases' (the GGUF pads it)
FAMILIES["gemma3n_text"] = dict(
    num_hidden_layers=22,
    num_kv_shared_layers=2,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 4
    + ["sliding_attention", "full_attention"],
    laurel_rank=64,
    hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=256,
    activation_sparsity_pattern=[0.95] * 10 + [0.0] * 12,
    sliding_window=8,
    intermediate_size=2048,  # (see test_gguf_gemma3n: llama.cpp's sparsity cut-off differs from it by 1/2n)
)
MOE["jamba"] = dict(  # Mamba layers and attention layers (1, 3), experts in every other layer (1, 3)
    num_hidden_layers=4,
    num_experts=4,
    num_experts_per_tok=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    attn_layer_period=2,
    attn_layer_offset=1,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=8,
    use_mamba_kernels=False,
    tie_word_embeddings=False,
)
FAMILIES["jamba"] = MOE["jamba"]
MOE["qwen3_next"] = FAMILIES["qwen3_next"] = dict(  # gated delta-net layers 0 and 2, full attention 1 and 3
    num_hidden_layers=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    norm_topk_prob=True,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    full_attention_interval=2,
    tie_word_embeddings=False,
)
# Granite 4.0-H: Mamba-2 layers 0 and 2 (twice the width, as llama.cpp runs them), attention (no RoPE) in
# layer 1, experts beside a shared MLP twice their size, Granite's four scales away from 1; layer_types as
# its releases name them. Bamba: the same mixer, RoPE on half of each head, a dense feed-forward.
MAMBA2 = dict(
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_expand=2, mamba_d_conv=4
)
MOE["granitemoehybrid"] = FAMILIES["granitemoehybrid"] = dict(
    MAMBA2,
    num_hidden_layers=3,
    layer_types=["mamba", "attention", "mamba"],
    intermediate_size=64,
    shared_intermediate_size=128,  # (rows of whole 4-bit blocks: bitsandbytes on CPU, the reference)
    num_local_experts=4,
    num_experts_per_tok=2,
    embedding_multiplier=1.3,
    attention_multiplier=0.2,
    residual_multiplier=0.8,
    logits_scaling=1.5,
    tie_word_embeddings=False,
)
FAMILIES["bamba"] = dict(MAMBA2, num_hidden_layers=3, attn_layer_indices=[1], tie_word_embeddings=False)
# Granite 3.x's MoE, experts stored as Granite 4.0-H's, with (granitemoeshared) and without a shared MLP
GRANITE_SCALES = {
    k: FAMILIES["granitemoehybrid"][k] for k in ("embedding_multiplier", "attention_multiplier")
}
GRANITE_SCALES |= {k: FAMILIES["granitemoehybrid"][k] for k in ("residual_multiplier", "logits_scaling")}
MOE["granitemoe"] = FAMILIES["granitemoe"] = dict(
    GRANITE_SCALES,
    intermediate_size=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
MOE["granitemoeshared"] = FAMILIES["granitemoeshared"] = dict(
    FAMILIES["granitemoe"], shared_intermediate_size=128
)
# GPT-NeoX (Pythia) with RoPE on a quarter of each head, attention and MLP in parallel; GPT-2 as released
FAMILIES["gpt_neox"] = dict(tie_word_embeddings=False)
FAMILIES["gpt2"] = dict(tie_word_embeddings=True)
# Phi-2: RoPE on half of each head, attention and MLP in parallel, multi-head attention, 4 x hidden (as released)
FAMILIES["phi"] = dict(num_key_value_heads=4, intermediate_size=256, tie_word_embeddings=False)
# StableLM 2 1.6B's layout (Q/K/V biases; 12B's per-head Q/K norms: test_gguf_families); StarCoder 2's biases
FAMILIES["stablelm"] = dict(use_qkv_bias=True, tie_word_embeddings=False)
FAMILIES["starcoder2"] = dict(tie_word_embeddings=False)
# Qwen3.5's language model: delta-net layers 0-2, gated full attention in layer 3, twice the value heads
FAMILIES["qwen3_5_text"] = dict(
    num_hidden_layers=4,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    head_dim=64,  # 16 rotated dimensions: 8 frequencies in M-RoPE sections of 3, 3, 2
    rope_parameters=dict(
        rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25, mrope_section=[3, 3, 2]
    ),
    tie_word_embeddings=False,
)
# PEFT's all-linear takes Mamba's out_proj, which PEFT then refuses: the other linears named
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {
    "falcon_h1": [*ATTENTION_MLP, "in_proj"],
    "jamba": [*ATTENTION_MLP, "in_proj", "x_proj", "dt_proj"],
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GGUF_ARCH = {
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "mixtral": "llama",
    "olmoe": "olmoe",
    "glm4": "glm4",
    "cohere2": "cohere2",
    "ministral3": "mistral3",
    "gpt_oss": "gpt-oss",
    "llama4_text": "llama4",
    "deepseek_v3": "deepseek2",
    "falcon_h1": "falcon-h1",
    "jamba": "jamba",
    "qwen3_next": "qwen3next",
    "granitemoehybrid": "granitehybrid",
    "bamba": "granitehybrid",
    "granitemoe": "granitemoe",
    "granitemoeshared": "granitemoe",
    "gpt_neox": "gptneox",
    "gpt2": "gpt2",
    "phi": "phi2",
    "stablelm": "stablelm",
    "qwen3_5_text": "qwen35",
    "starcoder2": "starcoder2",
    "gemma3n_text": "gemma3n",
}


def tiny_family(root: Path, model_type: str, **config) -> tuple[Path, Path]:
    """A tiny base of `model_type` (transformers' class, FAMILIES' config) with the demo's tokenizer (llama.cpp
    needs a vocabulary), norms away from 1 and biases non-zero so that a wrong mapping shows, routers far
    from uniform, saved in bf16; and an `all-linear` adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = root / "base"
    tok = build_tokenizer(base, 320)
    extra = {**TINY_TEXT, **FAMILIES[model_type], **config}
    cfg = AutoConfig.for_model(
        model_type, **{**extra, "vocab_size": len(tok)}, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    away_from_identity(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):  # routers far from uniform: experts matter
                p.normal_(std=0.5)
    model.to(torch.bfloat16).save_pretrained(str(base))
    if model_type == "gemma3n_text":
        _shared_kv_as_released(base, cfg)
    _config_as_released(base, model_type)
    # PEFT's all-linear adapts the fused experts as parameters except on Qwen2-MoE and gpt-oss: named there
    experts = {"target_parameters": EXPERTS} if model_type in ("qwen2_moe", "gpt_oss") else {}
    if model_type in ("llama4_text", "jamba"):
        experts = {"target_parameters": [e.replace("mlp.", "feed_forward.") for e in EXPERTS]}
    if (
        model_type.startswith("granitemoe") and cfg.num_local_experts
    ):  # (stored as input_linear, output_linear)
        experts = {"target_parameters": [e.replace("mlp.", "block_sparse_moe.") for e in EXPERTS]}
    targets = TARGETS.get(model_type, "all-linear")
    adapter = random_adapter(
        base, root / "adapter", seed=7, r=8, lora_alpha=16, target_modules=targets, **experts
    )
    return base, adapter


def _config_as_released(base: Path, model_type: str) -> None:
    """config.json with the keys the releases write where transformers 5 saves them otherwise (it reads both;
    llama.cpp's converter reads the released ones): Granite 4.0-H's layer types, GPT-2's n_ctx, Pythia's
    rotary_pct (which the converter still cannot read: transformers 5 moves it into rope_parameters)."""
    config = json.loads((base / "config.json").read_text())
    if model_type == "granitemoehybrid":
        released = {"full_attention": "attention", "linear_attention": "mamba"}
        config["layer_types"] = [released[t] for t in config["layer_types"]]
    elif model_type == "gpt_neox":
        config["rotary_pct"] = config["rope_parameters"]["partial_rotary_factor"]
    elif model_type == "gpt2":
        config["n_ctx"] = config["n_positions"]
    else:
        return
    (base / "config.json").write_text(json.dumps(config, indent=2))


def _shared_kv_as_released(base: Path, cfg) -> None:
    """Gemma 3n's checkpoints as released: keys, values and their norm stored for the layers that reuse
    another's (transformers 5 builds them without, and skips them at load; llama.cpp's gemma3n needs them)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(base / "model.safetensors")
    kv = cfg.num_key_value_heads * cfg.head_dim
    torch.manual_seed(1)
    for i in range(cfg.num_hidden_layers - cfg.num_kv_shared_layers, cfg.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn"
        tensors[f"{attn}.k_proj.weight"] = (0.05 * torch.randn(kv, cfg.hidden_size)).to(torch.bfloat16)
        tensors[f"{attn}.v_proj.weight"] = (0.05 * torch.randn(kv, cfg.hidden_size)).to(torch.bfloat16)
        tensors[f"{attn}.k_norm.weight"] = (1 + 0.1 * torch.randn(cfg.head_dim)).to(torch.bfloat16)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})


# vision-language models whose language model GGUF export writes (tests/test_vlm.py's tiny configs)
VLM = {
    "gemma3_vlm": "gemma3",
    "llava": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "mistral3_vlm": "mistral3",
    "llama4_vlm": "llama4",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl_moe",
    "idefics3": "idefics3",
    "qwen3_5_vlm": "qwen3_5",
}
VLM_GGUF_ARCH = {
    "gemma3_vlm": "gemma3",
    "llava": "llama",
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen2vl",
    "mistral3_vlm": "mistral3",
    "llama4_vlm": "llama4",
    "qwen3_vl": "qwen3vl",
    "qwen3_vl_moe": "qwen3vlmoe",
    "idefics3": "llama",
    "qwen3_5_vlm": "qwen35",
}


def _llama4_vlm():
    import transformers as tf

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    vision |= dict(image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64)
    vision |= dict(projector_output_dim=64, pixel_shuffle_ratio=0.5)
    text = dict(TINY_TEXT, **MOE["llama4_text"])
    return tf.Llama4ForConditionalGeneration(
        tf.Llama4Config(text_config=text, vision_config=vision, image_token_index=300)
    )


# the vision-language models whose projector (mmproj) GGUF export writes, with the image processor settings
# their releases ship (CLIP's normalisation for Qwen, SigLIP's for Gemma 3)
PROJECTORS = {
    "gemma3_vlm": dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, image_seq_length=4),
    "qwen2_vl": dict(
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]
    ),
}
PROJECTORS["qwen2_5_vl"] = PROJECTORS["qwen2_vl"]
PROJECTORS["qwen3_vl"] = PROJECTORS["llama4_vlm"] = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
PROJECTORS["qwen3_vl_moe"] = PROJECTORS["qwen3_vl"]
PROJECTORS["mistral3_vlm"] = PROJECTORS["qwen2_vl"]
PROJECTORS["idefics3"] = dict(  # SmolVLM's (images resized to the longest edge: the tiny image's size)
    image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"longest_edge": 28}, max_image_size={"longest_edge": 28}
)
# the linear layers of vision towers and projectors, as `all-linear` adapts them
VISION_LINEAR = (
    r"(visual|vision_tower|vision_model).*\."
    r"(attn\.qkv|attn\.proj|self_attn\.\w+_proj|attention\.\w+_proj|feed_forward\.\w+_proj|"
    r"mlp\.(fc1|fc2|linear_fc\d|\w+_proj|0|2))"
)


def _qwen3_5_vlm():
    """Qwen3.5 as released (Qwen3_5ForConditionalGeneration), its language model the text family's."""
    import transformers as tf

    text = dict(TINY_TEXT, **FAMILIES["qwen3_5_text"], max_position_embeddings=256)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    vision |= dict(num_position_embeddings=64)
    return tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision))


def _qwen3_vl_moe():
    """Qwen3-VL's tiny configuration (tests/test_vlm.py) with four experts in every layer."""
    import transformers as tf

    from tests.test_vlm import T

    rope = {"rope_type": "default", "mrope_section": [2, 2, 4], "mrope_interleaved": True}
    text = dict(T, rope_scaling=rope, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    vision |= dict(deepstack_visual_indexes=[1], num_position_embeddings=64)
    return tf.Qwen3VLMoeForConditionalGeneration(tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision))


def tiny_vlm(root: Path, name: str, vision: bool = False) -> tuple[Path, Path]:
    """A tiny vision-language base (tests/test_vlm.py's config for VLM[name]) with the demo's tokenizer,
    norms away from 1 and biases non-zero, in bf16; and a random-B adapter on its language model's linear
    layers. With `vision`, the adapter also changes the vision tower's linear layers, the base has its
    image processor's settings, the vision tower a width of 64, Qwen's three blocks (llama.cpp's converter
    numbers the merger's layers within the block range) and Gemma 3's checkpoint the released layout
    (`vision_tower.vision_model.*`, which transformers 5 saves without `vision_model.`)."""

    from tests.test_vlm import _model

    base = root / "base"
    # Pixtral's tokenizers have the token its images break rows with (llama.cpp's converter asks for it)
    build_tokenizer(base, 320, extra_special=("[IMG_BREAK]",) if vision and name == "mistral3_vlm" else ())
    torch.manual_seed(0)
    builders = {"llama4_vlm": _llama4_vlm, "qwen3_vl_moe": _qwen3_vl_moe, "qwen3_5_vlm": _qwen3_5_vlm}
    model = builders[name]() if name in builders else _model(VLM[name])
    if vision:
        _vision_shape(model.config.vision_config, name)
        if name == "idefics3":  # SmolVLM's connector shuffles 2 x 2 patches into one token
            model.config.scale_factor = 2
        torch.manual_seed(0)
        model = type(model)(model.config)
    if name == "gemma3_vlm":  # as Gemma 3 4B/12B: attention scaled by head_dim (llama.cpp's gemma3 fixes it)
        model.config.text_config.query_pre_attn_scalar = model.config.text_config.head_dim
    if name.startswith("qwen2"):  # llama.cpp's qwen2vl reads no RMSNorm epsilon (it uses 0): see test
        model.config.text_config.rms_norm_eps = 1e-12
    away_from_identity(model)  # (Gemma's norms, 1 + weight, as far from theirs)
    if vision:  # Gemma 3 starts its projector at zero: an image would give zeros whatever the file holds
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "multi_modal_projector" in n and not p.any():
                    p.normal_(std=0.2)
    model.to(torch.bfloat16).save_pretrained(str(base))
    targets = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    _released_layout(base, name, vision)
    if vision:
        (base / "preprocessor_config.json").write_text(json.dumps(PROJECTORS[name]))
        targets = rf".*({targets[2:]}|{VISION_LINEAR})"
    return base, small_random_adapter(model, targets, root / "adapter")


def small_random_adapter(model, targets: str, out: Path) -> Path:
    """A rank-8 adapter on the modules `targets` matches, B random and small (x 0.05), saved to `out`."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        model.float(), LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    peft.save_pretrained(str(out))
    return out


def _vision_shape(v, name: str) -> None:
    """A vision tower 64 wide (whole 4-bit blocks: bitsandbytes' CPU dequantization, the reference, needs
    them) of three blocks (llama.cpp's converter numbers projector layers, mm.1 or the adapter's fc2, within
    the block range)."""
    v.hidden_size = 64
    if name != "qwen2_vl":  # (Qwen2-VL's feed-forward size is mlp_ratio x embed_dim)
        v.intermediate_size = 128
    if name.startswith("qwen"):
        v.depth = 3
    else:
        v.num_hidden_layers = 3
    if name == "qwen2_vl":
        v.embed_dim = 64  # its width; hidden_size is the merger's output
    if name == "qwen2_5_vl":
        v.fullatt_block_indexes = [2]  # window attention in blocks 0 and 1
    if name == "mistral3_vlm":
        v.head_dim = 32


def _released_layout(base: Path, name: str, vision: bool) -> None:
    """The tensors stored as the model's releases store them, where transformers 5 saves them otherwise
    (transformers loads both): Gemma 3's vision tower under `vision_tower.vision_model.*` (for the projector
    tests), Qwen3-VL-MoE's fused experts as [experts, in, out]."""
    from safetensors.torch import load_file, save_file

    path = base / "model.safetensors"
    tensors = load_file(path)
    if name == "gemma3_vlm" and vision:
        tensors = {
            k.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if k.startswith("vision_tower.")
            else k: v
            for k, v in tensors.items()
        }
    elif name == "qwen3_vl_moe":
        tensors = {k: v.transpose(-1, -2).contiguous() if ".experts." in k else v for k, v in tensors.items()}
    else:
        return
    save_file(tensors, path, metadata={"format": "pt"})
