"""The Megatron-Core extension: routed layers and specs, the token selection they take, the
LLaVA student built on them, and the bridges to Megatron-Core versions and to CPU."""
