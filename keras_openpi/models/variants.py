"""Architecture variants as data: Gemma experts and SigLIP encoders."""

# openpi's Gemma variants (`openpi.models.gemma.get_config`).
GEMMA_VARIANTS = {
    "dummy": dict(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": dict(
        width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    "gemma_2b": dict(
        width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
    ),
}
GEMMA_KEYS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")

# big_vision ViT sizes (`decode_variant`), plus the `tiny` size of the test fixtures.
# A variant is written `<size>/<patch>`, e.g. "So400m/14" (openpi's) or "S/16".
SIGLIP_SIZES = {
    "tiny": dict(width=64, depth=2, mlp_dim=128, num_heads=4),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
SIGLIP_KEYS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")

PALIGEMMA_VOCABULARY_SIZE = 257_152


def _check_custom(variant, keys, kind):
    missing = [k for k in keys if k not in variant]
    extra = [k for k in variant if k not in keys]
    if missing or extra:
        raise ValueError(
            f"A custom {kind} variant needs exactly the keys {list(keys)}; "
            f"missing {missing}, unexpected {extra}."
        )
    return {k: int(variant[k]) for k in keys}


def resolve_gemma_variant(variant):
    """A variant name (`dummy`, `gemma_300m`, `gemma_2b`) or a dict -> dimension dict."""
    if isinstance(variant, dict):
        return _check_custom(variant, GEMMA_KEYS, "Gemma")
    if variant not in GEMMA_VARIANTS:
        raise ValueError(
            f"Unknown Gemma variant {variant!r}; expected one of "
            f"{sorted(GEMMA_VARIANTS)} or a dict with keys {list(GEMMA_KEYS)}."
        )
    return dict(GEMMA_VARIANTS[variant])


def resolve_siglip_variant(variant):
    """`<size>/<patch>` (e.g. `So400m/14`, `S/16`, `tiny/16`) or a dict -> dimension dict."""
    if isinstance(variant, dict):
        return _check_custom(variant, SIGLIP_KEYS, "SigLIP")
    size, _, patch = str(variant).partition("/")
    if size not in SIGLIP_SIZES or not patch.isdigit():
        raise ValueError(
            f"Unknown SigLIP variant {variant!r}; expected '<size>/<patch>' with size "
            f"in {list(SIGLIP_SIZES)} (e.g. 'So400m/14') or a dict with keys "
            f"{list(SIGLIP_KEYS)}."
        )
    return {**SIGLIP_SIZES[size], "patch_size": int(patch)}
