"""What the scheduler takes from the settings (pure)."""

from __future__ import annotations

from ollamad.models.plan import PlanSettings
from ollamad.settings import Settings


def plan_settings(settings: Settings) -> PlanSettings:
    return PlanSettings(
        num_parallel=settings.num_parallel,
        context_length=settings.context_length,
        kv_cache_type=settings.kv_cache_type,
        flash_attention=settings.flash_attention,
        single_slot_architectures=settings.single_slot_architectures,
        threads=settings.threads,
        send_ahead=settings.send_ahead,
    )


def auto_max_loaded(settings: Settings, gpus: int = 0) -> int:
    """OLLAMA_MAX_LOADED_MODELS, with 0 meaning 3 per GPU (3 without a GPU)."""
    return settings.max_loaded_models or 3 * max(gpus, 1)
