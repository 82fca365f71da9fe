"""Which transformers class a model is built with for fine-tuning, and its config parsed as transformers
parses config.json (special floats decoded)."""

from __future__ import annotations

from ..errors import InputError, UnsupportedError

# The auto classes a fine-tune is built with, tried in this order when config.json's `architectures` names
# no class the installed transformers has (causal LMs, then vision-language models).
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")


def hf_config_of(config: dict):
    """The transformers config for a config.json dict, parsed as AutoConfig.from_pretrained parses it
    (special floats such as {"__float__": "Infinity"} decoded), or an error that says why not."""
    from transformers import AutoConfig, PretrainedConfig

    cfg = dict(config)
    decode = getattr(PretrainedConfig, "_decode_special_floats", None)
    if decode is not None:
        cfg = decode(cfg)
    model_type = cfg.pop("model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedError("config.json has no model_type; qmerge cannot tell the architecture.")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError) as e:
        raise UnsupportedError(
            f"model_type {model_type!r} is not known to the installed transformers ({e})."
        ) from e
    except Exception as e:  # noqa: BLE001 - a config transformers rejects, whatever it raises
        raise InputError(
            f"config.json: transformers rejects this {model_type} config ({type(e).__name__}: {e})."
        ) from e


def model_class(config: dict, hf_config=None):
    """The transformers class a fine-tune of this model is built with: the one config.json's
    `architectures` names (a causal LM, a vision-language model, a classifier), else the first auto class
    of AUTO_CLASSES that knows the config. Returns (class, how to build: "auto" or "class")."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, str(name), None) if "For" in str(name) else None
        if cls is not None and hasattr(cls, "_from_config"):
            return cls, "class"
    hf_config = hf_config if hf_config is not None else hf_config_of(config)
    for auto in AUTO_CLASSES:
        cls = getattr(transformers, auto)
        if type(hf_config) in cls._model_mapping:
            return cls, "auto"
    raise UnsupportedError(
        f"config.json: the installed transformers builds no causal LM or vision-language model for "
        f"{config.get('model_type')!r} (architectures {config.get('architectures')}); qmerge merges the "
        "models transformers fine-tunes with AutoModelForCausalLM or AutoModelForImageTextToText."
    )


def build_model(config: dict, hf_config, **kwargs):
    """The model_class model for `hf_config` (under whatever device context the caller set)."""
    cls, how = model_class(config, hf_config)
    return cls.from_config(hf_config, **kwargs) if how == "auto" else cls._from_config(hf_config, **kwargs)


def classifier_of(config: dict, adapter, layout) -> dict | None:
    """The output config of a sequence-classification adapter (task_type SEQ_CLS), None for any other: it
    was trained on the classifier transformers builds on the base (AutoModelForSequenceClassification),
    whose head PEFT saves whole (modules_to_save: score / classifier) and gives the number of labels."""
    if str(adapter.config.get("task_type", "")).upper() != "SEQ_CLS":
        return None
    saved = adapter.modules_to_save
    heads = [
        t for t in layout.replace if t.endswith(".weight") and t[: -len(".weight")].split(".")[-1] in saved
    ]
    if len(heads) != 1:
        raise InputError(
            f"{adapter.path}: a SEQ_CLS adapter saves its classification head (modules_to_save {saved}); "
            f"found {len(heads)} head weights ({heads}). Re-save it with PEFT."
        )
    return classifier_config(config, adapter.store.shape(layout.replace[heads[0]])[0])


def classifier_config(config: dict, num_labels: int) -> dict:
    """config.json of the sequence classifier transformers builds on `config` for a SEQ_CLS fine-tune
    (AutoModelForSequenceClassification with num_labels), as save_pretrained writes it."""
    import transformers

    cls = transformers.AutoModelForSequenceClassification
    hf_config = hf_config_of(config)
    target = cls._model_mapping.get(type(hf_config), None)
    if target is None:
        raise UnsupportedError(
            f"config.json: transformers has no sequence classifier for {config.get('model_type')!r}; this "
            "SEQ_CLS adapter cannot be merged into it."
        )
    hf_config.num_labels = num_labels
    out = {**config, **{k: getattr(hf_config, k) for k in ("id2label", "label2id")}}
    out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
    return {**out, "architectures": [target.__name__]}
